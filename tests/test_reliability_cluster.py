"""Fault tolerance on a three-node loopback cluster (``ray.cluster_utils.Cluster``, run by tests/cluster_faults.py):
a sampler actor's process is killed, then a whole node is removed, mid-run; the set completes, exactly IPC images
per class, no duplicates, checksums valid, the same bytes as an uninterrupted run; every node listens on loopback only.

Its own module so that pytest-xdist (``--dist loadfile``) can run it on one worker while tests/test_reliability.py's
SIGKILL test runs on another: together they were the suite's slowest module (docs/RELIABILITY.md section 5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import needs_fmnist
from tests.set_checks import ENV, check_complete, set_tree

pytestmark = needs_fmnist
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

# ---------------------------------------------------------------------------------------------------------------------
# a three-node cluster on loopback: an actor killed, then a node removed, mid-run (tests/cluster_faults.py, run as
# its own driver process: a Ray driver inside pytest hung connecting to a ray.cluster_utils.Cluster here)

@pytest.fixture(scope="module")
def faults(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("faults")
    cmd = [sys.executable, "-m", "tests.cluster_faults", str(root), str(tiny_model[0]), str(tiny_model[1])]
    p = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return root, json.loads((root / "report.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> dict[str, bytes]:
    from raydistill.distill import distill_local
    from tests.cluster_faults import fault_cfg

    out = tmp_path_factory.mktemp("ref") / "set"
    distill_local(fault_cfg(tiny_model[0], tiny_model[1], out), shard_size=1)
    return set_tree(out)


def test_sampler_actor_killed_mid_run_is_retried(faults, reference) -> None:
    root, report = faults
    r = report["actor"]
    assert r["killed"] and not psutil.pid_exists(r["killed"])
    assert r["nodes_with_samplers"] == 2  # the two samplers ran on two different nodes
    assert r["shards_run"] == 6 and r["commits_before_kill"] == 1  # killed with 5 of 6 shards still to do
    check_complete(root / "actor", classes=3, ipc=2)
    assert set_tree(root / "actor") == reference  # same bytes as an uninterrupted in-process run


def test_node_removed_mid_run_is_retried_on_the_rest(faults, reference) -> None:
    root, report = faults
    r = report["node"]
    assert r["removed_node_had_sampler"] and r["alive_nodes_after"] == 2
    assert r["shards_run"] == 6 and r["commits_before_kill"] == 1
    check_complete(root / "node", classes=3, ipc=2)
    assert set_tree(root / "node") == reference


def test_cluster_nodes_listen_on_loopback_only(faults) -> None:
    _, report = faults
    assert report["listening"] and set(report["listening"]) <= LOOPBACK, report["listening"]
