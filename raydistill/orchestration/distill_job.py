"""The main job: distill with the chosen method and the baselines on Ray, evaluate each set, track it in MLflow.

Stages per set: sample (Ray Data over an actor pool) -> evaluate (a Ray task per set, on a GPU when the cluster has
one) -> MLflow run with params, metrics (accuracy per net and preset, mean and std, images/s, seconds per stage) and
artifacts (grid.png, manifest.parquet, metrics.json). A soft-label preset (``rded``) also records ``label_mode``,
``teacher``, ``teacher_sha256``, ``teacher_net`` (params) and ``teacher_test_acc`` (metric).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raydistill.config import DistillConfig
from raydistill.distill import set_configs
from raydistill.methods import get_method
from raydistill.storage import is_uri


@dataclass
class SetReport:
    method: str
    ipc: int
    out: str
    images_per_s: float
    seconds_sample: float
    evals: dict  # net -> EvalResult.to_dict()
    run_id: str | None = None
    coverage: dict | None = None  # mode_coverage, mode_distance (raydistill.evaluate.coverage)


def _evaluate_task(out: str, cfg_dict: dict, net: str, threads: int) -> dict:
    import torch

    from raydistill.distill import evaluate_images, load_distilled, open_dataset, selected_labels

    torch.set_num_threads(threads)
    cfg = DistillConfig.from_dict(cfg_dict)
    ds = open_dataset(cfg)
    x, y = load_distilled(out, ds, selected_labels(cfg, ds), ipc=cfg.ipc)
    res = evaluate_images(x, y, ds, cfg.eval_preset, net, cfg.num_evals, seed=cfg.seed, epochs=cfg.eval_epochs,
                          precision=cfg.eval_precision, compile=cfg.compile, teacher=cfg.teacher,
                          progress=lambda m: print(f"[eval {Path(out).name} {net}] {m}", flush=True))
    return res.to_dict()


def auto_pool_size(cpus: float, gpus: float, n_shards: int) -> int:
    """Sampler actors when ``--pool-size`` is not given: one per GPU, else one per CPU (each with one thread), never
    more than there are shards. On the 2-core CPU two 1-thread actors sample the default job's 100 images 1.7x
    faster than one 2-thread actor (docs/BENCHMARKS.md section 10): OpenMP threads wait on each other while Ray's
    own processes share the cores."""
    per = int(gpus) if gpus >= 1 else int(cpus)
    return max(1, min(per, n_shards))


def run_main_job(cfg: DistillConfig, root: str | Path, address: str | None = None, pool_size: int | None = None,
                 shard_size: int | None = None, gpus_per_actor: float | None = None, tracking_uri: str | None = None,
                 overwrite: bool = False, log: Callable[[str], None] = print) -> list[SetReport]:
    """Sample every set, evaluate them all, then finish one MLflow run per set that changed (results.py: a rerun
    with nothing to add writes nothing). A UserError raised inside a Ray actor or task is re-raised here as itself
    (one clear line at the CLI); the runs of a job that fails are marked FAILED (tracking.py)."""
    from raydistill.orchestration.pipeline import check_actor_resources
    from raydistill.orchestration.results import has_work, label_params, read_results
    from raydistill.orchestration.runtime import ray_session
    from raydistill.orchestration.tracking import SetRun, check_tracking_uri, default_tracking_uri
    from raydistill.reproduce import expected_tags

    check_actor_resources(1.0 if gpus_per_actor is None else gpus_per_actor, 0.25)  # before Ray starts
    tracking_uri = tracking_uri or default_tracking_uri(root)
    check_tracking_uri(tracking_uri)
    sets = set_configs(cfg, root)
    prev = {m: read_results(c.out) for m, c in sets.items()}
    t_start = time.time()
    runs = {m: SetRun(tracking_uri, c.out, f"{c.method}-ipc{c.ipc}-{c.dataset}", {**c.flat_params(), **label_params(c)},
                      {"method": c.method, "dataset": c.dataset, **expected_tags(c)}, t_start)
            for m, c in sets.items() if has_work(c, prev[m])}
    try:
        with ray_session(address):  # re-raises a UserError from a task or actor as itself
            sampled = {m: _sample_set(c, pool_size, shard_size, gpus_per_actor, overwrite, log)
                       for m, c in sets.items()}
            evals, eval_secs = _evaluate_sets(cfg, sets, prev, log)
        return [_track_set(c, sampled[m], evals[m], eval_secs, prev[m], runs.pop(m, None)) for m, c in sets.items()]
    except BaseException as e:
        for run in runs.values():
            run.fail(e)
        raise


def _sample_set(c: DistillConfig, pool_size: int | None, shard_size: int | None, gpus_per_actor: float | None,
                overwrite: bool, log: Callable[[str], None]) -> tuple[float, float, int]:
    """Stage 1: the Ray Data pipeline; returns (images/s, seconds, shards run)."""
    import ray

    from raydistill.orchestration.pipeline import distill_ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    t0 = time.time()
    if "modes" in get_method(c.method).precompute:  # stage 0: mode discovery, one Ray task per class, into the cache
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
    return out.images_per_s, secs, out.shards_run


def _evaluate_sets(cfg: DistillConfig, sets: dict[str, DistillConfig], prev: dict[str, dict],
                   log: Callable[[str], None]) -> tuple[dict[str, dict], float]:
    """Stage 2: one Ray task per (set, net) not evaluated yet (``prev``), all in flight at once; returns the new
    results and seconds."""
    import ray

    from raydistill.orchestration.results import missing_evals, needs_coverage

    evals: dict[str, dict] = {m: {} for m in sets}
    remote = sorted(m for m, c in sets.items() if is_uri(c.out))
    if remote:  # evaluation reads PNG folders: a set on an object store is evaluated where it is mounted
        log(f"not evaluating {', '.join(remote)} (on an object store): run `raydistill evaluate` on a mount of it")
    todo = [(m, net) for m, c in sets.items() if m not in remote for net in missing_evals(c, prev[m])]
    cov_todo = [m for m, c in sets.items() if m not in remote and needs_coverage(c, prev[m])]
    if not todo and not cov_todo:
        return evals, 0.0
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    n_tasks = max(1, len(todo))
    task = ray.remote(num_cpus=min(1.0, cpus / n_tasks), num_gpus=min(1.0, gpus / n_tasks) if gpus else 0)(
        _evaluate_task)
    log(f"evaluating {len(todo)} (set, net) pairs x {cfg.num_evals} nets with preset {cfg.eval_preset!r}")
    t0 = time.time()
    refs = {(m, net): task.remote(sets[m].out, sets[m].to_dict(), net, max(1, int(cpus // n_tasks)))
            for m, net in todo}
    if cov_todo:
        cov = ray.remote(num_cpus=min(1.0, cpus / n_tasks))(_coverage_task)
        refs.update({(m, "coverage"): cov.remote(sets[m].out, sets[m].to_dict()) for m in cov_todo})
    for (m, net), ref in refs.items():
        evals[m][net] = ray.get(ref)
    return evals, time.time() - t0


def _coverage_task(out: str, cfg_dict: dict) -> dict:
    import torch

    from raydistill.distill import coverage_of_set

    torch.set_num_threads(1)
    return coverage_of_set(DistillConfig.from_dict(cfg_dict), out)


def _track_set(c: DistillConfig, sampled: tuple[float, float, int], evals: dict, eval_secs: float, prev: dict,
               run) -> SetReport:
    """Stage 3: finish the set's MLflow run (params, metrics, artifacts), then write metrics.json next to the set;
    with no run (nothing changed) the set's stored results are reported as they are."""
    from raydistill.orchestration.results import current_evals, merged, teacher_net_param, write_results

    evals = dict(evals)
    content = merged(c, prev, sampled, evals, evals.pop("coverage", None), eval_secs)
    run_id = None
    if run is not None:
        text = json.dumps(content, indent=1)
        local = not is_uri(c.out)  # a set on an object store: its metrics.json is the MLflow run's only
        run.finish(content["metrics"], [Path(c.out) / "grid.png", Path(c.out) / "manifest.parquet"] if local else [],
                   {"metrics.json": text}, teacher_net_param(c, content))
        if local:
            write_results(c.out, content)
        run_id = run.run_id
    return SetReport(c.method, c.ipc, c.out, content["sampling"].get("images_per_s", 0.0),
                     content["sampling"].get("seconds_sample", 0.0), current_evals(c, content), run_id,
                     content["coverage"])


