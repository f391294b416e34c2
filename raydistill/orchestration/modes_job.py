"""MGD3 mode discovery as Ray tasks, one per class (``raydistill modes``, and the first stage of mgd3 runs).

Each task opens the dataset, loads the VAE and runs :func:`raydistill.methods.mgd3.guidance.class_modes_loader` for its
class, which encodes the class's training images and clusters them into the mode cache. The samplers then find every
class's modes in the cache. The cache must be on storage all nodes see (it sits next to the output sets).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from raydistill.config import DistillConfig


def _class_modes_task(cfg_dict: dict, label: int, threads: int) -> tuple[int, float]:
    import torch

    from raydistill.distill import open_dataset, selected_labels
    from raydistill.generator import resolve_model_paths
    from raydistill.methods.mgd3.guidance import class_modes_loader
    from raydistill.models.vae import load_vae

    torch.set_num_threads(threads)
    t0 = time.time()
    cfg = DistillConfig.from_dict(cfg_dict)
    ds = open_dataset(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_vae(resolve_model_paths(cfg)[1], image_size=ds.image_size, device=device)
    class_modes_loader(cfg, ds, codec, selected_labels(cfg, ds))(label)
    return label, time.time() - t0


def discover_modes_ray(cfg: DistillConfig, log: Callable[[str], None] = print) -> float:
    """Fill the mode cache of ``cfg`` with one Ray task per selected class (in a running Ray); returns seconds."""
    import ray

    from raydistill.distill import open_dataset, selected_labels

    labels = selected_labels(cfg, open_dataset(cfg))
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1), res.get("GPU", 0)
    per_task_gpu = min(1.0, gpus / len(labels)) if gpus else 0
    task = ray.remote(num_cpus=1, num_gpus=per_task_gpu)(_class_modes_task)
    t0 = time.time()
    refs = [task.remote(cfg.to_dict(), c, 1 if len(labels) > 1 else max(1, int(cpus))) for c in labels]
    pending = list(refs)
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        label, secs = ray.get(ready[0])
        done += 1
        log(f"[modes] class {label}: {secs:.1f} s ({done}/{len(labels)})")
    return time.time() - t0


def run_modes_job(cfg: DistillConfig, address: str | None = None, log: Callable[[str], None] = print) -> float:
    from raydistill.orchestration.runtime import ray_session

    with ray_session(address):
        return discover_modes_ray(cfg, log)
