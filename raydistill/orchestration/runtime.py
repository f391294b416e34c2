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
# CLI clients (`ray job submit`, `ray status`) of a token-auth cluster need this; ray.init writes the token itself
# and must not see it (it then expects a token file that does not exist yet).
CLIENT_ENV = {"RAY_AUTH_MODE": "token"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    """The runtime_env every job and local session uses: loopback-safe env vars, quiet tokenizers/threads."""
    env = dict(LOOPBACK_ENV)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra_env or {})
    return {"env_vars": env}


def apply_loopback_env() -> None:
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                quiet: bool = True) -> Iterator[None]:
    """Join ``address`` (a running cluster) or start a local loopback Ray for the duration of the block.

    Inside a ``ray job submit`` job (``RAY_ADDRESS`` is set) the job's cluster is joined. A Ray that is already
    initialised in this process is reused and left running.
    """
    import ray

    apply_loopback_env()
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=not quiet)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env(), log_to_driver=not quiet, configure_logging=quiet,
                 logging_level="ERROR" if quiet else "INFO")
    try:
        yield
    finally:
        ray.shutdown()
