"""Errors that happen on Ray, or before Ray is reached, are one line (issue 25 items 3, 5, 6), on a real local Ray.

- a UserError raised in a Ray Data UDF (a corrupt image a sampler reads), in a sampler's constructor (a missing
  checkpoint), in a plain task and in a plain actor's constructor reaches the driver as the same UserError
  (``runtime.user_error_in``, used by ``ray_session``);
- ``--gpus-per-actor -1``, an unreachable ``--address`` and an unknown ``--tracking-uri`` scheme fail before Ray
  starts or anything is sampled, with one line naming the flag or address.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raydistill.config import DistillConfig
from raydistill.errors import UserError
from raydistill.outputs import png_bytes
from tests.conftest import FMNIST_ROOT, needs_fmnist

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
F = str(FMNIST_ROOT)


def _folder_with_corrupt_png(root: Path) -> Path:
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for k in range(2):
            (root / "train" / name / f"{k}.png").write_bytes(png_bytes(torch.full((3, 8, 8), 40 * k,
                                                                                  dtype=torch.uint8)))
    (root / "train" / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


def _one_line(p: subprocess.CompletedProcess) -> str:
    """Exit 2, our line last and alone (Ray's own start-up warnings may precede it), no traceback."""
    ours = [line for line in p.stderr.splitlines() if line.startswith("raydistill: error: ")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert ours == [p.stderr.splitlines()[-1]], p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout and "UserCodeException" not in p.stderr, p.stderr[-3000:]
    return ours[0]


def test_corrupt_image_read_inside_a_sampler_actor_is_one_line(tmp_path: Path) -> None:
    """The real case of the issue: a garbage PNG in a ``folder`` dataset, read by ``random`` in a Ray Data actor."""
    data = _folder_with_corrupt_png(tmp_path / "data")
    p = subprocess.run([sys.executable, "-m", "raydistill", "distill", "--dataset", "folder", "--data-root",
                        str(data), "--method", "random", "--ipc", "2", "--num-evals", "0", "--root",
                        str(tmp_path / "runs")], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    line = _one_line(p)
    assert "cannot decode image" in line and "dog/0.png" in line and line.endswith("delete or replace the corrupt file")


def _distill_argv(tmp: Path, *extra: str) -> list[str]:
    return ["distill", "--data-root", F, "--classes", "0,1", "--ipc", "2", "--method", "random", "--baselines",
            "random", "--num-evals", "0", "--root", str(tmp / "runs"), *extra]


@needs_fmnist
@pytest.mark.parametrize("extra, pattern", [
    (("--gpus-per-actor", "-1"), r"--gpus-per-actor must be a finite number >= 0, got -1\.0; pass e\.g\."),
    (("--gpus-per-actor", "nan"), r"--gpus-per-actor must be a finite number >= 0, got nan"),
    (("--tracking-uri", "foo://bar"), r"MLflow cannot store runs at --tracking-uri 'foo://bar' \(unknown scheme\)"),
    (("--tracking-uri", "sqlite:////nonexistent/dir/mlflow.db"), r"the folder of the MLflow database"),
])
def test_bad_run_flags_fail_before_ray_starts_and_before_sampling(tmp_path: Path, capsys, extra, pattern) -> None:
    """Checked before Ray starts (``ray.is_initialized()`` stays False) and before any image is sampled."""
    import re

    import ray

    from raydistill.cli import main

    rc = main(_distill_argv(tmp_path, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert not ray.is_initialized()
    assert not list((tmp_path / "runs").rglob("*.png"))


@needs_fmnist
def test_unreachable_address_is_one_line_naming_it(tmp_path: Path) -> None:
    """``--address 127.0.0.1:1`` through the CLI: one line naming the address and the timeout, Ray never started."""
    p = subprocess.run([sys.executable, "-m", "raydistill", *_distill_argv(tmp_path, "--address", "127.0.0.1:1")],
                       cwd=tmp_path, env={**ENV, "RAYDISTILL_CONNECT_TIMEOUT_S": "4"}, capture_output=True,
                       text=True, timeout=300)
    line = _one_line(p)
    assert "cannot reach the Ray cluster at 127.0.0.1:1 within 4 s (Connection refused)" in line, line
    assert "RAYDISTILL_CONNECT_TIMEOUT_S sets the wait" in line
    assert len(p.stderr.splitlines()) == 1  # not even Ray's start-up lines: it never started


@pytest.mark.parametrize("address, timeout_s, why", [("127.0.0.1:1", 3.0, "Connection refused"),
                                                     ("192.0.2.1:6379", 3.0, "")])
def test_unreachable_address_fails_within_the_connect_timeout(address, timeout_s, why) -> None:
    """Refused (127.0.0.1:1; retried: a head may still be starting) or silent (192.0.2.1 is TEST-NET-1, never
    routed): the probe gives up after the timeout, not after Ray's minutes of retries."""
    from raydistill.orchestration.runtime import check_reachable

    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"cannot reach the Ray cluster at {address} within 3 s \\({why}"):
        check_reachable(address, timeout_s)
    assert timeout_s - 1.5 <= time.monotonic() - t0 <= timeout_s + 6


def test_connect_timeout_env_must_be_a_positive_number(monkeypatch) -> None:
    from raydistill.orchestration.runtime import check_reachable

    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("RAYDISTILL_CONNECT_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="RAYDISTILL_CONNECT_TIMEOUT_S=.* is not a positive number"):
            check_reachable("127.0.0.1:1")
    with pytest.raises(UserError, match="is not HOST:PORT"):
        check_reachable("somewhere", timeout_s=1)


# ---------------------------------------------------------------------------------------------------------------------
# on one local Ray for the rest of the module (after the tests that need Ray not started)

@pytest.fixture(scope="module")
def ray_local():
    from raydistill.orchestration.runtime import ray_session

    with ray_session(num_cpus=2, num_gpus=0):
        yield


def _remote_user_error() -> None:
    raise UserError("task problem", "task fix")


class _BadActor:
    def __init__(self) -> None:
        raise UserError("actor problem", "actor fix")

    def ping(self) -> int:
        return 1


def test_user_error_from_a_task_and_an_actor_constructor_is_itself(ray_local) -> None:
    import ray

    from raydistill.orchestration.runtime import ray_session

    with pytest.raises(UserError) as e, ray_session():
        ray.get(ray.remote(_remote_user_error).remote())
    assert str(e.value) == "task problem; task fix" and e.value.problem == "task problem"
    with pytest.raises(UserError) as e, ray_session():  # ActorDiedError keeps only the remote traceback's text
        ray.get(ray.remote(_BadActor).remote().ping.remote())
    assert str(e.value) == "actor problem; actor fix"
    with pytest.raises(ZeroDivisionError), ray_session():  # anything else passes through untouched
        ray.get(ray.remote(lambda: 1 / 0).remote())


@needs_fmnist
def test_sampler_constructor_error_is_one_user_error_not_endless_restarts(ray_local, tmp_path: Path) -> None:
    """A checkpoint that is gone when the sampler actor loads it (the CLI's preflight saw it): the first batch raises
    the constructor's UserError, so Ray Data stops at once instead of restarting the actor forever."""
    from raydistill.orchestration.pipeline import distill_ray
    from raydistill.orchestration.runtime import ray_session

    cfg = DistillConfig(data_root=F, classes=("0",), ipc=1, steps=2, model=str(tmp_path / "gone.pt"),
                        vae=str(tmp_path / "vae"), out=str(tmp_path / "set"), baselines=())
    t0 = time.time()
    with pytest.raises(UserError, match=r"DiT checkpoint not found: .*gone\.pt"), ray_session():
        distill_ray(cfg, pool_size=1)
    assert time.time() - t0 < 120
    assert not list((tmp_path / "set").glob("*/*.png"))


def test_stopped_data_executors_are_joined_before_ray_shuts_down(ray_local, monkeypatch) -> None:
    """Issue 25 item 9: ``StreamingExecutor.shutdown`` waits 2 s for its scheduling thread; a starved thread (here its
    join returns at once, as when 2 s pass on a loaded machine) must still end before ``ray.shutdown()``, or its next
    call into the core worker ends the process with exit 1 before the driver's error line."""
    import contextlib
    import threading

    import ray
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    from raydistill.orchestration.runtime import join_data_executors

    real_join = threading.Thread.join

    def starved_join(self, timeout=None):
        if timeout == 2.0:
            return None  # the 2 s of shutdown() ran out
        return real_join(self, timeout)

    monkeypatch.setattr(StreamingExecutor, "join", starved_join)

    def slow(batch):
        time.sleep(0.05)
        return batch

    ds = ray.data.range(400, override_num_blocks=40).map_batches(slow)
    with contextlib.closing(iter(ds.iter_batches(batch_size=None))) as batches:
        next(batches)
    join_data_executors(timeout_s=60)
    assert not [t for t in threading.enumerate()
                if isinstance(t, StreamingExecutor) and getattr(t, "_shutdown", False) and t.is_alive()]


def test_data_iteration_threads_are_joined_before_ray_shuts_down(ray_local, monkeypatch) -> None:
    """Issue 25 item 9 (the CI failure of session 10): closing ``iter_batches`` only *signals* Ray Data's
    ``iter_threaded`` workers. A worker that took a block from the executor just before (starved here for 3 s, as on a
    loaded machine) next calls into the core worker (``ray.get`` of that block); it must have done so before
    ``ray.shutdown()``, which would otherwise end the process with exit 1 before the driver's error line."""
    import contextlib
    import threading

    import ray
    from ray.data._internal.block_batching import util

    from raydistill.orchestration.runtime import join_data_executors

    real_hits = util._calculate_ref_hits
    calls: list[int] = []
    starved: list[float] = []

    def starved_hits(refs):
        if threading.current_thread().name == "iter_threaded":
            calls.append(1)
            if len(calls) == 2:  # the block after the one the consumer takes
                starved.append(time.monotonic())
                time.sleep(3.0)
        return real_hits(refs)

    monkeypatch.setattr(util, "_calculate_ref_hits", starved_hits)
    ds = ray.data.range(40, override_num_blocks=40).map_batches(lambda b: b)
    with contextlib.closing(iter(ds.iter_batches(batch_size=None))) as batches:
        next(batches)
        deadline = time.monotonic() + 60
        while not starved and time.monotonic() < deadline:  # a worker is in the starved call when the consumer stops
            time.sleep(0.05)
    assert starved, "no worker took a second block: the test did not exercise the race"
    closed = time.monotonic()
    join_data_executors(timeout_s=60)
    assert closed - starved[0] < 3.0, "the consumer closed after the starved call: the test did not exercise the race"
    assert not [t.name for t in threading.enumerate() if t.name == "iter_threaded" and t.is_alive()]
    assert time.monotonic() - closed < 30
