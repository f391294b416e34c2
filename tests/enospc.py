"""A full disk at one write point of a distilled set: ``OSError(ENOSPC)`` from the N-th matching write on.

Deterministic, unlike filling a tiny tmpfs while other shards are in flight (issue 25 item 9). A failing write first
writes half its bytes, as a real full disk leaves a partial file. Used in-process by ``tests/test_outputs.py`` and as
the driver of ``raydistill`` by ``tests/test_reliability.py``::

    python tests/enospc.py POINT N distill --data-root ...
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# point -> (the call that fails, a marker of the path it writes), in the order raydistill.outputs writes them
POINTS = {
    "run.json": ("write", ".run.json.tmp-"),
    "staged png": ("write", "/staging/"),
    "png rename": ("replace", "/staging/"),
    "shard parquet": ("write", "/shards/."),
    "shard rename": ("replace", "/shards/."),
    "manifest": ("write", ".manifest.parquet.tmp-"),
    "grid": ("write", ".grid.png.tmp-"),
}


@contextlib.contextmanager
def full_disk_at(point: str, nth: int) -> Iterator[list[str]]:
    """Within the block, the ``nth`` and every later write at ``point`` fails with ENOSPC; yields the paths hit."""
    kind, marker = POINTS[point]
    real_write, real_replace = Path.write_bytes, os.replace
    seen: list[str] = []
    hit: list[str] = []

    def full(path: object) -> bool:
        if marker not in str(path):
            return False
        seen.append(str(path))
        if len(seen) >= nth:
            hit.append(str(path))
            return True
        return False

    def write_bytes(self: Path, data: bytes) -> int:
        if kind == "write" and full(self):
            real_write(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    def replace(src, dst) -> None:
        if kind == "replace" and full(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        real_replace(src, dst)

    Path.write_bytes, os.replace = write_bytes, replace
    try:
        yield hit
    finally:
        Path.write_bytes, os.replace = real_write, real_replace


if __name__ == "__main__":
    from raydistill.cli import main

    with full_disk_at(sys.argv[1], int(sys.argv[2])) as hit:
        rc = main(sys.argv[3:])
    print(f"enospc hits: {len(hit)}", flush=True)
    sys.exit(rc)
