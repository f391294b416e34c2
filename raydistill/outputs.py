"""The distilled set on disk: ``<out>/<class_name>/<k>.png`` plus ``manifest.parquet``, ``grid.png``, ``metrics.json``.

The PNG tree is the layout the official evaluation scripts read, and nothing else in ``<out>`` is a folder, so
``torchvision.datasets.ImageFolder(<out>)`` loads the set (its class index is the rank of the class folder name in
sorted order; :func:`imagefolder_to_label` maps it to the manifest's ``label``). The bookkeeping of a set in progress
lives beside it, in the sidecar ``<parent>/.<name>.raydistill/`` (:func:`sidecar`): writing is shard by shard and
atomic, a shard's PNGs are written under ``<sidecar>/staging/<shard>/`` and renamed into place, then its manifest rows
are committed by renaming ``<sidecar>/shards/<shard>.parquet`` into place. A shard whose parquet exists is done and
is never redone; the final ``manifest.parquet`` is the union of the shard files, written to a temporary file and
renamed, and then the sidecar is removed: a finished set is self-contained and its manifest says which shards are
done. ``<out>/run.json`` records the generation settings' fingerprint, so a rerun resumes only the same settings,
and only when the committed part is intact (every manifest readable, every PNG matching its sha256, no PNG the
manifests do not list, ``manifest.parquet`` equal to the union of the shards): a set edited by hand is refused, not
silently mixed. Every file is written only when its bytes change, so a rerun of a finished set writes nothing (and
works on a read-only filesystem). A full disk is a UserError that removes the half-written shard and keeps every
committed one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydistill.data.base import safe_class_name
from raydistill.errors import UserError

MANIFEST = "manifest.parquet"


def sidecar(out: str | Path) -> Path:
    """The bookkeeping folder of the set at ``out`` while it is made: ``<parent>/.<name>.raydistill``."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.raydistill"


def shards_dir(out: str | Path) -> Path:
    return sidecar(out) / "shards"


def staging_dir(out: str | Path) -> Path:
    return sidecar(out) / "staging"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8, as ``torchvision.utils.save_image(normalize=True, value_range=(-1, 1))``."""
    x = images.detach().float().clamp(-1.0, 1.0).add(1.0).div(2.0)
    return x.mul(255.0).add(0.5).clamp(0, 255).to(torch.uint8).cpu()


def png_bytes(img: torch.Tensor) -> bytes:
    """uint8 [C, H, W] -> PNG bytes (grey for C == 1, RGB for C == 3)."""
    from PIL import Image

    arr = img.numpy()
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def disk_full_is_user_error(where: Path, cleanup: Sequence[Path] = ()) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT inside the block into a UserError after removing ``cleanup`` (half-written files)."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise disk_full_error(where, e) from None


def is_disk_full(e: OSError) -> bool:
    """ENOSPC or EDQUOT (also as pyarrow.fs raises them: an OSError carrying the errno)."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(where: object, e: OSError) -> UserError:
    """The one line of a full disk under ``where`` (the set being written)."""
    return UserError(f"no space left on the device of {where} ({os.strerror(e.errno)})",
                     "free some space and rerun the same command: finished shards are kept")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename; nothing at all when it already holds them."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_full_is_user_error(path.parent, [tmp]):
        tmp.write_bytes(data)
        os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def save_merged_json(path: Path, results: dict, **dump) -> dict:
    """Write a results file that other processes may be writing too (benchmarks scoring side by side): under an
    exclusive lock, re-read what is on disk, merge ``results`` into it one level down (``results`` wins on a
    shared key: the same measurement), write it atomically, and update ``results`` in place to the merged whole,
    so that nobody's entries are lost to a stale copy."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = json.loads(path.read_text()) if path.exists() else {}
        for key, value in results.items():
            if isinstance(value, dict) and isinstance(disk.get(key), dict):
                disk[key].update(value)
            else:
                disk[key] = value
        atomic_write_text(path, json.dumps(disk, **dump))
    results.clear()
    results.update(disk)
    return results


def _differs(run: dict, settings: dict | None) -> str:
    """" (differs in: a, b)" between a folder's recorded settings and ``settings``; "" when either is unknown."""
    old = run.get("settings")
    if settings is None or not isinstance(old, dict):
        return ""
    new = json.loads(json.dumps(settings, default=str))  # as run.json stores them
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys == ["builtin_weights"]:
        return " (by an earlier version of the built-in model's weights)"
    return f" (differs in: {', '.join(keys)})" if keys else ""


