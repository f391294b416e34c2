"""Throughput on the built-in model, measured side by side in one run: sampling images/s by batch size, the cost
per image of each guided method against plain sampling (IGD fast / reference, MGD3, MGD3+IGD), the Ray pipeline
against the in-process core on the same work, 1 vs 2 sampler actors, and evaluation epochs/s of the on-device batched
loop against a per-image DataLoader pipeline of the same protocol.

    python benchmarks/throughput.py [--sections sampling,methods,ray,eval] [--images 40]
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


def method_costs(batch: int, rounds: int, surrogate: str | None) -> dict:
    """Seconds per image of each method's sampling (latents + decode), interleaved round by round so that load on
    the machine hits every method alike; ratios to plain sampling at the same batch size. IGD ``reference`` runs at
    batch 1 (as released), so plain and IGD ``fast`` are also timed at batch 1."""
    import statistics

    from raydistill.distill import METHOD_TERMS, ShardRunner

    extra = {"surrogate": surrogate} if surrogate else {}
    runners = {}
    for name, method, ex in (("plain", "dit", {}), ("mgd3", "mgd3", {}), ("igd_fast", "igd", {}),
                             ("mgd3+igd", "mgd3+igd", {}), ("igd_reference", "igd", {"igd_impl": "reference"})):
        cfg = DistillConfig(method=method, ipc=max(batch, 16), extra={**extra, **ex},
                            out=str(Path(tempfile.gettempdir()) / "rdbench-methods" / name))
        runners[name] = ShardRunner(cfg, device="cpu")
        assert method in METHOD_TERMS
    plans = {  # name -> (runner, batch)
        "plain_b1": ("plain", 1), "igd_fast_b1": ("igd_fast", 1), "igd_reference_b1": ("igd_reference", 1),
        f"plain_b{batch}": ("plain", batch), f"mgd3_b{batch}": ("mgd3", batch),
        f"igd_fast_b{batch}": ("igd_fast", batch), f"mgd3+igd_b{batch}": ("mgd3+igd", batch)}
    for r in runners.values():  # warm-up, and mode discovery / real gradients out of the timings
        r.generator.generate([0], [0], 0, r.terms)
    times: dict[str, list[float]] = {k: [] for k in plans}
    for rnd in range(rounds):
        for key, (name, b) in plans.items():
            run = runners[name]
            c = rnd % 10
            t0 = time.perf_counter()
            run.generator.generate([c] * b, list(range(b)), rnd, run.terms)
            times[key].append((time.perf_counter() - t0) / b)
            print(f"  round {rnd + 1}/{rounds} {key}: {times[key][-1]:.3f} s/image", flush=True)
    res = {k: statistics.median(v) for k, v in times.items()}
    ratios = {f"{k}_vs_plain": res[k] / res[f"plain_b{plans[k][1]}"] for k in plans if not k.startswith("plain")}
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x", flush=True)
    ratios["igd_reference_vs_fast_b1"] = res["igd_reference_b1"] / res["igd_fast_b1"]
    print(f"igd reference / fast at batch 1: {ratios['igd_reference_vs_fast_b1']:.2f}x", flush=True)
    return {"seconds_per_image": res, "ratios": ratios, "rounds": rounds, "batch": batch}


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
    ap.add_argument("--method-batch", type=int, default=16)
    ap.add_argument("--method-rounds", type=int, default=3)
    ap.add_argument("--surrogate", help="IGD surrogate trajectory (default: the built-in one)")
    ap.add_argument("--results", default="benchmarks/results/throughput.json")
    a = ap.parse_args()
    sections = a.sections.split(",")
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                            f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d %H:%M")}
    if "sampling" in sections:
        res["sampling_images_per_s"] = sampling([int(b) for b in a.batch_sizes.split(",")], a.images)
    if "methods" in sections:
        res["methods"] = method_costs(a.method_batch, a.method_rounds, a.surrogate)
    if "ray" in sections:
        res["ray"] = ray_vs_local(a.ipc)
    if "eval" in sections:
        res["evaluation"] = evaluation(a.eval_epochs)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(a.results).read_text()) if Path(a.results).exists() else {}
    atomic_write_text(Path(a.results), json.dumps({**old, **res}, indent=1))  # sections run separately accumulate


if __name__ == "__main__":
    main()
