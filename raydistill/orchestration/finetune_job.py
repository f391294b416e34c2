"""``raydistill finetune`` on Ray: the Minimax DiffFit fine-tune (spec 1.2-1.5) as one Ray task per phase, all in
flight at once, each on its own GPU when the cluster has GPUs, with the loss curves in MLflow.

Spec 1.5 fine-tunes one model per phase of 10 classes; the phases share nothing (each loads the base model and seeds
its data order and noise from (seed, phase, step)), so they run side by side and give the same weights as in
sequence. The driver writes the unfinished index (``minimax.json``), starts a task for every phase that is not
committed (``finetune.phase_done``: its ``ema.safetensors``, renamed into place last), waits for all of them and marks
the index complete. A rerun therefore redoes only the missing phases, and an interrupted phase continues from its
``state.pt``. ``--out`` must be storage that the driver and every worker see (one disk, or NFS on a cluster).

MLflow: the driver opens (or, on a rerun of the same output folder, reopens) one run; every task logs its phase's
averaged losses every ``log_every`` steps into it with :func:`raydistill.orchestration.tracking.log_step_metrics`
(step = training step; with several phases the names carry a ``phaseNN_`` prefix), plus ``phaseNN_seconds``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from raydistill.orchestration.runtime import ray_session

RUN_FILE = "mlflow_run.json"


def _phase_task(data: dict, vae: str, out: str, index: dict, p: int, cfg: dict, tracking: dict | None,
                threads: int | None) -> dict:
    """Fine-tune phase ``p``; returns what happened, with the task's own time window (``start``/``end``, epoch s)."""
    import os
    import time

    start = time.time()
    import torch

    from raydistill.data import load_dataset
    from raydistill.methods.minimax.finetune import FinetuneConfig, finetune_phase
    from raydistill.orchestration.tracking import log_step_metrics, phase_prefix

    if threads:
        torch.set_num_threads(threads)
    ds = load_dataset(**data)
    say = lambda m: print(f"finetune: {m}", flush=True)  # noqa: E731  (Ray forwards worker stdout to the driver)
    pre = phase_prefix(p, len(index["phases"]))
    on_metrics = None
    if tracking is not None:
        def on_metrics(m: dict[str, float], step: int) -> None:
            log_step_metrics(tracking["uri"], tracking["run_id"], {pre + k: v for k, v in m.items()}, step)

    trained = finetune_phase(ds, vae, out, index, p, FinetuneConfig(**cfg), progress=say, on_metrics=on_metrics)
    end = time.time()
    if tracking is not None and trained:
        log_step_metrics(tracking["uri"], tracking["run_id"], {f"{pre}seconds": end - start}, 0)
    return {"phase": p, "trained": trained, "start": start, "end": end, "pid": os.getpid()}


def _open_run(tracking_uri: str, out_p: Path, name: str, params: dict[str, str]) -> str:
    """The MLflow run of the fine-tune in ``out_p``: the one a previous run of this folder made, else a new one."""
    import mlflow

    from raydistill.orchestration.tracking import _quiet, set_experiment

    _quiet()
    exp = set_experiment(tracking_uri)
    client = mlflow.tracking.MlflowClient(tracking_uri)
    saved = out_p / RUN_FILE
    if saved.exists():  # a rerun resumes the fine-tune and continues its MLflow run
        prev = json.loads(saved.read_text())
        if prev.get("tracking_uri") == tracking_uri:
            client.update_run(prev["run_id"], status="RUNNING")
            return prev["run_id"]
    run = client.create_run(exp.experiment_id, run_name=f"finetune-{name}",
                            tags={"raydistill.kind": "finetune", "raydistill.out": str(out_p)})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v[:6000])
    saved.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run.info.run_id}))
    return run.info.run_id


def run_finetune_job(data: dict, dit: str, vae: str, model_size: str | None, out: str, cfg, labels: list[int],
                     params: dict[str, str], tracking_uri: str | None = None, address: str | None = None,
                     log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Fine-tune (resumably) with one Ray task per unfinished phase, all at once, tracked in MLflow.

    Returns the index (minimax.json) and one report per phase: ``phase``, ``trained`` (False: it was committed
    before, no task ran), and for a task its ``start``/``end`` (epoch seconds, taken inside the task) and ``pid``.
    Each task asks for one GPU when the cluster has one, else for a 1/(number of phases) share of the largest
    node's CPUs (at least one, torch threads to match).
    """
    from raydistill.data import load_dataset
    from raydistill.methods.minimax.finetune import close_finetune, open_finetune, phase_done

    out_p = Path(out).resolve()
    index = open_finetune(load_dataset(**data), Path(dit).resolve(), Path(vae).resolve(), out_p, cfg, labels,
                          model_size)
    n = len(index["phases"])
    tracking = None
    if tracking_uri:
        tracking = {"uri": tracking_uri, "run_id": _open_run(tracking_uri, out_p, data["name"], params)}
        log(f"MLflow run {tracking['run_id']} at {tracking_uri}")
    todo = [p for p in range(n) if not phase_done(out_p, index, p)]
    reports = {p: {"phase": p, "trained": False} for p in range(n) if p not in todo}
    if reports:
        log(f"phases {sorted(reports)} already done")
    if todo:
        with ray_session(address):
            import ray

            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            # a task cannot span nodes: share the CPUs of the largest node among all the phases (at least one
            # each), counting the finished ones too, so a phase redone on a rerun gets the same threads (and bits)
            node_cpus = max(1, int(max((nd["Resources"].get("CPU", 0) for nd in ray.nodes() if nd.get("Alive")),
                                       default=1)))
            cpus = 1 if gpus else max(1, node_cpus // n)
            log(f"fine-tuning {len(todo)} phase(s) of {n} into {out_p}, one Ray task each on "
                f"{'a GPU' if gpus else f'{cpus} CPU(s)'}")
            task = ray.remote(num_gpus=gpus, num_cpus=cpus)(_phase_task)
            refs = [task.remote(data, str(Path(vae).resolve()), str(out_p), index, p, asdict(cfg), tracking,
                                None if gpus else cpus) for p in todo]
            reports.update({r["phase"]: r for r in ray.get(refs)})
    index = close_finetune(out_p, index)
    if tracking is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        client.set_terminated(tracking["run_id"], "FINISHED")
        client.log_artifact(tracking["run_id"], str(out_p / "minimax.json"))
    return index, [reports[p] for p in range(n)]
