"""Fault tolerance on real Ray, real files and real parquet (docs/RELIABILITY.md lists what each test proves).

- the driver (``raydistill distill`` as a subprocess) is SIGKILLed after some shards are committed; the same command
  rerun resumes without redoing them and gives the same bytes as an uninterrupted run;
- on a three-node loopback cluster (``ray.cluster_utils.Cluster``) a sampler actor's process is killed, then a whole
  node is removed, mid-run: the set completes, exactly IPC images per class, no duplicates, checksums valid;
- a full disk (a 48 KiB tmpfs in a private mount namespace) is one line, exit 2, committed shards intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from raydistill.outputs import read_manifest, shards_dir, sidecar, verify_set
from tests.conftest import FMNIST_ROOT, needs_fmnist

pytestmark = needs_fmnist
REPO = Path(__file__).resolve().parents[1]
F = str(FMNIST_ROOT)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_USAGE_STATS_ENABLED": "0"}


def _session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, psutil.Error, PermissionError):
            pass
    return out


def _end_session(sid: int) -> None:
    """Kill what is left of a process session this test started (its Ray raylet, GCS, workers), by pid."""
    for p in _session_procs(sid):
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(_session_procs(sid), timeout=20)


def _tree(out: Path) -> dict[str, bytes]:
    """The set's content: every PNG, grid.png, run.json, and the manifest rows without their timing column."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.png"))}
    files.update({n: (out / n).read_bytes() for n in ("grid.png", "run.json")})
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_manifest(out)]
    files["manifest rows"] = json.dumps(rows, sort_keys=True).encode()
    return files


def _check_complete(out: Path, classes: int, ipc: int) -> list[dict]:
    """Exactly ``ipc`` images per class, no duplicate (class, index) or path, every PNG matching its sha256."""
    rows = read_manifest(out)
    keys = [(r["label"], r["index"]) for r in rows]
    assert sorted(keys) == [(c, k) for c in range(classes) for k in range(ipc)], keys
    assert len({r["path"] for r in rows}) == len(rows)
    assert len(list(out.glob("*/*.png"))) == classes * ipc  # no stray PNGs beside the manifest's
    assert verify_set(out) == []
    assert not sidecar(out).exists()  # no staging, shard or temporary file is left once the set is finished
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# the driver killed with SIGKILL, then the same command rerun

def _cli(tmp: Path, tiny, out: Path) -> list[str]:
    dit, vae = tiny
    return [sys.executable, "-m", "raydistill.cli", "distill", "--data-root", F, "--model", str(dit), "--vae", str(vae),
            "--classes", "0,1,2", "--ipc", "2", "--steps", "120", "--baselines", "dit", "--num-evals", "0",
            "--pool-size", "1", "--shard-size", "1", "--root", str(tmp / "runs"), "--out", str(out)]


def _committed(out: Path) -> dict[str, tuple[int, int]]:
    """The PNGs of the committed shards (in the sidecar): path -> (inode, mtime_ns); a rewrite changes both."""
    import pyarrow.parquet as pq

    stats = {r["path"]: (out / r["path"]).stat() for f in sorted(shards_dir(out).glob("*.parquet"))
             for r in pq.read_table(f).to_pylist()}
    return {k: (s.st_ino, s.st_mtime_ns) for k, s in stats.items()}


