"""Small reliability fixes of issue 25 item 10 that need no Ray: a retried shard is one progress line, and the MGD3
mode cache gives the same file bytes in every process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from raydistill.outputs import DistilledSetWriter, Shard, png_bytes, read_manifest

REPO = Path(__file__).resolve().parents[1]


def _batch(shard: str, label: int, index: int, png: bytes) -> dict[str, np.ndarray]:
    row = {"class_name": ["cat", "dog"][label], "label": label, "index": index, "seed": index}
    return {"shard_id": np.array([shard], dtype=object), "row": np.array([json.dumps(row)], dtype=object),
            "png": np.array([png], dtype=object)}


def test_a_retried_shard_arriving_twice_is_one_progress_line_and_committed_once(tmp_path: Path) -> None:
    """Ray retries a shard on a restarted actor; its second copy arrives after the commit (twice here): the driver
    keeps the committed copy and says so once."""
    import torch

    from raydistill.orchestration.pipeline import _commit_arrivals

    png = [png_bytes(torch.full((1, 4, 4), v, dtype=torch.uint8)) for v in (10, 20, 30)]
    writer = DistilledSetWriter(tmp_path / "set", ["cat", "dog"], "fp", {})
    todo = [Shard("c0", 0, [0], [0]), Shard("c1", 1, [0], [0])]
    arrivals = [_batch("c0", 0, 0, png[0]), _batch("c0", 0, 0, png[1]), _batch("c1", 1, 0, png[2]),
                _batch("c0", 0, 0, png[1])]
    lines: list[str] = []
    made = _commit_arrivals(iter(arrivals), writer, todo, 2, 0.0, lines.append)
    assert made == 2
    retry = [m for m in lines if "arrived again" in m]
    assert retry == ["shard c0 arrived again from a retried task (a sampler actor was restarted); its committed "
                     "copy is kept"]
    assert len(lines) == 3  # two commits, one retry line
    writer.finalize()
    assert (tmp_path / "set" / "cat" / "0.png").read_bytes() == png[0]  # the first copy, not the retried one
    assert [r["path"] for r in read_manifest(tmp_path / "set")] == ["cat/0.png", "dog/0.png"]


SAVE = """
import sys, torch
from raydistill.methods.mgd3.modes import ModeCache
torch.manual_seed(0)
print(ModeCache(sys.argv[1]).save(torch.randn(4, 8), "fashion-mnist", 3, 4, "vae-abc", seed=0, method="kmeans"))
"""


def test_mode_cache_files_are_byte_reproducible_across_processes(tmp_path: Path) -> None:
    """safetensors writes a metadata map in hash order (random per process): the fields are one sorted JSON string,
    so the same modes give the same bytes; the file still loads as the cache entry."""
    from raydistill.methods.mgd3.modes import ModeCache

    digests = set()
    for i in range(3):
        p = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / f"c{i}")], capture_output=True, text=True,
                           timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
        digests.add(hashlib.sha256(Path(p.stdout.strip()).read_bytes()).hexdigest())
    assert len(digests) == 1, digests
    modes = ModeCache(tmp_path / "c0").load("fashion-mnist", 3, 4, "vae-abc", seed=0, method="kmeans")
    assert modes is not None and modes.shape == (4, 8)
    assert ModeCache(tmp_path / "c0").load("fashion-mnist", 3, 4, "vae-other", seed=0) is None
