"""`ray start --head` on 127.0.0.1, `ray job submit jobs/distill.py` on a tiny config, check outputs, `ray stop`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import needs_fmnist

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = needs_fmnist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: str, client: bool) -> dict[str, str]:
    """The documented environment (docs/RAY_JOBS.md) with a private HOME, so the cluster's auth token is this test's.

    Ray's auth settings are dropped from the inherited environment: ``ray.init`` in this pytest process sets
    ``RAY_AUTH_MODE=token`` and the fault tests set it to ``disabled``, which would make this test depend on order.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=home, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    if client:
        env["RAY_AUTH_MODE"] = "token"  # CLI clients of a token-auth cluster need it (docs/RAY_JOBS.md)
    return env


@pytest.fixture()
def head_node():
    """``ray get-auth-token --generate`` then ``ray start --head`` on loopback, as docs/RAY_JOBS.md says; yields
    (dashboard address, HOME)."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's unix socket paths must stay under 108 bytes
    home = tempfile.mkdtemp(prefix="rdhome", dir="/tmp")
    gcs, dash = _free_port(), _free_port()
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, env=_env(home, False),
                   capture_output=True, timeout=120)
    assert (Path(home) / ".ray" / "auth_token").exists()
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
             "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(start, check=True, env=_env(home, False), capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", home
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=_env(home, False), capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_ray_job_submit_distill_on_loopback_cluster(head_node, tiny_model, tmp_path):
    # every port the head node opened listens on loopback only
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid and "ray" in " ".join(_cmdline(c.pid))}
    assert listening and listening <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening
    address, home = head_node
    # the cluster enforces token auth: a client without the token mode is refused
    anon = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                          env={**_env(home, False), "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=120)
    assert anon.returncode != 0, anon.stdout[-2000:]
    dit, vae = tiny_model
    root = tmp_path / "runs"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "raydistill/orchestration/runtime_env.yaml"), "--",
           sys.executable, "jobs/distill.py", "--config", "jobs/configs/tiny.yaml", "--model", str(dit),
           "--vae", str(vae), "--root", str(root)]
    t0 = time.time()
    proc = _submit(cmd, _env(home, True))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    assert "accuracy (dc)" in proc.stdout and "random" in proc.stdout  # the table was printed
    for method in ("dit", "random"):
        out = root / "fashion-mnist" / f"{method}-ipc2-seed0"
        assert sorted(p.name for p in (out / "t-shirt_top").iterdir()) == ["0.png", "1.png"]
        assert (out / "manifest.parquet").exists() and (out / "grid.png").exists()
        assert "acc_dc_convnet_mean" in json.loads((out / "metrics.json").read_text())["metrics"]
    assert (root / "mlflow.db").exists()
    print(f"job submit round trip: {time.time() - t0:.1f} s")


def _submit(cmd: list[str], env: dict[str, str], wait_s: float = 120.0) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the head's job agent has not registered yet (Ray answers "No available agent
    to submit job, please try again later" and runs nothing; seen on a loaded 2-core machine)."""
    deadline = time.time() + wait_s
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []
