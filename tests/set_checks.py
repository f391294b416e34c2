"""What the fault-tolerance tests (test_reliability*.py) share: their subprocesses' environment and the checks of a
finished set's bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from raydistill.outputs import read_manifest, sidecar, verify_set

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_USAGE_STATS_ENABLED": "0"}


def set_tree(out: Path) -> dict[str, bytes]:
    """The set's content: every PNG, grid.png, run.json, and the manifest rows without their timing column."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.png"))}
    files.update({n: (out / n).read_bytes() for n in ("grid.png", "run.json")})
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_manifest(out)]
    files["manifest rows"] = json.dumps(rows, sort_keys=True).encode()
    return files


def check_complete(out: Path, classes: int, ipc: int) -> list[dict]:
    """Exactly ``ipc`` images per class, no duplicate (class, index) or path, every PNG matching its sha256."""
    rows = read_manifest(out)
    keys = [(r["label"], r["index"]) for r in rows]
    assert sorted(keys) == [(c, k) for c in range(classes) for k in range(ipc)], keys
    assert len({r["path"] for r in rows}) == len(rows)
    assert len(list(out.glob("*/*.png"))) == classes * ipc  # no stray PNGs beside the manifest's
    assert verify_set(out) == []
    assert not sidecar(out).exists()  # no staging, shard or temporary file is left once the set is finished
    return rows
