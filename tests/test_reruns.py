"""Reruns of the main job and the MLflow lifecycle (issue 25 items 2 and 7), on a real local Ray and sqlite MLflow.

- a rerun of a finished set writes nothing it does not change (metrics.json, manifest.parquet, grid.png, PNGs and
  run.json keep bytes and mtime), so it also works on a read-only root (a read-only bind mount in a private mount
  namespace: root ignores permission bits, not a read-only mount);
- evaluations accumulate keyed by (preset, net, seed, epochs), and ``images_per_s`` stays that of the run that
  sampled the images;
- a set's MLflow run starts when the job starts; a driver killed meanwhile leaves it RUNNING and the next run of the
  set marks it KILLED with a note; a failing job marks its runs FAILED; ``compare`` shows one row per set and
  evaluation protocol, the latest finished.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydistill.config import DistillConfig
from raydistill.errors import UserError
from tests.conftest import FMNIST_ROOT, needs_fmnist

pytestmark = needs_fmnist
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
F = str(FMNIST_ROOT)
ARGS = ["--data-root", F, "--classes", "0,1", "--ipc", "2", "--method", "random", "--baselines", "random",
        "--eval-epochs", "1", "--seed", "0"]


def _cfg(**kw) -> DistillConfig:
    """The config the CLI makes of ``ARGS`` (plus ``kw``); coverage off to keep the test short."""
    base = dict(data_root=F, classes=("0", "1"), ipc=2, method="random", baselines=("random",), eval_epochs=1,
                num_evals=1, seed=0, coverage=False)
    return DistillConfig(**{**base, **kw})


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _runs(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["raydistill"], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def ray_local():
    from raydistill.orchestration.runtime import ray_session

    with ray_session(num_cpus=2, num_gpus=0):
        yield


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory) -> tuple[Path, list, float]:
    """A finished, evaluated random set (dc, 1 epoch, 1 net): (root, reports, time the job was called)."""
    from raydistill.orchestration.distill_job import run_main_job

    root = tmp_path_factory.mktemp("reruns") / "runs"
    t0 = time.time()
    return root, run_main_job(_cfg(), root, log=lambda m: None), t0


def test_rerun_writes_nothing_and_results_accumulate(evaluated) -> None:
    from raydistill.orchestration.compare import collect_runs
    from raydistill.orchestration.distill_job import run_main_job

    root, first, _ = evaluated
    out = Path(first[0].out)
    m1 = json.loads((out / "metrics.json").read_text())
    assert list(m1["evals"]) == ["dc/convnet/seed0/1ep"] and m1["sampling"]["images_per_s"] > 0
    before = _snapshot(out)

    again = run_main_job(_cfg(num_evals=0), root, log=lambda m: None)  # the rerun: --num-evals 0
    assert _snapshot(out) == before  # every file: bytes and mtime (metrics.json keeps its accuracies)
    assert again[0].images_per_s == first[0].images_per_s  # not reset to 0.0
    assert again[0].evals["convnet"]["reported_mean"] == first[0].evals["convnet"]["reported_mean"]
    assert len(_runs(root)) == 1 and again[0].run_id is None  # nothing new: no MLflow run either

    run_main_job(_cfg(eval_epochs=2), root, log=lambda m: None)  # another protocol: added, not replacing
    m3 = json.loads((out / "metrics.json").read_text())
    assert sorted(m3["evals"]) == ["dc/convnet/seed0/1ep", "dc/convnet/seed0/2ep"]
    assert m3["evals"]["dc/convnet/seed0/1ep"] == m1["evals"]["dc/convnet/seed0/1ep"]
    assert m3["sampling"] == m1["sampling"]  # the images were not made again
    assert {k: v for k, v in _snapshot(out).items() if k != "metrics.json"} == \
        {k: v for k, v in before.items() if k != "metrics.json"}
    run_main_job(_cfg(eval_epochs=2), root, log=lambda m: None)  # the same again: reused, nothing written
    assert json.loads((out / "metrics.json").read_text()) == m3 and len(_runs(root)) == 2

    run_main_job(_cfg(num_evals=2), root, log=lambda m: None)  # dc/1ep with 2 nets: replaces that key's entry
    m5 = json.loads((out / "metrics.json").read_text())
    assert m5["evals"]["dc/convnet/seed0/1ep"]["num_nets"] == 2 and "dc/convnet/seed0/2ep" in m5["evals"]
    runs = _runs(root)
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    rows = collect_runs(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    # one row per set and protocol, the latest finished (dc/1 has two finished runs: only the 2-net one is shown)
    assert sorted((r["method"], r["eval"]) for r in rows) == [("random", "dc/1 2cls"), ("random", "dc/2 2cls")]
    assert [r["run_id"] for r in rows if r["eval"] == "dc/1 2cls"] == [runs["run_id"].iloc[-1]]


def test_run_starts_when_the_job_starts(evaluated) -> None:
    root, first, t0 = evaluated
    run = _runs(root).iloc[0]  # the first job's run
    start, end = run["start_time"].timestamp(), run["end_time"].timestamp()
    assert t0 - 1 <= start <= t0 + 5  # before Ray started and the set was sampled
    assert end - start >= run["metrics.seconds_sample"] + run["metrics.seconds_eval"] - 1


def test_a_failing_job_marks_its_runs_failed_with_the_error(ray_local, tmp_path: Path) -> None:
    """The evaluation task raises a UserError (an unknown net, past the CLI's preflight): the driver re-raises it
    as itself and marks the run FAILED, its note the error line."""
    from raydistill.orchestration.distill_job import run_main_job

    with pytest.raises(UserError, match="unknown evaluation net 'nosuch'"):
        run_main_job(_cfg(eval_nets=("nosuch",)), tmp_path / "runs", log=lambda m: None)
    runs = _runs(tmp_path / "runs")
    assert list(runs["status"]) == ["FAILED"]
    assert "unknown evaluation net 'nosuch'" in runs["tags.raydistill.note"].iloc[0]


def _statuses(db: Path) -> list[str]:
    """The runs' statuses, read with sqlite3 in read-only mode (MLflow's client would migrate a half-made database)."""
    import sqlite3

    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [r[0] for r in con.execute("select status from runs")]
    except sqlite3.Error:  # tables not made yet, or locked by the writer for a moment
        return []


def test_killed_driver_leaves_running_and_the_next_run_marks_it_killed(ray_local, tmp_path: Path) -> None:
    from raydistill.orchestration.distill_job import run_main_job

    root = tmp_path / "runs"
    db = root / "mlflow.db"
    proc = subprocess.Popen([sys.executable, "-m", "raydistill", "distill", *ARGS, "--num-evals", "0", "--root",
                             str(root)], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and _statuses(db) != ["RUNNING"]:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    stale = _runs(root)
    assert list(stale["status"]) == ["RUNNING"]  # killed: nobody ended it

    reports = run_main_job(_cfg(), root, log=lambda m: None)
    runs = _runs(root).set_index("run_id")
    old = runs.loc[stale["run_id"].iloc[0]]
    assert old["status"] == "KILLED"
    assert old["tags.raydistill.note"].endswith(f"superseded by run {reports[0].run_id}")
    assert runs.loc[reports[0].run_id, "status"] == "FINISHED"
    assert old["tags.raydistill.set_id"] == runs.loc[reports[0].run_id, "tags.raydistill.set_id"]


def test_finished_set_reruns_on_a_read_only_root(evaluated) -> None:
    """The same command on a read-only bind mount of the root (writes fail with EROFS, even for root): exit 0,
    the table with the stored accuracy, and the root byte-identical."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unshare / user+mount namespaces: cannot make a private read-only mount")
    root = evaluated[0]
    before = _snapshot(root)
    cli = [sys.executable, "-m", "raydistill", "distill", *ARGS, "--num-evals", "0", "--root", str(root)]
    script = (f"mount --bind {root} {root} && mount -o remount,bind,ro {root} && "
              f"! touch {root}/probe 2>/dev/null && exec {' '.join(cli)}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=root.parent, env=ENV, capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "random" in p.stdout and "+-" in p.stdout  # the stored accuracy is reported
    assert _snapshot(root) == before
