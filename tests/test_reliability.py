"""Fault tolerance on real Ray, real files and real parquet (docs/RELIABILITY.md lists what each test proves).

- the driver (``raydistill distill`` as a subprocess) is SIGKILLed after some shards are committed; the same command
  rerun resumes without redoing them and gives the same bytes as an uninterrupted run;
- (tests/test_reliability_cluster.py: a sampler actor killed and a node removed mid-run on a three-node cluster;)
- a full disk (ENOSPC injected at a write point while shards are in flight) is one line, exit 2, committed shards
  intact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from raydistill.outputs import shards_dir, sidecar
from tests.conftest import FMNIST_ROOT, needs_fmnist
from tests.set_checks import ENV, REPO, check_complete, set_tree

pytestmark = needs_fmnist
F = str(FMNIST_ROOT)


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
    from raydistill.config import DistillConfig
    from raydistill.distill import distill_local

    ref, out = tmp_path / "ref", tmp_path / "killed"
    run = {"cwd": tmp_path, "env": ENV, "capture_output": True, "text": True, "timeout": 400}  # cwd: MLflow's ./mlruns
    # the uninterrupted run, in-process: the same settings as _cli's (run.json, the fingerprint of the settings, is
    # compared below); a Ray run of the same config writes the same bytes (test_orchestration), so this saves a
    # third cold CLI start (~35 s) and proves nothing less
    distill_local(DistillConfig(data_root=F, model=str(tiny_model[0]), vae=str(tiny_model[1]), classes=("0", "1", "2"),
                                ipc=2, steps=120, out=str(ref)), shard_size=1)

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
    check_complete(out, classes=3, ipc=2)
    assert set_tree(out) == set_tree(ref)


# ---------------------------------------------------------------------------------------------------------------------
# a full disk while shards are still in flight on Ray (tests/enospc.py: ENOSPC injected at one write point of the
# driver's commits, deterministic; the tiny tmpfs this replaced raced Ray Data's executor against ray.shutdown)

@pytest.mark.parametrize("point", ["staged png", "shard rename"])
def test_full_disk_is_one_line_and_keeps_committed_shards(tmp_path: Path, point: str) -> None:
    from raydistill.outputs import committed_damage

    out = tmp_path / "set"
    cli = [sys.executable, str(REPO / "tests" / "enospc.py"), point, "3", "distill", "--data-root", F, "--method",
           "random", "--classes", "0,1,2", "--ipc", "4", "--shard-size", "1", "--pool-size", "2", "--num-evals",
           "0", "--baselines", "random", "--root", str(tmp_path / "runs"), "--out", str(out)]
    p = subprocess.run(cli, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    ours = [line for line in p.stderr.splitlines() if line.startswith("raydistill: error: ")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert ours == [p.stderr.splitlines()[-1]] and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "core worker" not in p.stderr, p.stderr[-3000:]
    assert re.search(r"no space left on the device of .*/set .*rerun the same command", ours[0]), ours[0]
    assert "enospc hits: 1" in p.stdout  # the driver stopped at the first failing write
    assert len(list(shards_dir(out).glob("*.parquet"))) == 2  # the two shards committed before are kept ...
    assert committed_damage(out) is None  # ... intact: every PNG matches its sha256
    debris = [str(x) for d in (out, sidecar(out)) for x in d.rglob("*") if ".tmp" in x.name]
    assert debris == [] and not list((sidecar(out) / "staging").glob("*/*")), debris  # no half-written shard


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


def test_new_sqlite_store_is_seeded_with_mlflows_own_schema_and_an_existing_one_is_untouched(tmp_path: Path,
                                                                                              monkeypatch) -> None:
    import sqlite3

    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from raydistill.orchestration.tracking import EXPERIMENT, seed_sqlite_store, set_experiment

    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "cache"))

    def schema(db: Path) -> tuple:
        con = sqlite3.connect(db)
        try:
            rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
            # the lines of each statement as a set: MLflow's migrations order a table's constraints differently
            # from one run to the next
            lines = [(t, n, sorted(x.strip().rstrip(",") for x in (sql or "").splitlines())) for t, n, sql in rows]
            return (sorted(lines),
                    con.execute("SELECT version_num FROM alembic_version").fetchall())
        finally:
            con.close()

    made = tmp_path / "made" / "mlflow.db"  # what MLflow itself builds, migrations and all
    made.parent.mkdir()
    SqlAlchemyStore(f"sqlite:///{made}", (tmp_path / "made").as_uri()).engine.dispose()

    db = tmp_path / "runs" / "mlflow.db"
    db.parent.mkdir()
    exp = set_experiment(f"sqlite:///{db}")
    assert exp.name == EXPERIMENT
    assert schema(db) == schema(made)
    assert (tmp_path / "cache" / f"mlflow-{mlflow.__version__}-empty.db").is_file()
    default = mlflow.get_experiment("0")
    assert default.name == "Default" and default.artifact_location == (db.parent / "mlartifacts" / "0").as_uri()
    with mlflow.start_run(experiment_id=exp.experiment_id):
        mlflow.log_metric("acc", 0.5)
    assert [r.data.metrics for r in mlflow.search_runs([exp.experiment_id], output_format="list")] == [{"acc": 0.5}]
    assert [p.name for p in db.parent.iterdir()] == ["mlflow.db"]  # no temporary file left beside it

    before = db.read_bytes()
    seed_sqlite_store(db)  # an existing store is never replaced
    assert db.read_bytes() == before
