"""The main job: distill with the chosen method and the baselines on Ray, evaluate each set, track it in MLflow.

Stages per set: sample (Ray Data over an actor pool) -> evaluate (a Ray task per set, on a GPU when the cluster has
one) -> MLflow run with params, metrics (accuracy per net and preset, mean and std, images/s, seconds per stage) and
artifacts (grid.png, manifest.parquet, metrics.json).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raydistill.config import DistillConfig
from raydistill.outputs import atomic_write_text


@dataclass
class SetReport:
    method: str
    ipc: int
    out: str
    images_per_s: float
    seconds_sample: float
    evals: dict  # net -> EvalResult.to_dict()
    run_id: str | None = None


def set_dir(root: str | Path, cfg: DistillConfig, method: str) -> Path:
    return Path(root) / cfg.dataset / f"{method}-ipc{cfg.ipc}-seed{cfg.seed}"


def _evaluate_task(out: str, cfg_dict: dict, net: str, threads: int) -> dict:
    import torch

    from raydistill.distill import evaluate_images, load_distilled, open_dataset, selected_labels

    torch.set_num_threads(threads)
    cfg = DistillConfig.from_dict(cfg_dict)
    ds = open_dataset(cfg)
    x, y = load_distilled(out, ds, selected_labels(cfg, ds), ipc=cfg.ipc)
    res = evaluate_images(x, y, ds, cfg.eval_preset, net, cfg.num_evals, seed=cfg.seed, epochs=cfg.eval_epochs,
                          progress=lambda m: print(f"[eval {Path(out).name} {net}] {m}", flush=True))
    return res.to_dict()


def run_main_job(cfg: DistillConfig, root: str | Path, address: str | None = None, pool_size: int = 1,
                 shard_size: int | None = None, gpus_per_actor: float | None = None, tracking_uri: str | None = None,
                 overwrite: bool = False, log: Callable[[str], None] = print) -> list[SetReport]:
    import ray

    from raydistill.orchestration.pipeline import distill_ray
    from raydistill.orchestration.runtime import ray_session
    from raydistill.orchestration.tracking import default_tracking_uri, log_artifacts, log_metrics, mlflow_run

    tracking_uri = tracking_uri or default_tracking_uri(root)
    methods = [cfg.method] + [b for b in cfg.baselines if b != cfg.method]
    reports: list[SetReport] = []
    with ray_session(address):
        gpus = ray.cluster_resources().get("GPU", 0)
        per_actor_gpu = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus else 0.0)
        cpus = ray.cluster_resources().get("CPU", 1)
        set_cfgs = {m: cfg.with_(method=m, out=cfg.out if (m == cfg.method and cfg.out) else str(set_dir(root, cfg, m)))
                    for m in methods}
        sample_secs, rates = {}, {}
        for m, c in set_cfgs.items():
            log(f"[{m}] sampling {c.ipc} images per class into {c.out}")
            t0 = time.time()
            res = distill_ray(c, pool_size=pool_size, shard_size=shard_size, gpus_per_actor=per_actor_gpu,
                              cpus_per_actor=max(0.25, min(1.0, (cpus - 0.5) / pool_size)),
                              threads_per_actor=max(1, int(cpus // pool_size)), overwrite=overwrite,
                              progress=lambda s, m=m: log(f"[{m}] {s}"))
            sample_secs[m], rates[m] = time.time() - t0, res.images_per_s
            log(f"[{m}] {len(res.rows)} images ({res.shards_run} shards run, {res.shards_skipped} resumed) "
                f"in {sample_secs[m]:.1f} s")
        evals: dict[str, dict] = {m: {} for m in methods}
        if cfg.num_evals > 0:
            n_tasks = len(methods) * len(cfg.eval_nets)
            eval_gpu = min(1.0, gpus / n_tasks) if gpus else 0
            threads = max(1, int(cpus // n_tasks))
            task = ray.remote(num_cpus=min(1.0, cpus / n_tasks), num_gpus=eval_gpu)(_evaluate_task)
            log(f"evaluating {len(methods)} sets x {cfg.num_evals} nets with preset {cfg.eval_preset!r}")
            t0 = time.time()
            refs = {(m, net): task.remote(set_cfgs[m].out, set_cfgs[m].to_dict(), net, threads)
                    for m in methods for net in cfg.eval_nets}
            for (m, net), ref in refs.items():
                evals[m][net] = ray.get(ref)
            eval_secs = time.time() - t0
        else:
            eval_secs = 0.0
        for m in methods:
            c = set_cfgs[m]
            metrics = {"images_per_s": rates[m], "seconds_sample": sample_secs[m], "seconds_eval": eval_secs}
            for net, e in evals[m].items():
                key = f"acc_{c.eval_preset}_{net}"
                metrics.update({f"{key}_mean": e["reported_mean"], f"{key}_std": e["reported_std"]})
            atomic_write_text(Path(c.out) / "metrics.json", json.dumps({"metrics": metrics, "evals": evals[m]},
                                                                        indent=1))
            with mlflow_run(tracking_uri, f"{m}-ipc{c.ipc}-{c.dataset}", c.flat_params(),
                            tags={"method": m, "dataset": c.dataset}) as run:
                log_metrics(metrics)
                log_artifacts([Path(c.out) / "grid.png", Path(c.out) / "manifest.parquet",
                               Path(c.out) / "metrics.json"])
                run_id = run.info.run_id
            reports.append(SetReport(m, c.ipc, c.out, rates[m], sample_secs[m], evals[m], run_id))
    return reports


def format_table(reports: list[SetReport], preset: str) -> str:
    lines = [f"{'method':<10} {'IPC':>4} {'network':<10} {'accuracy (' + preset + ')':>20} {'images/s':>9}"]
    for r in reports:
        if not r.evals:
            lines.append(f"{r.method:<10} {r.ipc:>4} {'-':<10} {'-':>20} {r.images_per_s:>9.2f}")
        for net, e in r.evals.items():
            acc = f"{e['reported_mean']:.2f} +- {e['reported_std']:.2f} (n={len(e['last'])})"
            rate = "real" if r.method == "random" else f"{r.images_per_s:.2f}"
            lines.append(f"{r.method:<10} {r.ipc:>4} {net:<10} {acc:>20} {rate:>9}")
    return "\n".join(lines)