def test_driver_sigkill_then_rerun_resumes_byte_identical(tiny_model, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run = {"cwd": tmp_path, "env": ENV, "capture_output": True, "text": True, "timeout": 400}  # cwd: MLflow's ./mlruns
    p = subprocess.run(_cli(tmp_path, tiny_model, ref), **run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "6 shards run, 0 resumed" in p.stdout

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(_cli(tmp_path, tiny_model, out), cwd=tmp_path, env=ENV, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(list(shards_dir(out).glob("*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _end_session(proc.pid)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    before = _committed(out)
    done = len(list(shards_dir(out).glob("*.parquet")))
    assert 2 <= done < 6, f"{done} shards committed when killed: the kill did not land mid-run"
    assert not (out / "manifest.parquet").exists()

    p = subprocess.run(_cli(tmp_path, tiny_model, out), **run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{6 - done} shards run, {done} resumed" in p.stdout  # the driver's own count of shards it made
    after = {k: (v.st_ino, v.st_mtime_ns) for k, v in ((k, (out / k).stat()) for k in before)}
    assert {k: after[k] for k in before} == before  # the finished shards' PNGs were not rewritten
    _check_complete(out, classes=3, ipc=2)
    assert _tree(out) == _tree(ref)


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
    return _tree(out)


def test_sampler_actor_killed_mid_run_is_retried(faults, reference) -> None:
    root, report = faults
    r = report["actor"]
    assert r["killed"] and not psutil.pid_exists(r["killed"])
    assert r["nodes_with_samplers"] == 2  # the two samplers ran on two different nodes
    assert r["shards_run"] == 6 and r["commits_before_kill"] == 1  # killed with 5 of 6 shards still to do
    _check_complete(root / "actor", classes=3, ipc=2)
    assert _tree(root / "actor") == reference  # same bytes as an uninterrupted in-process run


def test_node_removed_mid_run_is_retried_on_the_rest(faults, reference) -> None:
    root, report = faults
    r = report["node"]
    assert r["removed_node_had_sampler"] and r["alive_nodes_after"] == 2
    assert r["shards_run"] == 6 and r["commits_before_kill"] == 1
    _check_complete(root / "node", classes=3, ipc=2)
    assert _tree(root / "node") == reference


def test_cluster_nodes_listen_on_loopback_only(faults) -> None:
    _, report = faults
    assert report["listening"] and set(report["listening"]) <= LOOPBACK, report["listening"]


# ---------------------------------------------------------------------------------------------------------------------
# a full disk: a tiny tmpfs in a private mount namespace (unshare; nothing is mounted on the host)

CHECK = """
import json, sys
from pathlib import Path
from raydistill.outputs import committed_damage
out = Path(sys.argv[1])
debris = [str(p) for p in out.rglob("*") if ".tmp" in p.name] + [str(p) for p in (out / ".staging").glob("*")]
print(json.dumps({"shards": len(list((out / ".shards").glob("*.parquet"))), "damage": committed_damage(out),
                  "debris": debris}))
"""


def test_full_disk_is_one_line_and_keeps_committed_shards(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unshare / user+mount namespaces: cannot mount a private tmpfs without touching the host")
    disk = tmp_path / "disk"
    disk.mkdir()
    cli = [sys.executable, "-m", "raydistill.cli", "distill", "--data-root", F, "--method", "random", "--classes",
           "0,1,2", "--ipc", "4", "--shard-size", "1", "--num-evals", "0", "--root", str(tmp_path / "runs"),
           "--out", str(disk / "set")]
    script = (f"mount -t tmpfs -o size=48k tmpfs {disk} && {' '.join(cli)} 2>{tmp_path / 'err'}; "
              f"echo rc=$?; {sys.executable} -c '{CHECK}' {disk / 'set'}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=400)
    rc = int(re.search(r"rc=(\d+)", p.stdout).group(1))
    state = json.loads(p.stdout.strip().splitlines()[-1])
    err = (tmp_path / "err").read_text()
    ours = [line for line in err.splitlines() if line.startswith("raydistill: error: ")]
    assert rc == 2, err[-3000:]
    assert ours == [err.splitlines()[-1]] and "Traceback" not in err, err[-3000:]
    assert re.search(r"no space left on the device of .*disk/set .*rerun the same command", ours[0]), ours[0]
    assert 0 < state["shards"] < 12  # some shards were committed before the disk filled up
    assert state["damage"] is None  # ... and they are intact: every PNG matches its sha256
    assert state["debris"] == []  # the half-written shard left no staging or temporary files
    assert not disk.joinpath("set").exists()  # the tmpfs was private to the namespace


# ---------------------------------------------------------------------------------------------------------------------
# MLflow: a file store under the output root, no server, no listening socket

def test_mlflow_default_store_is_a_file_and_listens_nowhere(tmp_path: Path) -> None:
    from raydistill.orchestration.tracking import SetRun, default_tracking_uri

    def listening() -> set:
        me = psutil.Process()
        return {(p.pid, c.laddr) for p in [me, *me.children(recursive=True)] for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}

    uri = default_tracking_uri(tmp_path / "runs")
    assert uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    before = listening()  # (a Ray driver of another test in this process may hold loopback ports)
    run = SetRun(uri, tmp_path / "set", "probe", {"ipc": "1"}, {}, time.time())
    run.finish({"acc": 1.0}, [], {})
    during = listening()
    assert during - before == set()
    assert (tmp_path / "runs" / "mlflow.db").stat().st_size > 0
