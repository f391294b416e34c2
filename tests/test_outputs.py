"""The on-disk distilled set contract (raydistill.outputs): PNG tree, manifest, atomic shards, resume, refusal."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raydistill.config import DistillConfig
from raydistill.distill import distill_local
from raydistill.errors import UserError
from raydistill.outputs import (
    MANIFEST,
    DistilledSetWriter,
    imagefolder_to_label,
    load_png_tree,
    png_bytes,
    read_manifest,
    sha256,
    shards_dir,
    sidecar,
    to_uint8,
    verify_set,
)
from tests.conftest import FMNIST_ROOT, needs_fmnist

CLASSES = ["cat", "dog"]


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def _decode(path_or_bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        return np.asarray(im).copy()


def _images(seed: int, n: int, channels: int = 1, size: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def _shard_rows(label: int, indices: list[int]) -> list[dict]:
    return [{"class_name": CLASSES[label], "label": label, "index": k, "seed": 1000 * label + k} for k in indices]


def _write_set(out: Path, fingerprint: str = "fp-a", seed: int = 0) -> dict[str, torch.Tensor]:
    """Two classes x 2 images committed as one shard per class; returns {relative path: image}."""
    w = DistilledSetWriter(out, CLASSES, fingerprint, {"seed": seed})
    written = {}
    for label in (1, 0):  # commit order must not matter for the manifest order
        imgs = _images(seed * 10 + label, 2)
        w.commit(f"c{label}", _shard_rows(label, [0, 1]), [png_bytes(x) for x in imgs])
        written.update({f"{CLASSES[label]}/{k}.png": imgs[k] for k in (0, 1)})
    w.finalize()
    return written


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: relative path -> (bytes, mtime_ns)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _bytes_only(snap: dict[str, tuple[bytes, int]]) -> dict[str, bytes]:
    return {k: v[0] for k, v in snap.items()}


# ---------------------------------------------------------------------------------------------------------------------
# to_uint8 / png_bytes

def test_to_uint8_matches_torchvision_save_image(tmp_path: Path) -> None:
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 23, generator=g) * 0.7  # some values fall outside [-1, 1] and must clamp
    x[:, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, -1.5, 1.5])
    save_image(x, tmp_path / "tv.png", normalize=True, value_range=(-1, 1))
    ref = _decode(tmp_path / "tv.png")  # [H, W, 3] uint8
    ours = to_uint8(x)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 17, 23)
    assert np.array_equal(ours.numpy().transpose(1, 2, 0), ref)
    assert np.array_equal(_decode(png_bytes(ours)), ref)  # our PNG encoding decodes to the same pixels
    # batched input: the same per image
    xb = torch.stack([x, -x])
    assert torch.equal(to_uint8(xb)[0], ours)
    save_image(-x, tmp_path / "tv_neg.png", normalize=True, value_range=(-1, 1))
    assert np.array_equal(to_uint8(xb)[1].numpy().transpose(1, 2, 0), _decode(tmp_path / "tv_neg.png"))


def test_png_bytes_grey_round_trip() -> None:
    img = _images(3, 1)[0]
    arr = _decode(png_bytes(img))
    assert arr.shape == (6, 6) and np.array_equal(arr, img[0].numpy())


# ---------------------------------------------------------------------------------------------------------------------
# writer: layout, manifest, verification

def test_commit_finalize_layout_manifest_and_checksums(tmp_path: Path) -> None:
    out = tmp_path / "set"
    written = _write_set(out)
    for rel, img in written.items():
        assert np.array_equal(_decode(out / rel), img[0].numpy())
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/*.png")) == sorted(written)
    assert not sidecar(out).exists()  # the bookkeeping is gone once the set is finished
    assert sorted(p.name for p in out.iterdir()) == ["cat", "dog", MANIFEST, "run.json"]
    rows = read_manifest(out)
    assert rows == pq.read_table(out / MANIFEST).to_pylist()
    assert [(r["label"], r["index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["path"] for r in rows] == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert [r["seed"] for r in rows] == [0, 1, 1000, 1001]
    for r in rows:
        assert r["sha256"] == sha256((out / r["path"]).read_bytes())
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "fp-a"
    assert verify_set(out) == []


def test_verify_set_reports_tampered_and_missing_png(tmp_path: Path) -> None:
    out = tmp_path / "set"
    _write_set(out)
    (out / "cat" / "1.png").write_bytes(png_bytes(_images(99, 1)[0]))  # a valid PNG, but not the committed one
    (out / "dog" / "0.png").unlink()
    assert sorted(verify_set(out)) == ["checksum mismatch cat/1.png", "missing dog/0.png"]


def test_read_manifest_of_folder_without_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no manifest.parquet"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# writer: resume, refusal, overwrite

def test_rerun_with_same_fingerprint_resumes_and_touches_nothing(tmp_path: Path) -> None:
    out = tmp_path / "set"
    _write_set(out)
    before = _snapshot(out)
    w = DistilledSetWriter(out, CLASSES, "fp-a", {"seed": 0})
    assert w.shard_done("c0") and w.shard_done("c1") and not w.shard_done("c2")
    assert w.finalize() == read_manifest(out)
    assert _snapshot(out) == before  # bytes and mtime of every file, run.json and the manifest included
    assert not sidecar(out).exists()
    assert verify_set(out) == []


def test_set_loads_with_a_plain_torchvision_imagefolder(tmp_path: Path) -> None:
    """The class tree holds only class folders (the bookkeeping is in the sidecar, gone once finished), so
    ``ImageFolder(<set>)`` loads every image; its class index maps to the manifest label by
    ``imagefolder_to_label`` and equals the label when the names sort in label order (here: cat, dog)."""
    from torchvision.datasets import ImageFolder

    out = tmp_path / "set"
    _write_set(out)
    ds = ImageFolder(str(out))
    assert ds.classes == CLASSES and len(ds) == 4
    to_label = imagefolder_to_label(out)
    by_path = {r["path"]: r["label"] for r in read_manifest(out)}
    for path, idx in ds.samples:
        assert to_label[idx] == by_path[str(Path(path).relative_to(out))] == idx
    # names that do not sort in label order: the mapping, not the index, gives the label
    rev = tmp_path / "rev"
    w = DistilledSetWriter(rev, ["zebra", "ant"], "fp", {})
    for label, name in enumerate(("zebra", "ant")):
        w.commit(f"c{label}", [{"class_name": name, "label": label, "index": 0}], [png_bytes(_images(label, 1)[0])])
        assert (shards_dir(rev) / f"c{label}.parquet").is_file() and not (rev / ".shards").exists()
    w.finalize()
    ds = ImageFolder(str(rev))
    assert ds.classes == ["ant", "zebra"] and imagefolder_to_label(rev) == {0: 1, 1: 0}
    assert [imagefolder_to_label(rev)[i] for _, i in ds.samples] == [1, 0]


def test_other_fingerprint_is_refused_and_leaves_every_file(tmp_path: Path) -> None:
    out = tmp_path / "set"
    _write_set(out)
    before = _snapshot(out)
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        DistilledSetWriter(out, CLASSES, "fp-b", {"seed": 1})
    assert _snapshot(out) == before


def test_overwrite_replaces_the_old_set(tmp_path: Path) -> None:
    out = tmp_path / "set"
    _write_set(out)
    w = DistilledSetWriter(out, CLASSES, "fp-b", {"seed": 1}, overwrite=True)
    assert not w.shard_done("c0") and not w.shard_done("c1")
    assert not (out / MANIFEST).exists() and not list(out.glob("*/*.png"))
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "fp-b"
    img = _images(7, 1)
    w.commit("c0", _shard_rows(0, [0]), [png_bytes(img[0])])
    rows = w.finalize()
    assert [r["path"] for r in rows] == ["cat/0.png"]
    assert np.array_equal(_decode(out / "cat/0.png"), img[0, 0].numpy())
    assert verify_set(out) == []


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_corrupt_run_json_is_refused_unless_overwrite(tmp_path: Path, content: str) -> None:
    out = tmp_path / "set"
    _write_set(out)
    (out / "run.json").write_text(content)
    before = _snapshot(out)
    with pytest.raises(UserError, match="run.json is corrupt"):
        DistilledSetWriter(out, CLASSES, "fp-a", {})
    assert _snapshot(out) == before
    w = DistilledSetWriter(out, CLASSES, "fp-a", {}, overwrite=True)  # the fix the message names works
    assert not w.shard_done("c0") and not list(out.glob("*/*.png"))
    assert json.loads((out / "run.json").read_text())["fingerprint"] == "fp-a"


def test_unrelated_non_empty_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a raydistill output directory"):
        DistilledSetWriter(out, CLASSES, "fp-a", {})
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    DistilledSetWriter(empty, CLASSES, "fp-a", {})  # an empty folder is fine
    assert (empty / "run.json").is_file() and list(empty.iterdir()) == [empty / "run.json"]


def test_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        DistilledSetWriter(f, CLASSES, "fp-a", {})
    assert f.read_text() == "x"


def test_unsafe_class_name_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"'\.\./evil'"):
        DistilledSetWriter(out, ["cat", "../evil"], "fp-a", {})
    assert list(tmp_path.iterdir()) == []
    # a row naming an unsafe class is refused too, and nothing escapes the output folder
    w = DistilledSetWriter(out, CLASSES, "fp-a", {})
    with pytest.raises(UserError, match="evil"):
        w.commit("c0", [{"class_name": "../evil", "label": 0, "index": 0}], [png_bytes(_images(0, 1)[0])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not list(tmp_path.rglob("*.png")) and not w.shard_done("c0")


# ---------------------------------------------------------------------------------------------------------------------
# reading a PNG tree

def test_load_png_tree_takes_first_ipc_files_in_lexicographic_order(tmp_path: Path) -> None:
    for label, name in enumerate(CLASSES):
        (tmp_path / name).mkdir()
        for k in range(12):  # pixel value encodes (class, k)
            img = torch.full((1, 4, 4), 100 * label + k, dtype=torch.uint8)
            (tmp_path / name / f"{k}.png").write_bytes(png_bytes(img))
    x, y = load_png_tree(tmp_path, CLASSES, ipc=3, channels=1)
    assert x.shape == (6, 1, 4, 4) and x.dtype == torch.uint8
    assert x[:, 0, 0, 0].tolist() == [0, 1, 10, 100, 101, 110]
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    x_all, _ = load_png_tree(tmp_path, CLASSES, channels=1)
    assert x_all[:12, 0, 0, 0].tolist() == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    x_rgb, _ = load_png_tree(tmp_path, CLASSES, ipc=1, channels=3)
    assert x_rgb.shape == (2, 3, 4, 4) and x_rgb[1, :, 0, 0].tolist() == [100, 100, 100]
    with pytest.raises(UserError, match="fewer than IPC 13"):
        load_png_tree(tmp_path, CLASSES, ipc=13)
    with pytest.raises(UserError, match="'bird' has no images"):
        load_png_tree(tmp_path, ["cat", "bird"])
    with pytest.raises(UserError, match="not found"):
        load_png_tree(tmp_path / "nope", CLASSES)


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "bitflip"])
def test_corrupt_png_gives_user_error_naming_the_file(tmp_path: Path, corruption: str) -> None:
    for name in CLASSES:
        (tmp_path / name).mkdir()
        for k in range(2):
            (tmp_path / name / f"{k}.png").write_bytes(png_bytes(_images(k, 1, size=16)[0]))
    bad = tmp_path / "dog" / "1.png"
    good = bad.read_bytes()
    flipped = bytearray(good)
    flipped[good.find(b"IDAT") + 6] ^= 0xFF  # inside the compressed pixel data
    bad.write_bytes({"garbage": b"definitely not a png" * 10, "truncated": good[: len(good) // 2],
                     "empty": b"", "bitflip": bytes(flipped)}[corruption])
    with pytest.raises(UserError) as e:
        load_png_tree(tmp_path, CLASSES, channels=1)
    assert str(bad) in str(e.value) and "corrupt" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# distill_local end to end (Fashion-MNIST)

def _cfg(out: Path, **kw) -> DistillConfig:
    base = dict(data_root=str(FMNIST_ROOT), classes=("0", "1"), ipc=3, out=str(out))
    return DistillConfig(**{**base, **kw})


@needs_fmnist
def test_distill_local_tiny_model_writes_set_and_resumes(tmp_path: Path, tiny_model) -> None:
    dit, vae = tiny_model
    cfg = _cfg(tmp_path / "set", model=str(dit), vae=str(vae), steps=5, batch_size=2)
    res = distill_local(cfg, device="cpu")
    out = tmp_path / "set"
    assert (res.shards_run, res.shards_skipped, len(res.rows)) == (2, 0, 6)
    pngs = sorted(str(p.relative_to(out)) for p in out.glob("*/*.png"))
    assert pngs == [f"{c}/{k}.png" for c in ("t-shirt_top", "trouser") for k in range(3)]
    assert (out / "grid.png").is_file() and (out / MANIFEST).is_file()
    assert [(r["label"], r["index"], r["method"]) for r in res.rows] == [(c, k, "dit") for c in (0, 1)
                                                                          for k in range(3)]
    assert len({r["seed"] for r in res.rows}) == 6  # every image has its own seed
    assert len({r["sha256"] for r in res.rows}) == 6  # ... and different pixels
    assert verify_set(out) == []
    x, y = load_png_tree(out, ["t-shirt_top", "trouser"], channels=1)
    assert x.shape[0] == 6 and x.shape[1] == 1 and y.tolist() == [0, 0, 0, 1, 1, 1]

    before = _snapshot(out)
    again = distill_local(cfg, device="cpu")
    assert (again.shards_run, again.shards_skipped) == (0, 2)
    assert again.rows == res.rows
    after = _snapshot(out)
    assert after == before  # bytes and mtime of every file (PNGs, manifest, grid, run.json): nothing rewritten
    assert not sidecar(out).exists()


def _raw_fmnist_train() -> tuple[np.ndarray, np.ndarray]:
    """The training split decoded straight from the IDX files (independent of raydistill.data)."""
    with gzip.open(FMNIST_ROOT / "train-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST_ROOT / "train-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


@needs_fmnist
def test_random_method_is_seeded_and_copies_real_training_images(tmp_path: Path) -> None:
    runs = {name: distill_local(_cfg(tmp_path / name, method="random", seed=seed))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    pos = {name: [r["seed"] for r in res.rows] for name, res in runs.items()}
    assert pos["a"] == pos["b"]
    assert pos["a"] != pos["c"]
    assert _bytes_only(_snapshot(tmp_path / "a")).keys() == _bytes_only(_snapshot(tmp_path / "b")).keys()
    for r in runs["a"].rows:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()
    images, labels = _raw_fmnist_train()
    for name in ("a", "c"):
        rows = runs[name].rows
        for label in (0, 1):
            chosen = [r["seed"] for r in rows if r["label"] == label]
            assert len(set(chosen)) == 3  # without replacement
        for r in rows:
            assert labels[r["seed"]] == r["label"]
            assert np.array_equal(_decode(tmp_path / name / r["path"]), images[r["seed"]])
        assert verify_set(tmp_path / name) == []


# ---------------------------------------------------------------------------------------------------------------------
# a full disk at each write point (tests/enospc.py): one UserError, committed shards intact, no debris, then resumable

def _debris(out: Path) -> list[str]:
    """Temporary files and staged PNGs left in the set or its sidecar."""
    places = [out, sidecar(out)]
    return sorted(str(p) for d in places if d.exists() for p in d.rglob("*")
                  if ".tmp" in p.name or "staging" in p.relative_to(d).parts[:1] and p.is_file())


@needs_fmnist
@pytest.mark.parametrize("point, nth, committed", [
    ("run.json", 1, 0), ("staged png", 3, 2), ("png rename", 3, 2), ("shard parquet", 3, 2), ("shard rename", 3, 2),
    ("manifest", 1, 6), ("grid", 1, 6)])
def test_full_disk_at_each_write_point(tmp_path: Path, point: str, nth: int, committed: int) -> None:
    from raydistill.outputs import committed_damage
    from tests.enospc import full_disk_at

    cfg = _cfg(tmp_path / "set", method="random", seed=0)
    ref = distill_local(cfg.with_(out=str(tmp_path / "ref")), shard_size=1)
    out = tmp_path / "set"
    with full_disk_at(point, nth) as hit, pytest.raises(UserError) as e:
        distill_local(cfg, shard_size=1)
    assert hit, f"the write point {point!r} was never reached"
    assert f"no space left on the device of {out}" in str(e.value) and "rerun the same command" in str(e.value)
    in_sidecar = 0 if point == "grid" else committed  # (the grid is drawn after the manifest took the shards over)
    assert len(list(shards_dir(out).glob("*.parquet"))) == in_sidecar
    assert committed_damage(out) is None  # what was committed before is intact
    assert _debris(out) == []  # the half-written shard, file or rename left nothing behind
    again = distill_local(cfg, shard_size=1)  # the same command once there is room
    assert (again.shards_run, again.shards_skipped) == (6 - committed, committed)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again.rows] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in ref.rows]
    assert verify_set(out) == [] and not sidecar(out).exists()
    assert (out / "grid.png").read_bytes() == (tmp_path / "ref" / "grid.png").read_bytes()


def _write_many(path: str, who: str, n: int) -> None:
    from pathlib import Path

    from raydistill.outputs import save_merged_json

    results = {"runs": {}}
    for i in range(n):  # each process keeps its own stale copy, as a benchmark script does between measurements
        results["runs"][f"{who}-{i}"] = i
        save_merged_json(Path(path), results, indent=1)


def test_save_merged_json_keeps_every_writers_entries(tmp_path):
    import json
    import multiprocessing as mp

    from raydistill.outputs import save_merged_json

    path = tmp_path / "results.json"
    save_merged_json(path, {"runs": {"old": -1}, "floor": {"fid": 0.2}})
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(path), who, 30)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    runs = json.loads(path.read_text())["runs"]
    assert set(runs) == {"old"} | {f"{w}-{i}" for w in "ab" for i in range(30)}  # nothing lost to a race
    mine = {"runs": {"a-0": 99}}
    save_merged_json(path, mine)
    assert mine["runs"]["a-0"] == 99 and "b-29" in mine["runs"]  # updated in place to the merged whole
    assert json.loads(path.read_text())["floor"] == {"fid": 0.2}
