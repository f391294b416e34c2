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
    coverage: dict | None = None  # mode_coverage, mode_distance (raydistill.coverage)


def set_dir(root: str | Path, cfg: DistillConfig, method: str) -> Path:
    return Path(root) / cfg.dataset / f"{method}-ipc{cfg.ipc}-seed{cfg.seed}"


def set_configs(cfg: DistillConfig, root: str | Path) -> dict[str, DistillConfig]:
    """One config per set the main job makes: the method (into ``cfg.out`` when given) and each baseline."""
    methods = [cfg.method] + [b for b in cfg.baselines if b != cfg.method]
    return {m: cfg.with_(method=m, out=cfg.out if (m == cfg.method and cfg.out) else str(set_dir(root, cfg, m)),
                         published=cfg.published if m == cfg.method else {})  # a paper cell's figure: its method's
            for m in methods}


def user_error_in(exc: BaseException):
    """The :class:`UserError` a Ray task/actor raised, found in the wrapping exception's chain (else None)."""
    from raydistill.errors import UserError

    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(e.problem, e.fix)
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


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


def auto_pool_size(cpus: float, gpus: float, n_shards: int) -> int:
    """Sampler actors when ``--pool-size`` is not given: one per GPU, else one per CPU (each with one thread), never
    more than there are shards. On the 2-core CPU two 1-thread actors sample the default job's 100 images 1.7x
    faster than one 2-thread actor (docs/BENCHMARKS.md section 8): OpenMP threads wait on each other while Ray's
    own processes share the cores."""
    per = int(gpus) if gpus >= 1 else int(cpus)
    return max(1, min(per, n_shards))


def run_main_job(cfg: DistillConfig, root: str | Path, address: str | None = None, pool_size: int | None = None,
                 shard_size: int | None = None, gpus_per_actor: float | None = None, tracking_uri: str | None = None,
                 overwrite: bool = False, log: Callable[[str], None] = print) -> list[SetReport]:
    """Sample every set, evaluate them all, then log one MLflow run per set. A UserError raised inside a Ray
    actor or task is re-raised here as itself (one clear line at the CLI)."""
    from raydistill.orchestration.runtime import ray_session
    from raydistill.orchestration.tracking import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri(root)
    sets = set_configs(cfg, root)
    with ray_session(address):
        try:
            sampled = {m: _sample_set(c, pool_size, shard_size, gpus_per_actor, overwrite, log)
                       for m, c in sets.items()}
            evals, eval_secs = _evaluate_sets(cfg, sets, log)
        except Exception as e:
            ue = user_error_in(e)
            if ue is not None:
                raise ue from None
            raise
    return [_track_set(c, sampled[m], evals[m], eval_secs, tracking_uri) for m, c in sets.items()]