def check_output_dir(out: str | Path, fingerprint: str, overwrite: bool = False, settings: dict | None = None) -> bool:
    """Raise UserError unless ``out`` may receive the set with ``fingerprint``; reads only, writes nothing.

    Allowed: a missing or empty folder, a raydistill folder of the same settings (resumed), or with ``overwrite`` any
    folder. Returns True when ``out`` holds a set made with other settings that ``overwrite`` will replace.
    ``settings`` (the generation key) lets the error name the settings that differ.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is a file", "choose another --out")
    if not out.resolve().name or os.path.ismount(out):
        raise UserError(f"output folder {out} is a filesystem root or mount point",
                        "choose a folder inside it as --out (the set's bookkeeping goes next to it)")
    run_file = out / "run.json"
    if run_file.exists():
        try:
            run = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            run = None
        if not isinstance(run, dict):
            if overwrite:
                return True
            raise UserError(f"{run_file} is corrupt", "delete the output directory or pass --overwrite")
        if run.get("fingerprint") != fingerprint:
            if not overwrite:
                raise UserError(f"{out} holds a distilled set made with other settings{_differs(run, settings)}",
                                "choose another --out, or pass --overwrite to replace it")
            return True
        damage = committed_damage(out)
        if damage is not None:
            if overwrite:
                return True
            raise UserError(f"{out}: {damage[0]}", damage[1])
    elif out.exists() and any(out.iterdir()) and not overwrite and not sidecar(out).exists():
        raise UserError(f"{out} exists and is not a raydistill output directory",
                        "choose another --out or pass --overwrite")
    return False


def _row_path_ok(row: dict) -> bool:
    """A manifest row's ``path`` is ``<safe class name>/<index>.png`` (so it cannot point outside the set)."""
    try:
        name, file = str(row["path"]).split("/")
        return safe_class_name(name) == name and file == f"{int(row['index'])}.png"
    except (UserError, ValueError, KeyError, TypeError):
        return False


def _read_rows(f: Path) -> list[dict] | None:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(f).to_pylist()
    except Exception:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for a damaged file
        return None


def _row_damage(out: Path, r: dict, where: str) -> str | None:
    """What is wrong with one committed manifest row of ``where`` (None: its PNG is there with its sha256)."""
    if not _row_path_ok(r) or not isinstance(r.get("sha256"), str) or not isinstance(r.get("label"), int):
        return f"{where} has a malformed row (edited by hand?)"
    png = out / r["path"]
    if not png.is_file() or sha256(png.read_bytes()) != r["sha256"]:
        return f"{r['path']} is missing or does not match its sha256 in {where} (edited by hand?)"
    return None


def committed_damage(out: str | Path) -> tuple[str, str] | None:
    """(problem, fix) when the committed part of ``out`` changed after it was written, else None. Reads only.

    Checked: each shard manifest in the sidecar and ``manifest.parquet`` read and have sane rows, each PNG they list
    exists with its sha256, ``manifest.parquet`` equals the union of the shards while both exist, and a finished set
    (one with ``manifest.parquet``) has no PNG its manifest does not list.
    """
    out = Path(out)
    rows: list[dict] = []
    shards = sorted(shards_dir(out).glob("*.parquet"))
    for f in shards:
        shard_rows = _read_rows(f)
        redo = f"delete {f} to make that shard again, or pass --overwrite"
        if shard_rows is None:
            return f"shard manifest {f.name} is not a readable parquet file (edited by hand?)", redo
        for r in shard_rows:
            problem = _row_damage(out, r, f"shard manifest {f.name}")
            if problem is not None:
                return problem, redo
        rows.extend(shard_rows)
    manifest = out / MANIFEST
    if manifest.exists():
        got = _read_rows(manifest)
        redo = "pass --overwrite to make the set again"
        if got is None:
            return f"{MANIFEST} is not a readable parquet file (edited by hand?)", redo
        if shards and got != sorted(rows, key=lambda r: (r["label"], r["index"])):
            return (f"{MANIFEST} does not match the shard manifests in {shards_dir(out)} (edited by hand?)",
                    f"delete {manifest} to rebuild it from the shards, or pass --overwrite")
        for r in got:
            problem = _row_damage(out, r, MANIFEST)
            if problem is not None:
                return problem, redo
        listed = {r["path"] for r in got}  # finished: every PNG is listed (in progress: a shard's leftovers)
        stray = sorted(str(p.relative_to(out)) for p in out.glob("*/*.png") if str(p.relative_to(out)) not in listed)
        if stray:
            return (f"{stray[0]} is in the set but not in {MANIFEST} (edited by hand, or rows removed?)",
                    "remove it, or pass --overwrite to make the set again")
    return None


