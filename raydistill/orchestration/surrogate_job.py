"""``raydistill surrogate`` on Ray: train IGD's surrogate trajectory in one Ray task (on a GPU when the cluster has
one), then run the gradient-similarity checkpoint selection and print the epochs it picks.

The task writes straight into the output folder (each epoch committed atomically, see
:mod:`raydistill.methods.igd.surrogate`), so the folder must be on storage the worker sees (a local path on a one-node
cluster, shared storage otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from raydistill.orchestration.runtime import ray_session


def _train(data: dict, out: str, cfg: dict, select: bool, grad_ipc: int, threads: int | None) -> dict:
    import torch

    from raydistill.data import load_dataset
    from raydistill.methods.igd.surrogate import SurrogateConfig, Trajectory, similarity_selection, train_trajectory

    if threads:
        torch.set_num_threads(threads)
    ds = load_dataset(**data)
    say = lambda m: print(f"surrogate: {m}", flush=True)  # noqa: E731  (Ray forwards worker stdout to the driver)
    train_trajectory(ds, out, SurrogateConfig(**cfg), progress=say)
    if not select:
        return {}
    traj = Trajectory(out, device="cuda" if torch.cuda.is_available() else "cpu")
    return similarity_selection(traj, ds, grad_ipc=grad_ipc, progress=say)


def run_surrogate_job(data: dict, out: str, cfg, select: bool = True, grad_ipc: int = 200,
                      address: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Train (resumably) and select checkpoints as one Ray task; returns the selection (``selection.json``)."""
    from pathlib import Path

    with ray_session(address):
        import ray

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # the CPUs of the largest node: a task cannot span nodes (the cluster total may never be schedulable)
        cpus = max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)))
        log(f"training the surrogate trajectory in {out} on {'a GPU' if gpus else f'{cpus} CPU(s)'}")
        task = ray.remote(num_gpus=gpus, num_cpus=1 if gpus else cpus)(_train)
        return ray.get(task.remote(data, str(Path(out).resolve()), asdict(cfg), select, grad_ipc,
                                   None if gpus else cpus))
