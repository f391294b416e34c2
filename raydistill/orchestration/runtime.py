"""The one owner of Ray's runtime: connect to a cluster or start a local one on loopback, and the runtime_env.

Safe by default: a local Ray binds to 127.0.0.1 only (stack-notes: ``--node-ip-address`` alone is not enough; the
environment below kept every port on loopback), has no dashboard unless asked, and reports no usage stats.

It is also the one place where the driver's waits on Ray (``ray.get``, ``ray.wait``, a Ray Data iteration) turn a
:class:`UserError` raised inside a task or actor back into itself (:func:`user_error_in`): every job runs inside
:func:`ray_session`, so the user sees the same one line as without Ray. An unreachable ``--address`` fails within
``RAYDISTILL_CONNECT_TIMEOUT_S`` seconds (default 30) with one line naming it, instead of Ray's minutes of retries.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from raydistill.errors import UserError

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
REPO_ROOT = Path(__file__).resolve().parents[2]


RUNTIME_ENV_FILE = Path(__file__).with_name("runtime_env.yaml")


def runtime_env(extra_env: dict[str, str] | None = None, with_working_dir: bool = False) -> dict:
    """The runtime_env of ``runtime_env.yaml`` (also given to ``ray job submit --runtime-env``), plus ``extra_env``.

    A driver that already runs inside a job (or a local session) needs only the env vars; ``with_working_dir``
    keeps the upload settings for clients that submit code.
    """
    import yaml

    env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    if not with_working_dir:
        env = {"env_vars": env.get("env_vars", {})}
    env["env_vars"] = {**env.get("env_vars", {}), **(extra_env or {})}
    return env


def _level(quiet: bool) -> str:
    return "WARNING" if quiet else "INFO"


def apply_loopback_env() -> None:
    """Put the loopback-only settings in the environment (no-op for variables the user set)."""
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


CONNECT_TIMEOUT_ENV = "RAYDISTILL_CONNECT_TIMEOUT_S"
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
_USER_ERROR_LINE = re.compile(r"raydistill\.errors\.UserError: ([^\n]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def user_error_in(exc: BaseException) -> UserError | None:
    """The :class:`UserError` a Ray task or actor raised, found in ``exc`` (else None).

    A task's error arrives typed (``RayTaskError(UserError)``, with ``cause``); an actor's failed constructor
    (``ActorDiedError``) and a Ray Data UDF (``RayTaskError(UserCodeException)``) keep only the remote traceback's
    text, whose ``raydistill.errors.UserError: <problem>; <fix>`` line is the message (one line by contract).
    """
    seen: set[int] = set()
    stack = [exc]
    texts = []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return UserError(e.problem, e.fix)
        texts.append(str(e))
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    for text in texts:
        m = _USER_ERROR_LINE.search(_ANSI.sub("", text))
        if m:
            return UserError(m.group(1).strip())
    return None


@contextlib.contextmanager
def user_errors_from_ray() -> Iterator[None]:
    """Re-raise a UserError that a Ray task or actor raised inside the block as itself (one line at the CLI)."""
    try:
        yield
    except Exception as e:
        if type(e) is UserError:  # ours, raised in the driver (a task's arrives as RayTaskError(UserError))
            raise
        ue = user_error_in(e)
        if ue is None:
            raise
        raise ue from None


def connect_timeout_s() -> float:
    """Seconds to wait for a cluster to answer: ``RAYDISTILL_CONNECT_TIMEOUT_S`` (default 30)."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "30")
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise UserError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a positive number of seconds",
                        f"set {CONNECT_TIMEOUT_ENV} to e.g. 30, or unset it")
    return v