def annotate_rows(shard_id: str, rows: list[dict], pngs: Sequence[bytes]) -> list[dict]:
    """Add ``path`` (``<safe class name>/<index>.png``), ``sha256`` and ``shard`` to a shard's manifest rows, in
    place (the driver's commit and a sampler actor writing its own PNGs both call this: the same manifests)."""
    for row, data in zip(rows, pngs):
        row["path"] = f"{safe_class_name(row['class_name'])}/{int(row['index'])}.png"
        row["sha256"] = sha256(data)
        row["shard"] = shard_id
    return rows


@dataclass
class Shard:
    """Images of one class; ``indices`` are the image numbers k, ``seeds`` their per-image seeds."""

    shard_id: str
    class_label: int
    indices: list[int]
    seeds: list[int]


class DistilledSetWriter:
    """Writes a distilled set shard by shard into ``out`` (see the module docstring).

    Opening a finished set of the same settings writes nothing: its shards are those its manifest lists.
    """

    def __init__(self, out: str | Path, class_names: Sequence[str], fingerprint: str, settings: dict,
                 overwrite: bool = False) -> None:
        self.out = Path(out)
        self.class_names = [safe_class_name(c) for c in class_names]
        self.fingerprint = fingerprint
        self.shards = shards_dir(self.out)
        run_file = self.out / "run.json"
        if check_output_dir(self.out, fingerprint, overwrite, settings):
            self._clear()
        self.done = {str(r["shard"]) for r in _read_rows(self.out / MANIFEST) or []}
        self.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=1, default=str)
        atomic_write_text(run_file, text)  # a resume touches nothing: only changed bytes are written

    def _clear(self) -> None:
        clear_set(self.out)

    def shard_done(self, shard_id: str) -> bool:
        return shard_id in self.done or (self.shards / f"{shard_id}.parquet").exists()

    def commit(self, shard_id: str, rows: list[dict], pngs: list[bytes]) -> None:
        """Write one shard's PNGs and manifest rows atomically (rows carry ``class_name`` and ``index``)."""
        stage = staging_dir(self.out) / shard_id
        tmp = self.shards / f".{shard_id}.parquet.tmp"
        annotate_rows(shard_id, rows, pngs)
        # on a full disk: drop this shard's staged, moved and temporary files; committed shards stay as they were
        with disk_full_is_user_error(self.out, [stage, tmp] + [self.out / r["path"] for r in rows]):
            self.shards.mkdir(parents=True, exist_ok=True)
            if stage.exists():
                shutil.rmtree(stage)
            stage.mkdir(parents=True)
            for row, data in zip(rows, pngs):
                (stage / f"{row['class_name']}__{row['index']}.png").write_bytes(data)
            for row in rows:
                dest = self.out / row["path"]
                dest.parent.mkdir(exist_ok=True)
                os.replace(stage / f"{row['class_name']}__{row['index']}.png", dest)
            shutil.rmtree(stage, ignore_errors=True)
            tmp.write_bytes(parquet_bytes(rows))
            os.replace(tmp, self.shards / f"{shard_id}.parquet")

    def finalize(self) -> list[dict]:
        """Merge the shard manifests into ``manifest.parquet`` (sorted by label, index), then drop the sidecar;
        returns the rows. A finished set is left as it is."""
        import pyarrow.parquet as pq

        shard_files = sorted(self.shards.glob("*.parquet"))
        if not shard_files and (self.out / MANIFEST).exists():
            return read_manifest(self.out)
        rows: list[dict] = []
        for f in shard_files:
            rows.extend(pq.read_table(f).to_pylist())
        rows.sort(key=lambda r: (r["label"], r["index"]))
        _atomic_write_bytes(self.out / MANIFEST, parquet_bytes(rows))
        shutil.rmtree(sidecar(self.out), ignore_errors=True)
        return rows


