"""Throughput on the built-in model, measured side by side in one run: sampling images/s by batch size, the Ray
pipeline against the in-process core on the same work, 1 vs 2 sampler actors, and evaluation epochs/s of the
on-device batched loop against a per-image DataLoader pipeline of the same protocol.

    python benchmarks/throughput.py [--sections sampling,ray,eval] [--images 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from raydistill.config import DistillConfig
from raydistill.outputs import atomic_write_text


def sampling(batch_sizes: list[int], images: int) -> dict:
    from raydistill.data import load_dataset
    from raydistill.generator import load_generator

    ds = load_dataset("fashion-mnist")
    gen = load_generator(DistillConfig(), ds.dit_labels, ds.image_size, device="cpu")
    gen.generate([0], [0], 0)  # warm-up
    out = {}
    for b in batch_sizes:
        n = max(b, images // b * b)
        labels = [i % 10 for i in range(n)]
        t0 = time.perf_counter()
        for s in range(0, n, b):
            gen.generate(labels[s:s + b], list(range(s, s + b)), 0)
        rate = n / (time.perf_counter() - t0)
        out[b] = rate
        print(f"sampling batch {b:>3}: {rate:7.2f} images/s ({n} images)", flush=True)
    return out


def ray_vs_local(ipc: int) -> dict:
    from raydistill.distill import distill_local
    from raydistill.orchestration.pipeline import distill_ray
    from raydistill.orchestration.runtime import ray_session

    tmp = Path(tempfile.mkdtemp(prefix="rdbench"))
    cfg = DistillConfig(ipc=ipc, batch_size=ipc, baselines=())
    t0 = time.perf_counter()
    distill_local(cfg.with_(out=str(tmp / "local")))
    local = time.perf_counter() - t0
    res = {"images": 10 * ipc, "local_s": local}
    t_start = time.perf_counter()
    with ray_session(num_cpus=2, num_gpus=0):
        res["ray_start_s"] = time.perf_counter() - t_start
        for pool in (1, 2):
            t0 = time.perf_counter()
            distill_ray(cfg.with_(out=str(tmp / f"ray{pool}")), pool_size=pool, cpus_per_actor=0.75,
                        threads_per_actor=2 // pool)
            res[f"ray_pool{pool}_s"] = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    res["ray_overhead_pool1"] = res["ray_pool1_s"] / local - 1
    res["speedup_2_vs_1_actors"] = res["ray_pool1_s"] / res["ray_pool2_s"]
    print(json.dumps(res, indent=1), flush=True)
    return res


def evaluation(epochs: int) -> dict:
    from raydistill.data import load_dataset
    from raydistill.distill import random_real_indices
    from raydistill.evaluate.train import evaluate_synthetic, evaluate_synthetic_dataloader

    ds = load_dataset("fashion-mnist")
    idx = [i for c in range(10) for i in random_real_indices(ds, c, 10, 0)]
    x, y = ds.read("train", idx).float() / 255, torch.as_tensor([c for c in range(10) for _ in range(10)])
    tx, ty = ds.load("test")
    tx = tx[:1000].float() / 255
    ty = ty[:1000]
    res = {}
    for preset in ("dc", "dsa"):
        for name, fn in (("tensor", evaluate_synthetic), ("dataloader", evaluate_synthetic_dataloader)):
            r = fn(x, y, tx, ty, preset=preset, num_nets=1, epochs=epochs)
            res[f"{preset}_{name}_epochs_per_s"] = (epochs + 1) / r.seconds
        res[f"{preset}_speedup"] = res[f"{preset}_tensor_epochs_per_s"] / res[f"{preset}_dataloader_epochs_per_s"]
        print(f"eval {preset}: tensor {res[f'{preset}_tensor_epochs_per_s']:.2f} vs dataloader "
              f"{res[f'{preset}_dataloader_epochs_per_s']:.2f} epochs/s -> {res[f'{preset}_speedup']:.2f}x",
              flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="sampling,ray,eval")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--eval-epochs", type=int, default=30)
    ap.add_argument("--results", default="benchmarks/results/throughput.json")
    a = ap.parse_args()
    sections = a.sections.split(",")
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                            f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d %H:%M")}
    if "sampling" in sections:
        res["sampling_images_per_s"] = sampling([int(b) for b in a.batch_sizes.split(",")], a.images)
    if "ray" in sections:
        res["ray"] = ray_vs_local(a.ipc)
    if "eval" in sections:
        res["evaluation"] = evaluation(a.eval_epochs)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.results), json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
