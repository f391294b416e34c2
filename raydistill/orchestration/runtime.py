"""The one owner of Ray's runtime: connect to a cluster or start a local one on loopback, and the runtime_env.

Safe by default: a local Ray binds to 127.0.0.1 only (stack-notes: ``--node-ip-address`` alone is not enough; the
environment below kept every port on loopback), has no dashboard unless asked, and reports no usage stats.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                quiet: bool = True) -> Iterator[None]:
    """Join ``address`` (a running cluster) or start a local loopback Ray for the duration of the block.

    ``quiet`` turns Ray's INFO logs and Ray Data's progress bars off; our tasks' own progress lines still reach the
    driver, so long stages show progress.

    Inside a ``ray job submit`` job (``RAY_ADDRESS`` is set) the job's cluster is joined. A Ray that is already
    initialised in this process is reused and left running.
    """
    apply_loopback_env()  # before the first `import ray` (package import already did it)
    import ray

    if ray.is_initialized():
        yield
        return
    if address:  # a driver joining a cluster from outside: give its workers raydistill's runtime_env
        ray.init(address=address, runtime_env=runtime_env(), logging_level=_level(quiet))
    elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job already carries the runtime_env
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=_level(quiet))
    else:
        # address="local": always a new private Ray; without it ray.init joins whatever local cluster another
        # process started (it finds /tmp/ray/ray_current_cluster), and trials land on, and die with, that cluster.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env=runtime_env(), logging_level=_level(quiet))
    if quiet:
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    try:
        yield
    finally:
        ray.shutdown()