def clear_set(out: Path) -> None:
    """Empty the folder ``out`` and drop its sidecar (``--overwrite`` of a set made with other settings)."""
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    shutil.rmtree(sidecar(out), ignore_errors=True)


def imagefolder_to_label(out: str | Path) -> dict[int, int]:
    """``torchvision.datasets.ImageFolder(out)``'s class index -> the manifest's ``label`` (the dataset's label).

    ImageFolder numbers the class folders in sorted order of their names; the index equals the label when the
    class names sort in label order and every class is in the set (ImageNet's wnids, digits' "0".."9").
    """
    names = {str(r["class_name"]): int(r["label"]) for r in read_manifest(out)}
    return {i: names[n] for i, n in enumerate(sorted(names))}


def parquet_bytes(rows: list[dict]) -> bytes:
    """Rows as a parquet file in memory: written with Python's own I/O, a full disk raises OSError(ENOSPC)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue().to_pybytes()


def read_manifest(out: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    p = Path(out) / MANIFEST
    if not p.exists():
        raise UserError(f"no {MANIFEST} in {out}", "run raydistill distill first, or evaluate the PNG tree directly")
    return pq.read_table(p).to_pylist()


def verify_set(out: str | Path) -> list[str]:
    """Problems found when checking every PNG against its manifest sha256 (empty list: the set is intact)."""
    out = Path(out)
    problems = []
    for row in read_manifest(out):
        f = out / str(row["path"])
        if not _row_path_ok(row):
            problems.append(f"bad path {row['path']!r}")
        elif not f.exists():
            problems.append(f"missing {row['path']}")
        elif sha256(f.read_bytes()) != row["sha256"]:
            problems.append(f"checksum mismatch {row['path']}")
    return problems


def read_image(path: Path, channels: int | None) -> torch.Tensor:
    """One image file -> uint8 [C, H, W] (grey for ``channels == 1``, else RGB); a corrupt file is a UserError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"corrupt image {path}", "delete or regenerate it") from e
    return torch.from_numpy(arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


def load_png_tree(root: str | Path, class_names: Sequence[str], ipc: int | None = None,
                  channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``root/<class>/*.png`` into uint8 [N, C, H, W] and labels; with ``ipc``, the first ``ipc`` files per class
    in lexicographic order (the official ``train.py`` rule: 0.png, 1.png, 10.png, ...)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"distilled set not found: {root}", "pass the folder that holds <class>/<k>.png")
    imgs, labels = [], []
    for label, name in enumerate(class_names):
        d = root / safe_class_name(name)
        files = sorted(p for p in d.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if d.is_dir() else []
        if not files:
            raise UserError(f"class {name!r} has no images in {root}", "check the dataset/subset matches the set")
        if ipc is not None:
            if len(files) < ipc:
                raise UserError(f"class {name!r} has {len(files)} images in {root}, fewer than IPC {ipc}",
                                "lower --ipc")
            files = files[:ipc]
        for f in files:
            imgs.append(read_image(f, channels))
            labels.append(label)
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) > 1:
        raise UserError(f"images in {root} have different shapes {sorted(shapes)[:3]}", "resize them to one size")
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.long)


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: str | Path, per_class: int = 10) -> None:
    """A sample sheet: one row per class, up to ``per_class`` images each (uint8 [N, C, H, W])."""
    from PIL import Image

    rows = []
    for c in labels.unique(sorted=True).tolist():
        sel = images[labels == c][:per_class]
        pad = per_class - len(sel)
        if pad:
            sel = torch.cat([sel, torch.zeros(pad, *sel.shape[1:], dtype=sel.dtype)])
        rows.append(torch.cat(list(sel), dim=2))  # [C, H, per_class*W]
    grid = torch.cat(rows, dim=1).numpy()
    img = Image.fromarray(grid[0], "L") if grid.shape[0] == 1 else Image.fromarray(grid.transpose(1, 2, 0), "RGB")
    if img.width < 400:
        img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    _atomic_write_bytes(Path(path), _pil_png(img))


def _pil_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