def check_reachable(address: str, timeout_s: float | None = None) -> None:
    """UserError naming ``address`` unless a TCP connection to it succeeds within ``timeout_s`` (retried, so a head
    node that is still starting is waited for). ``auto`` and ``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    timeout_s = connect_timeout_s() if timeout_s is None else timeout_s
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"Ray address {address!r} is not HOST:PORT", "pass --address like 10.0.0.5:6379 (the head's "
                        "GCS port) or ray://HOST:10001")
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(5.0, left))):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
        if time.monotonic() + 1.0 > deadline:
            break
        time.sleep(1.0)
    raise UserError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s ({last})",
                    f"start it (`ray start --head`) or fix --address; {CONNECT_TIMEOUT_ENV} sets the wait")


def join_data_executors(timeout_s: float = 120.0) -> None:
    """Wait for Ray Data's threads that were told to stop, before ``ray.shutdown()``.

    A thread of Ray Data that touches the core worker after ``ray.shutdown()`` makes Ray end the whole process
    (``core_worker_process.cc``: "The core worker has already been shutdown ... The process will exit", exit 1), before
    the driver has printed its error (issue 25 item 9). On a loaded machine two kinds outlive the driver's exit:

    - an executor's scheduling thread: ``StreamingExecutor.shutdown`` joins it for only 2 s (Ray 2.60);
    - the ``iter_threaded`` workers of ``iter_batches``: closing the iteration only sets their stop event; a worker
      that had just taken a block still resolves it (``ray.get``) on its way out.

    Iterations dropped without being closed are closed first (``gc.collect``). Executors still running are left
    alone; the wait is bounded by ``timeout_s``. Ray Data's classes and thread names are private, so a Ray without
    them makes this a no-op.
    """
    import gc
    import threading

    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return
    gc.collect()
    deadline = time.monotonic() + timeout_s
    me = threading.current_thread()
    for t in threading.enumerate():
        stopping = (isinstance(t, StreamingExecutor) and getattr(t, "_shutdown", False)) or t.name == "iter_threaded"
        if stopping and t is not me and t.is_alive():
            t.join(max(0.0, deadline - time.monotonic()))


def _shutdown(ray, failing: bool) -> None:
    """``ray.shutdown()``, after stopped Ray Data executors have ended; while another error is on its way out, a
    failure to shut down must not replace it."""
    join_data_executors()
    if not failing:
        ray.shutdown()
        return
    try:
        ray.shutdown()
    except Exception:  # the error that ended the block is the one the user must see
        pass


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                quiet: bool = True) -> Iterator[None]:
    """Join ``address`` (a running cluster) or start a local loopback Ray for the duration of the block.

    ``quiet`` turns Ray's INFO logs and Ray Data's progress bars off; our tasks' own progress lines still reach the
    driver, so long stages show progress.

    Inside a ``ray job submit`` job (``RAY_ADDRESS`` is set) the job's cluster is joined. A Ray that is already
    initialised in this process is reused and left running. A UserError raised in a task or actor of the block is
    re-raised as itself (:func:`user_errors_from_ray`).
    """
    apply_loopback_env()  # before the first `import ray` (package import already did it)
    if quiet:  # Ray Data re-reads its logging config for every dataset: keep user-code tracebacks off the console
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    import ray

    if ray.is_initialized():
        with user_errors_from_ray():
            yield
        return
    if address:  # a driver joining a cluster from outside: give its workers raydistill's runtime_env
        check_reachable(address)
        ray.init(address=address, runtime_env=runtime_env(), logging_level=_level(quiet))
    elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job already carries the runtime_env
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=_level(quiet))
    else:
        # address="local": always a new private Ray; without it ray.init joins whatever local cluster another
        # process started (it finds /tmp/ray/ray_current_cluster), and trials land on, and die with, that cluster.
        # Its workers do the job's work, so they run at the driver's priority: Ray's default (worker_niceness 15)
        # gives them ~3% of a core beside any ordinary process, and a distillation or a test on a busy machine
        # then crawls (measured: the test suite beside two benchmark processes). RAY_worker_niceness set by the
        # user wins.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env=runtime_env(), logging_level=_level(quiet))
    if quiet:
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    failing = True
    try:
        with user_errors_from_ray():
            yield
        failing = False
    finally:
        _shutdown(ray, failing)
