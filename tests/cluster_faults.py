"""Driver for tests/test_reliability.py: a three-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``),
then two distillations on it, one losing a sampler actor's process and one losing a whole worker node after the
first shard is committed. Writes ``<root>/{actor,node}/`` (the sets) and ``<root>/report.json`` (what happened).

``python -m tests.cluster_faults ROOT DIT VAE``
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from raydistill.config import DistillConfig

FMNIST = "/usr/share/datasets/fashion-mnist"


def fault_cfg(dit: str | Path, vae: str | Path, out: Path) -> DistillConfig:
    """3 classes x IPC 2 with the tiny model: six one-image shards."""
    return DistillConfig(data_root=FMNIST, model=str(dit), vae=str(vae), classes=("0", "1", "2"), ipc=2, steps=60,
                         batch_size=2, out=str(out))


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _samplers(nodes: list) -> dict[int, list[int]]:
    """Sampler actor processes per node (raylet pid -> pids): the node's workers whose title names ShardSampler."""
    found: dict[int, list[int]] = {}
    for node in nodes:
        pid = _raylet_pid(node)
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "ShardSampler" in " ".join(child.cmdline()):
                    found.setdefault(pid, []).append(child.pid)
            except psutil.Error:
                pass
    return found


def _run(cfg: DistillConfig, on_first_commit: Callable[[], None]) -> dict:
    from raydistill.orchestration.pipeline import distill_ray

    commits: list[str] = []

    def progress(msg: str) -> None:
        commits.append(msg)
        if len(commits) == 1:
            on_first_commit()

    res = distill_ray(cfg, pool_size=2, shard_size=1, cpus_per_actor=1.0, threads_per_actor=1, progress=progress)
    return {"shards_run": res.shards_run, "commits_before_kill": 1 if commits else 0}


def _listening(nodes: list) -> list[str]:
    pids = {os.getpid()}
    for node in nodes:
        for procs in node.all_processes.values():
            for info in procs:
                if info.process.poll() is None:
                    pids.add(info.process.pid)
                    pids.update(c.pid for c in psutil.Process(info.process.pid).children(recursive=True))
    return sorted({c.laddr.ip for c in psutil.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and c.pid in pids})


def main(root: Path, dit: str, vae: str) -> dict:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this test cluster only; its ports stay on loopback (checked below)
    from raydistill.orchestration.runtime import apply_loopback_env, ray_session

    apply_loopback_env()
    import ray
    from ray.cluster_utils import Cluster

    args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 ** 2}
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    report: dict = {}
    try:
        workers = [cluster.add_node(**args) for _ in range(2)]
        cluster.wait_for_nodes()
        with ray_session(address=cluster.address):
            report["listening"] = _listening([cluster.head_node, *workers])
            actor: dict = {}

            def kill_actor() -> None:  # SIGKILL one sampler's process: it dies mid-shard or between shards
                found = _samplers([cluster.head_node, *workers])
                actor["nodes_with_samplers"] = len(found)
                actor["killed"] = next(iter(found.values()))[0]
                psutil.Process(actor["killed"]).kill()

            actor.update(_run(fault_cfg(dit, vae, root / "actor"), kill_actor))
            report["actor"] = actor
            node: dict = {}

            def remove_node() -> None:  # a worker node hosting a sampler; never the head, which holds the driver
                found = _samplers(workers)
                victim = next((w for w in workers if _raylet_pid(w) in found), None)
                node["removed_node_had_sampler"] = victim is not None
                cluster.remove_node(victim or workers[0], allow_graceful=False)

            node.update(_run(fault_cfg(dit, vae, root / "node"), remove_node))
            # the GCS marks a removed node dead after its health checks fail (seconds; longer on a loaded machine),
            # which can be after the retried run has already finished
            deadline = time.monotonic() + 120
            while (alive := sum(1 for n in ray.nodes() if n["Alive"])) > 2 and time.monotonic() < deadline:
                time.sleep(1)
            node["alive_nodes_after"] = alive
            report["node"] = node
    finally:
        cluster.shutdown()
    (root / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])))
