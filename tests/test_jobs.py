"""`ray start --head` on 127.0.0.1, `ray job submit jobs/distill.py` on a tiny config, check outputs, stop the head."""

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
    # every fixed default port its own: two head nodes on one machine (another suite beside this one) otherwise both
    # want the dashboard agent's 52365 and the client server's 10001, and the second head has no job agent
    # ("No available agent to submit job")
    start += [f"--{name}={_free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port")]
    # its own session: the head's daemons get their own process group, which stop_head_node ends
    subprocess.run(start, check=True, env=_env(home, False), capture_output=True, timeout=180, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dash}", home
    finally:
        stop_head_node(temp)
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


def stop_head_node(temp_dir: str, grace_s: float = 15.0) -> None:
    """Stop the head node started with ``--temp-dir=temp_dir`` and nothing else.

    ``ray stop --force`` kills every Ray process on the machine: run beside another suite (a second clone, a helper's
    worktree) it killed that suite's clusters mid-test ("No available agent to submit job", raylets "marked dead",
    "core worker has already been shutdown"). The head's daemons name the temp dir on their command line and the
    ones that do not (the client server) share their process group; workers are the raylet's descendants."""
    me = psutil.Process().pid
    roots = [p for p in psutil.process_iter() if p.pid != me and any(temp_dir in arg for arg in _cmdline(p.pid))]
    groups: set[int] = set()
    for p in roots:
        try:
            groups.add(os.getpgid(p.pid))
        except OSError:
            pass
    groups.discard(os.getpgid(0))  # never this process's own group (pytest's)
    roots += [p for p in psutil.process_iter() if p.pid != me and p not in roots and _pgid(p.pid) in groups]
    procs = set(roots)
    for p in roots:
        try:
            procs.update(p.children(recursive=True))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def test_stop_head_node_ends_only_that_node(tmp_path):
    """The head's processes (named by their temp dir, their process group, their children) end; a bystander in
    another group (another suite's cluster) and this process live on."""
    tag = str(tmp_path / "rdtemp")
    # the root names the temp dir (as gcs_server / raylet do); the orphan shares its group only (as the client
    # server does once `ray start` has exited); the child is the root's (as workers are the raylet's)
    head = subprocess.Popen(["sh", "-c", "(sleep 600 &); sleep 600 & wait", tag], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
    time.sleep(1.0)
    group = [p for p in psutil.process_iter() if p.pid != head.pid and _pgid(p.pid) == head.pid]
    assert len(group) == 2, group  # the orphan and the child
    try:
        stop_head_node(tag, grace_s=5)
        assert head.wait(timeout=10) is not None
        gone, alive = psutil.wait_procs(group, timeout=10)
        assert not alive, alive
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=10)
