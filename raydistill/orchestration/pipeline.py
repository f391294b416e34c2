"""Ray Data pipeline: class/noise shards stream through an actor pool of samplers; the driver commits each shard.

``ShardSampler`` is Ray's batch-inference pattern: it loads the DiT, VAE and guidance state once in ``__init__``
(on its GPU when it has one) and is mapped over batches of shards. Each output row is one image (PNG bytes plus its
manifest row); the driver groups rows by shard and commits a shard atomically when all its images have arrived, so
outputs need no shared filesystem and a killed job resumes at the first uncommitted shard. With
``cfg.write_from_workers`` the actors write the PNGs themselves where the set lives (a shared filesystem or an
object store, :mod:`raydistill.storage`), the rows carry no PNG bytes, and the driver commits only manifests.

Failures (docs/RELIABILITY.md): a sampler actor that dies (its process killed, its node lost) is restarted by Ray on
any node with room and the shard it was working on is retried there. That is Ray Data's default for actor pools
(``max_restarts=-1``, ``max_task_retries=-1`` in ``ActorPoolMapOperator._apply_default_remote_args``, Ray 2.60);
``map_batches`` has no named parameter for it and passing ``ray_remote_args`` is deprecated (warns, removed in
2.64), so the defaults are kept and ``tests/test_reliability.py`` proves them. A retried shard may reach the driver
twice: the driver keeps one row per image index and ignores shards it has already committed, so nothing is written
twice, and it never finalizes a set with a shard missing.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import numpy as np

from raydistill.config import DistillConfig
from raydistill.distill import DistillResult, plan_shards, selected_labels, write_grid
from raydistill.outputs import DistilledSetWriter, Shard
from raydistill.storage import SetStore, StoreSetWriter, is_uri


class ShardSampler:
    """Actor: holds a :class:`raydistill.distill.ShardRunner`; maps a batch of shards to one row per image.

    A UserError while loading (a truncated checkpoint, a VAE that does not fit) is kept and raised by the first
    batch: a failed constructor would make Ray Data restart the actor again and again (``max_restarts=-1``), a
    failed batch ends the dataset with the error, which :func:`raydistill.orchestration.runtime.user_error_in`
    turns back into the one line.
    """

    def __init__(self, cfg: dict, threads: int | None = None, write_to: str | None = None) -> None:
        import torch

        from raydistill.distill import ShardRunner
        from raydistill.errors import UserError

        if threads:
            torch.set_num_threads(threads)
        self.error: UserError | None = None
        self.store = None
        try:
            self.runner = ShardRunner(DistillConfig.from_dict(cfg))
            if write_to is not None:  # write_from_workers: this actor writes its shards' PNGs (raydistill.storage)
                self.store = SetStore(write_to)
        except UserError as e:
            self.error = e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        out: dict[str, list] = {"shard_id": [], "row": [], "png": []}
        for i in range(len(batch["shard_id"])):
            shard = Shard(str(batch["shard_id"][i]), int(batch["class_label"][i]),
                          [int(v) for v in batch["indices"][i]], [int(v) for v in batch["seeds"][i]])
            rows, pngs = self.runner.run(shard)
            if self.store is not None:  # the PNGs are in place: only the manifest rows travel to the driver
                rows, pngs = self.store.place_shard(shard.shard_id, rows, pngs), [b""] * len(rows)
            for row, png in zip(rows, pngs):
                out["shard_id"].append(shard.shard_id)
                out["row"].append(json.dumps(row))
                out["png"].append(png)
        return {"shard_id": np.array(out["shard_id"], dtype=object), "row": np.array(out["row"], dtype=object),
                "png": np.array(out["png"], dtype=object)}


def check_actor_resources(gpus_per_actor: float, cpus_per_actor: float) -> None:
    """UserError unless the per-actor resources are finite numbers a Ray actor may ask for."""
    from raydistill.errors import UserError

    for flag, v, low in (("--gpus-per-actor", gpus_per_actor, 0.0), ("cpus per actor", cpus_per_actor, 1e-4)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low):
            raise UserError(f"{flag} must be a finite number >= {low:g}, got {v}",
                            "pass e.g. --gpus-per-actor 1 (a whole GPU), 0.5 (two actors per GPU) or 0 (CPU)")


def distill_ray(cfg: DistillConfig, pool_size: int = 1, shard_size: int | None = None, gpus_per_actor: float = 0.0,
                cpus_per_actor: float = 0.5, threads_per_actor: int | None = None, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> DistillResult:
    """Distill ``cfg`` on the current Ray cluster (call inside :func:`raydistill.orchestration.runtime.ray_session`).

    ``shard_size`` images of one class form a shard (None: a whole class, as methods with per-class memory need).
    """
    import ray

    from raydistill.distill import open_dataset

    check_actor_resources(gpus_per_actor, cpus_per_actor)
    ds_meta = open_dataset(cfg)
    labels = selected_labels(cfg, ds_meta)
    if cfg.write_from_workers:
        writer = StoreSetWriter(cfg.out, cfg.fingerprint(), cfg.generation_key(), overwrite)
    else:
        writer = DistilledSetWriter(cfg.out, ds_meta.class_names, cfg.fingerprint(), cfg.generation_key(), overwrite)
    shards = plan_shards(cfg, labels, shard_size)
    todo = [s for s in shards if not writer.shard_done(s.shard_id)]
    t0, made = time.time(), 0
    if todo:
        items = [{**asdict(s), "indices": np.array(s.indices), "seeds": np.array(s.seeds, dtype=np.int64)}
                 for s in todo]
        data = ray.data.from_items(items, override_num_blocks=len(items))
        threads = threads_per_actor or max(1, int(round(cpus_per_actor)))
        # the set's absolute place (a relative path would resolve against each worker's own directory) or its URI
        write_to = (cfg.out if is_uri(cfg.out) else str(writer.out)) if cfg.write_from_workers else None
        mapped = data.map_batches(ShardSampler, fn_constructor_kwargs={"cfg": cfg.to_dict(), "threads": threads,
                                                                       "write_to": write_to},
                                  compute=ray.data.ActorPoolStrategy(size=pool_size), batch_size=1,
                                  num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, batch_format="numpy")
        # closing the iteration on any error (a full disk in commit, Ctrl-C) stops Ray Data's executor here, before
        # ray_session shuts Ray down: left running, its threads met a core worker already shut down (issue 25)
        with contextlib.closing(iter(mapped.iter_batches(batch_size=None, batch_format="numpy"))) as batches:
            made = _commit_arrivals(batches, writer, todo, len(shards), t0, progress)
    rows = writer.finalize()
    secs = time.time() - t0
    if not is_uri(cfg.out):  # a set on an object store gets its sample sheet where it is mounted / read
        write_grid(cfg.out, ds_meta)
    return DistillResult(writer.out, rows, secs, made / secs if made else 0.0, len(todo), len(shards) - len(todo))


def _commit_arrivals(batches: Iterator[dict], writer: DistilledSetWriter | StoreSetWriter, todo: list[Shard],
                     n_shards: int, t0: float, progress: Callable[[str], None] | None) -> int:
    """Commit each shard of ``todo`` once all its images (with ``write_from_workers``: all its manifest rows, the
    PNGs being in place) arrived; returns the images made.

    A shard that arrives again after its commit (its task was retried on a restarted actor) is ignored, and said so
    in one progress line."""
    expected = {s.shard_id: len(s.indices) for s in todo}
    pending: dict[str, dict[int, tuple[dict, bytes]]] = {}  # shard -> image index -> (row, png)
    retried: set[str] = set()
    made, committed = 0, n_shards - len(todo)
    for batch in batches:
        for sid, row, png in zip(batch["shard_id"], batch["row"], batch["png"]):
            sid, r = str(sid), json.loads(row)
            if sid not in expected:  # a retried shard's second copy after its commit
                if progress and sid not in retried:
                    progress(f"shard {sid} arrived again from a retried task (a sampler actor was restarted); "
                             "its committed copy is kept")
                retried.add(sid)
                continue
            pending.setdefault(sid, {})[int(r["index"])] = (r, bytes(png))
            if len(pending[sid]) == expected[sid]:
                by_index = pending.pop(sid)
                got = [by_index[k] for k in sorted(by_index)]
                del expected[sid]
                if isinstance(writer, StoreSetWriter):
                    writer.commit_rows(sid, [r for r, _ in got])
                else:
                    writer.commit(sid, [r for r, _ in got], [p for _, p in got])
                made += len(got)
                committed += 1
                if progress:
                    progress(f"shard {committed}/{n_shards} committed: {made / (time.time() - t0):.2f} images/s")
    if expected:  # never expected: Ray Data raises when a shard fails for good
        raise RuntimeError(f"the pipeline ended without shards {sorted(expected)[:5]}; rerun to resume")
    return made
