"""``raydistill finetune`` on Ray: the Minimax DiffFit fine-tune (spec 1.2-1.5) as one Ray task, on a GPU when the
cluster has one, with the loss curves in MLflow.

The driver opens (or, on a rerun of the same output folder, reopens) an MLflow run and passes its id to the task;
the task logs the averaged losses every ``log_every`` steps with ``MlflowClient`` (step = training step, one metric
prefix per phase when there are several). The task writes straight into the output folder (``state.pt`` every
``ckpt_every`` steps, so rerunning the command resumes), which must be storage the worker sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from raydistill.orchestration.runtime import ray_session

RUN_FILE = "mlflow_run.json"


def _finetune_task(data: dict, dit: str, vae: str, model_size: str | None, out: str, cfg: dict,
                   labels: list[int] | None, tracking: dict | None, threads: int | None) -> dict:
    import torch

    from raydistill.data import load_dataset
    from raydistill.methods.minimax.finetune import FinetuneConfig, finetune

    if threads:
        torch.set_num_threads(threads)
    ds = load_dataset(**data)
    say = lambda m: print(f"finetune: {m}", flush=True)  # noqa: E731  (Ray forwards worker stdout to the driver)
    on_metrics = None
    if tracking is not None:
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking["uri"])

        def on_metrics(m: dict[str, float], step: int, phase: int) -> None:
            pre = "" if tracking["phases"] == 1 else f"phase{phase:02d}_"
            now = int(time.time() * 1000)
            client.log_batch(tracking["run_id"], metrics=[Metric(pre + k, float(v), now, step) for k, v in m.items()])

    return finetune(ds, dit, vae, out, FinetuneConfig(**cfg), labels=labels, model_size=model_size,
                    progress=say, on_metrics=on_metrics)


def run_finetune_job(data: dict, dit: str, vae: str, model_size: str | None, out: str, cfg, labels: list[int],
                     n_phases: int, params: dict[str, str], tracking_uri: str | None = None,
                     address: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Fine-tune (resumably) as one Ray task and track it in MLflow; returns the fine-tune index (minimax.json)."""
    from raydistill.orchestration.tracking import _quiet

    out_p = Path(out).resolve()
    out_p.mkdir(parents=True, exist_ok=True)
    tracking = None
    if tracking_uri:
        import mlflow

        _quiet()
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment("raydistill")
        client = mlflow.tracking.MlflowClient(tracking_uri)
        run_id = None
        saved = out_p / RUN_FILE
        if saved.exists():  # a rerun resumes the fine-tune and continues its MLflow run
            prev = json.loads(saved.read_text())
            if prev.get("tracking_uri") == tracking_uri:
                run_id = prev["run_id"]
                client.update_run(run_id, status="RUNNING")
        if run_id is None:
            run = client.create_run(mlflow.get_experiment_by_name("raydistill").experiment_id,
                                    run_name=f"finetune-{data['name']}", tags={"raydistill.kind": "finetune",
                                                                               "raydistill.out": str(out_p)})
            run_id = run.info.run_id
            for k, v in params.items():
                client.log_param(run_id, k, v[:6000])
            saved.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}))
        tracking = {"uri": tracking_uri, "run_id": run_id, "phases": n_phases}
        log(f"MLflow run {run_id} at {tracking_uri}")
    with ray_session(address):
        import ray

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # the CPUs of the largest node: a task cannot span nodes, so asking for the cluster total (e.g. 3 CPUs on a
        # 2 + 1 CPU cluster) would never be scheduled
        cpus = max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)))
        log(f"fine-tuning into {out_p} on {'a GPU' if gpus else f'{cpus} CPU(s)'}")
        task = ray.remote(num_gpus=gpus, num_cpus=1 if gpus else cpus)(_finetune_task)
        index = ray.get(task.remote(data, str(Path(dit).resolve()), str(Path(vae).resolve()), model_size, str(out_p),
                                    asdict(cfg), labels, tracking, None if gpus else cpus))
    if tracking is not None:
        client.set_terminated(tracking["run_id"], "FINISHED")
        client.log_artifact(tracking["run_id"], str(out_p / "minimax.json"))
    return index