def _sample_set(c: DistillConfig, pool_size: int | None, shard_size: int | None, gpus_per_actor: float | None,
                overwrite: bool, log: Callable[[str], None]) -> tuple[float, float]:
    """Stage 1: the Ray Data pipeline; returns (images/s, seconds)."""
    import ray

    from raydistill.orchestration.pipeline import distill_ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    t0 = time.time()
    if "mgd3" in c.method.split("+"):  # stage 0: mode discovery, one Ray task per class, into the mode cache
        from raydistill.orchestration.modes_job import discover_modes_ray

        log(f"[{c.method}] discovering modes ({time.time() - t0:.0f} s)")
        discover_modes_ray(c, log=lambda s: log(f"[{c.method}] {s}"))
    if pool_size is None:
        from raydistill.distill import open_dataset, plan_shards, selected_labels

        pool_size = auto_pool_size(cpus, gpus, len(plan_shards(c, selected_labels(c, open_dataset(c)), shard_size)))
    log(f"[{c.method}] sampling {c.ipc} images per class into {c.out} ({pool_size} sampler actor(s))")
    out = distill_ray(c, pool_size=pool_size, shard_size=shard_size,
                      gpus_per_actor=gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus else 0.0),
                      cpus_per_actor=max(0.25, min(1.0, (cpus - 0.5) / pool_size)),
                      threads_per_actor=max(1, int(cpus // pool_size)), overwrite=overwrite,
                      progress=lambda s: log(f"[{c.method}] {s}"))
    secs = time.time() - t0
    log(f"[{c.method}] {len(out.rows)} images ({out.shards_run} shards run, {out.shards_skipped} resumed) "
        f"in {secs:.1f} s")
    return out.images_per_s, secs


def _evaluate_sets(cfg: DistillConfig, sets: dict[str, DistillConfig], log: Callable[[str], None]
                   ) -> tuple[dict[str, dict], float]:
    """Stage 2: one Ray task per (set, net), all in flight at once; returns results and seconds."""
    import ray

    evals: dict[str, dict] = {m: {} for m in sets}
    if cfg.num_evals == 0:
        return evals, 0.0
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    n_tasks = len(sets) * len(cfg.eval_nets)
    task = ray.remote(num_cpus=min(1.0, cpus / n_tasks), num_gpus=min(1.0, gpus / n_tasks) if gpus else 0)(
        _evaluate_task)
    log(f"evaluating {len(sets)} sets x {cfg.num_evals} nets with preset {cfg.eval_preset!r}")
    t0 = time.time()
    refs = {(m, net): task.remote(c.out, c.to_dict(), net, max(1, int(cpus // n_tasks)))
            for m, c in sets.items() for net in cfg.eval_nets}
    if cfg.coverage:
        cov = ray.remote(num_cpus=min(1.0, cpus / n_tasks))(_coverage_task)
        refs.update({(m, "coverage"): cov.remote(c.out, c.to_dict()) for m, c in sets.items()})
    for (m, net), ref in refs.items():
        evals[m][net] = ray.get(ref)
    return evals, time.time() - t0


def _coverage_task(out: str, cfg_dict: dict) -> dict:
    import torch

    from raydistill.distill import coverage_of_set

    torch.set_num_threads(1)
    return coverage_of_set(DistillConfig.from_dict(cfg_dict), out)


def _track_set(c: DistillConfig, sampled: tuple[float, float], evals: dict, eval_secs: float,
               tracking_uri: str) -> SetReport:
    """Stage 3: metrics.json next to the set and one MLflow run with params, metrics and artifacts."""
    from raydistill.orchestration.tracking import log_artifacts, log_metrics, mlflow_run

    rate, sample_secs = sampled
    metrics = {"images_per_s": rate, "seconds_sample": sample_secs, "seconds_eval": eval_secs}
    evals = dict(evals)
    cov = evals.pop("coverage", None)
    if cov is not None:
        metrics.update({"mode_coverage": cov["mode_coverage"], "mode_distance": cov["mode_distance"]})
    for net, e in evals.items():
        key = f"acc_{c.eval_preset}_{net}"
        metrics.update({f"{key}_mean": e["reported_mean"], f"{key}_std": e["reported_std"]})
    atomic_write_text(Path(c.out) / "metrics.json",
                      json.dumps({"metrics": metrics, "evals": evals, "coverage": cov}, indent=1))
    from raydistill.reproduce import expected_tags

    with mlflow_run(tracking_uri, f"{c.method}-ipc{c.ipc}-{c.dataset}", c.flat_params(),
                    tags={"method": c.method, "dataset": c.dataset, **expected_tags(c)}) as run:
        log_metrics(metrics)
        log_artifacts([Path(c.out) / "grid.png", Path(c.out) / "manifest.parquet", Path(c.out) / "metrics.json"])
        run_id = run.info.run_id
    return SetReport(c.method, c.ipc, c.out, rate, sample_secs, evals, run_id, cov)


def format_table(reports: list[SetReport], preset: str, expected: dict | None = None) -> str:
    """The accuracy table; ``expected`` maps (method, net) to the table cell of its band (``reproduce.judge``)."""
    expected = expected or {}
    lines = [f"{'method':<10} {'IPC':>4} {'network':<10} {'accuracy (' + preset + ')':>20} {'images/s':>9} "
             f"{'coverage':>8} {'distance':>8}" + ("  expected" if expected else "")]
    for r in reports:
        rate = "real" if r.method in ("random", "herding") else f"{r.images_per_s:.2f}"
        cov = (f"{r.coverage['mode_coverage']:>8.2f} {r.coverage['mode_distance']:>8.2f}" if r.coverage
               else f"{'-':>8} {'-':>8}")
        if not r.evals:
            lines.append(f"{r.method:<10} {r.ipc:>4} {'-':<10} {'-':>20} {rate:>9} {cov}")
        for net, e in r.evals.items():
            acc = f"{e['reported_mean']:.2f} +- {e['reported_std']:.2f} (n={e['num_nets']})"
            band = f"  {expected[r.method, net]}" if (r.method, net) in expected else ""
            lines.append(f"{r.method:<10} {r.ipc:>4} {net:<10} {acc:>20} {rate:>9} {cov}{band}")
    return "\n".join(lines)