def format_table(reports: list[SetReport], preset: str, expected: dict | None = None) -> str:
    """The accuracy table; ``expected`` maps (method, net) to the table cell of its band (``reproduce.judge``)."""
    expected = expected or {}
    lines = [f"{'method':<10} {'IPC':>4} {'network':<10} {'accuracy (' + preset + ')':>20} {'images/s':>9} "
             f"{'coverage':>8} {'distance':>8}" + ("  expected" if expected else "")]
    for r in reports:
        rate = "real" if get_method(r.method).real is not None else f"{r.images_per_s:.2f}"
        cov = (f"{r.coverage['mode_coverage']:>8.2f} {r.coverage['mode_distance']:>8.2f}" if r.coverage
               else f"{'-':>8} {'-':>8}")
        if not r.evals:
            lines.append(f"{r.method:<10} {r.ipc:>4} {'-':<10} {'-':>20} {rate:>9} {cov}")
        for net, e in r.evals.items():
            acc = f"{e['reported_mean']:.2f} +- {e['reported_std']:.2f} (n={e['num_nets']})"
            band = f"  {expected[r.method, net]}" if (r.method, net) in expected else ""
            lines.append(f"{r.method:<10} {r.ipc:>4} {net:<10} {acc:>20} {rate:>9} {cov}{band}")
    return "\n".join(lines)
