"""Throughput on the built-in model, measured side by side in one run: sampling images/s by batch size, the cost
per image of each guided method against plain sampling (IGD fast / reference, MGD3, MGD3+IGD), the Ray pipeline
against the in-process core on the same work, 1 vs 2 sampler actors, and evaluation epochs/s of the on-device batched
loop against a per-image DataLoader pipeline of the same protocol. The GPU figures: ``benchmarks/gpu_check.sh``.

    python benchmarks/throughput.py [--sections sampling,methods,ray,job,eval] [--images 40]
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


def method_costs(batch: int, rounds: int, surrogate: str | None, refresh: tuple[int, ...] = ()) -> dict:
    """Seconds per image of each method's sampling (latents + decode), interleaved round by round so that load on
    the machine hits every method alike; ratios to plain sampling at the same batch size. IGD ``reference`` runs at
    batch 1 (as released), so plain and IGD ``fast`` are also timed at batch 1. ``refresh``: IGD ``fast`` with
    ``igd_refresh`` n (the approximate gradient reuse) at ``batch``, for each n."""
    import statistics

    from raydistill.distill import ShardRunner

    extra = {"surrogate": surrogate} if surrogate else {}
    runners = {}
    for name, method, ex in (("plain", "dit", {}), ("mgd3", "mgd3", {}), ("igd_fast", "igd", {}),
                             ("mgd3+igd", "mgd3+igd", {}), ("igd_reference", "igd", {"igd_impl": "reference"}),
                             *((f"igd_refresh{n}", "igd", {"igd_refresh": n}) for n in refresh)):
        cfg = DistillConfig(method=method, ipc=max(batch, 16), extra={**extra, **ex},
                            out=str(Path(tempfile.gettempdir()) / "rdbench-methods" / name))
        runners[name] = ShardRunner(cfg, device="cpu")
    plans = {  # name -> (runner, batch)
        "plain_b1": ("plain", 1), "igd_fast_b1": ("igd_fast", 1), "igd_reference_b1": ("igd_reference", 1),
        f"plain_b{batch}": ("plain", batch), f"mgd3_b{batch}": ("mgd3", batch),
        f"igd_fast_b{batch}": ("igd_fast", batch), f"mgd3+igd_b{batch}": ("mgd3+igd", batch),
        **{f"igd_refresh{n}_b{batch}": (f"igd_refresh{n}", batch) for n in refresh}}
    for r in runners.values():  # warm-up, and mode discovery / real gradients out of the timings
        r.generator.generate([0], [0], 0, r.terms)
    times: dict[str, list[float]] = {k: [] for k in plans}
    for rnd in range(rounds):
        for key, (name, b) in plans.items():
            run = runners[name]
            t0 = time.perf_counter()  # class 0 in every round (its modes and real gradients were made in warm-up)
            run.generator.generate([0] * b, list(range(b)), rnd + 1, run.terms)
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
    """The default job's sampling stage (plain DiT, IPC ``ipc``, 10 classes) in-process and through Ray Data.

    In-process: ``distill_local`` with 1 and 2 torch threads (the better one is the reference). Ray: the default job's
    pool (``auto_pool_size``: one 1-thread actor per CPU on a CPU machine), and 1 actor with 1 or 2 threads, in one
    Ray session; ``ray_start_s`` is ``ray.init`` of the local cluster, paid once per job.
    """
    from raydistill.distill import distill_local
    from raydistill.orchestration.distill_job import auto_pool_size
    from raydistill.orchestration.pipeline import distill_ray
    from raydistill.orchestration.runtime import ray_session

    tmp = Path(tempfile.mkdtemp(prefix="rdbench"))
    cfg = DistillConfig(ipc=ipc, batch_size=ipc, baselines=())
    res: dict = {"images": 10 * ipc}
    threads = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        distill_local(cfg.with_(out=str(tmp / f"local{n}")))
        res[f"local_{n}thread_s"] = time.perf_counter() - t0
    torch.set_num_threads(threads)
    local = min(res["local_1thread_s"], res["local_2thread_s"])
    t_start = time.perf_counter()
    with ray_session(num_cpus=2, num_gpus=0):
        res["ray_start_s"] = time.perf_counter() - t_start
        auto = auto_pool_size(2, 0, 10)
        for name, pool, th in (("default", auto, 1), ("pool1_2threads", 1, 2), ("pool1_1thread", 1, 1)):
            t0 = time.perf_counter()
            distill_ray(cfg.with_(out=str(tmp / f"ray-{name}")), pool_size=pool, cpus_per_actor=min(1.0, 1.5 / pool),
                        threads_per_actor=th)
            res[f"ray_{name}_s"] = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    res["default_pool"] = auto
    res["ray_overhead_default"] = (res["ray_default_s"] + res["ray_start_s"] - local) / (res["ray_default_s"]
                                                                                         + res["ray_start_s"])
    res["speedup_2_vs_1_actors"] = res["ray_pool1_1thread_s"] / res["ray_default_s"]
    res["speedup_default_vs_1_actor_2threads"] = res["ray_pool1_2threads_s"] / res["ray_default_s"]
    print(json.dumps(res, indent=1), flush=True)
    return res


def default_job(eval_epochs: int | None) -> dict:
    """The default main job (``raydistill distill``: plain DiT and random real at IPC 10, one ``dc`` net each,
    coverage, MLflow) through Ray, against the same work in this process, one set after the other (2 threads).

    The Ray side pays ``ray.init``, actor and task start-up, and MLflow tracking; it gains from running the two
    evaluations at once. ``eval_epochs`` shortens the nets (None: the preset's 300) for a quicker look.
    """
    from raydistill.distill import (
        coverage_of_set,
        distill_local,
        evaluate_images,
        load_distilled,
        open_dataset,
        selected_labels,
        set_configs,
    )
    from raydistill.orchestration.distill_job import run_main_job

    tmp = Path(tempfile.mkdtemp(prefix="rdjob"))
    cfg = DistillConfig(eval_epochs=eval_epochs)
    res: dict = {"eval_epochs": eval_epochs or 300}
    t0 = time.perf_counter()
    run_main_job(cfg, root=tmp / "ray", log=lambda m: None)
    res["ray_s"] = time.perf_counter() - t0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    for c in set_configs(cfg, tmp / "local").values():
        distill_local(c)
        ds = open_dataset(c)
        x, y = load_distilled(c.out, ds, selected_labels(c, ds), ipc=c.ipc)
        for net in c.eval_nets:
            evaluate_images(x, y, ds, c.eval_preset, net, c.num_evals, seed=c.seed, epochs=c.eval_epochs)
        coverage_of_set(c, c.out)
    res["in_process_s"] = time.perf_counter() - t0
    torch.set_num_threads(threads)
    shutil.rmtree(tmp, ignore_errors=True)
    res["ray_overhead_share"] = (res["ray_s"] - res["in_process_s"]) / res["ray_s"]
    print(json.dumps(res, indent=1), flush=True)
    return res


def evaluation(epochs: int) -> dict:
    import importlib.util

    from raydistill.data import load_dataset
    from raydistill.evaluate.train import evaluate_synthetic
    from raydistill.methods.baselines import random_real_indices

    spec = importlib.util.spec_from_file_location("eval_reference", Path(__file__).with_name("eval_reference.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    evaluate_synthetic_dataloader = reference.evaluate_synthetic_dataloader

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
    ap.add_argument("--job-eval-epochs", type=int, help="the job section's net epochs (default: the preset's 300)")
    ap.add_argument("--method-batch", type=int, default=16)
    ap.add_argument("--method-rounds", type=int, default=3)
    ap.add_argument("--method-refresh", default="", help="IGD igd_refresh values to time too, e.g. 2,4")
    ap.add_argument("--surrogate", help="IGD surrogate trajectory (default: the built-in one)")
    ap.add_argument("--results", default="benchmarks/results/throughput.json")
    a = ap.parse_args()
    sections = a.sections.split(",")
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                            f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d %H:%M")}
    if "sampling" in sections:
        res["sampling_images_per_s"] = sampling([int(b) for b in a.batch_sizes.split(",")], a.images)
    if "methods" in sections:
        res["methods"] = method_costs(a.method_batch, a.method_rounds, a.surrogate,
                                      tuple(int(n) for n in a.method_refresh.split(",") if n))
    if "ray" in sections:
        res["ray"] = ray_vs_local(a.ipc)
    if "job" in sections:
        res["default_job"] = default_job(a.job_eval_epochs)
    if "eval" in sections:
        res["evaluation"] = evaluation(a.eval_epochs)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(a.results).read_text()) if Path(a.results).exists() else {}
    atomic_write_text(Path(a.results), json.dumps({**old, **res}, indent=1))  # sections run separately accumulate


if __name__ == "__main__":
    main()
