"""Sets written by the sampler actors themselves, to any ``pyarrow.fs`` filesystem: a local path or ``file://`` URI
(local disk, NFS, any mount), or an object store URI (``s3://bucket/prefix/set?endpoint_override=host:port`` for
S3-compatible stores, ``gs://``, ``hdfs://``; other protocols through fsspec, e.g. ``az://`` with adlfs).

In the default mode every PNG travels to the driver, which writes the set (:class:`raydistill.outputs.
DistilledSetWriter`). With ``write_from_workers`` each actor writes its shard's PNGs where the set lives and sends
the driver only the manifest rows; the driver commits manifests. The layout and the protocol are those of
:mod:`raydistill.outputs`, so the set is byte-identical to the driver-written one:

1. the actor writes every PNG of the shard under ``<sidecar>/staging/<shard>-<attempt>/`` (``<sidecar>`` is
   ``<parent>/.<name>.raydistill``; ``<attempt>`` is unique per try, so a retried try never meets a dead one's
   files), then moves them to ``<out>/<class>/<k>.png`` (on a POSIX filesystem a rename; on an object store a
   server-side copy, each object appearing whole) and returns the rows (path, sha256, shard);
2. the driver, once all rows of a shard arrived, writes the shard's manifest to a temporary name and moves it to
   ``<sidecar>/shards/<shard>.parquet``: from then on the shard is committed and never redone;
3. when every shard is committed, the driver writes ``manifest.parquet`` (the sorted union) and drops the sidecar.

An actor killed while staging leaves files only in the sidecar: no PNG of the shard in the set and no manifest, so
nothing of it is visible, and the shard is made again (by Ray's retry of the task on a restarted actor, or by the
next run); one killed between its moves leaves some PNGs in place without a manifest, which the redo overwrites
with the same bytes (the images are deterministic), exactly as when the driver dies mid-commit in the default mode.
A shard an actor finished while the job was failing is in place, whole, without a manifest, and is redone the same
way. A set is usable once ``manifest.parquet`` exists; until then only the shard manifests say what is committed.

Resuming: a local set is checked as in the default mode (:func:`raydistill.outputs.check_output_dir`: settings,
every committed PNG against its sha256); on an object store only the settings fingerprint (``run.json``) is
checked, the committed PNGs are not read back.

Test-only fault hook: when the environment variable ``RAYDISTILL_FAULT_FILE`` names a file that exists, the first
actor to claim it (an atomic rename to ``<file>.claimed``) fails after staging ``after_pngs`` PNGs of its shard,
``how`` = ``"exit"`` (its process dies, as if killed), ``"raise"`` (the shard's task fails) or ``"enospc"`` (the
disk is full: the shard's staged and moved files are removed and the job ends with the one line of a full disk, as
in the default mode); the file holds
``{"after_pngs": N, "how": ...}`` and, once claimed, also the shard and the files staged.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from raydistill.errors import UserError
from raydistill.outputs import (
    MANIFEST,
    annotate_rows,
    check_output_dir,
    clear_set,
    disk_full_error,
    is_disk_full,
    parquet_bytes,
)

FAULT_ENV = "RAYDISTILL_FAULT_FILE"


def is_uri(out: str) -> bool:
    return "://" in str(out)


def local_out(out: str) -> str:
    """A ``file://`` URI as its absolute path; any other value unchanged."""
    return out[len("file://"):] if str(out).startswith("file://") else out


class SetStore:
    """The place of one set on a ``pyarrow.fs`` filesystem: ``root`` (the set) and its sidecar."""

    def __init__(self, out: str) -> None:
        import pyarrow.fs as pafs

        self.out = str(out)
        if is_uri(self.out) and not urlparse(self.out).path.strip("/"):
            raise UserError(f"the output {self.out!r} is a bucket root",
                            "name a folder inside it (the set's bookkeeping goes next to it)")
        try:
            self.fs, root = _open(self.out if is_uri(self.out) else str(Path(self.out).resolve()))
        except (ValueError, OSError, TypeError, ImportError) as e:
            raise UserError(f"cannot open the output {self.out!r} ({str(e).splitlines()[0]})",
                            "pass a local path, file:///ABS/PATH or an object store URI such as s3://BUCKET/PREFIX/SET"
                            ) from None
        self.root = root.rstrip("/")
        parent, _, name = self.root.rpartition("/")
        if not name:
            raise UserError(f"the output {self.out!r} is a filesystem root",
                            "name a folder inside it (the set's bookkeeping goes next to it)")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.sidecar = f"{parent}/.{name}.raydistill"

    # -- file operations (paths are absolute on the filesystem) --
    def read(self, path: str) -> bytes | None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write(self, path: str, data: bytes) -> None:
        """Write through a temporary name and a move; nothing at all when ``path`` already holds ``data``."""
        if self.read(path) == data:
            return
        tmp = f"{path.rpartition('/')[0]}/.{path.rpartition('/')[2]}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(path.rpartition("/")[0], recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        except OSError as e:
            if not is_disk_full(e):
                raise
            self._remove([tmp])
            raise disk_full_error(self.out, e) from None

    def _remove(self, paths: Sequence[str]) -> None:
        """Best effort: delete what a failed write left (a file, or a folder through :meth:`delete_dir`)."""
        import pyarrow.fs as pafs

        for p in paths:
            try:
                if self.fs.get_file_info(p).type == pafs.FileType.File:
                    self.fs.delete_file(p)
                else:
                    self.delete_dir(p)
            except OSError:
                pass

    def files(self, folder: str, suffix: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                      and not i.base_name.startswith("."))

    def has_entries(self, folder: str) -> bool:
        import pyarrow.fs as pafs

        return bool(self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)))

    def delete_dir(self, folder: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(folder).type == pafs.FileType.Directory:
            self.fs.delete_dir(folder)

    # -- the actor's side --
    def place_shard(self, shard_id: str, rows: list[dict], pngs: Sequence[bytes]) -> list[dict]:
        """Stage the shard's PNGs, move them into the set, return its annotated manifest rows (protocol step 1)."""
        annotate_rows(shard_id, rows, pngs)
        fault = _claim_fault()
        stage = f"{self.sidecar}/staging/{shard_id}-{uuid.uuid4().hex[:8]}"
        staged: list[str] = []
        moved: list[str] = []
        try:
            self.fs.create_dir(stage, recursive=True)
            for row, data in zip(rows, pngs):
                name = row["path"].replace("/", "__")
                with self.fs.open_output_stream(f"{stage}/{name}") as f:
                    f.write(data)
                staged.append(name)
                if fault is not None and len(staged) == fault[1]["after_pngs"]:
                    _fail(fault, shard_id, staged)
            for row, name in zip(rows, staged):
                self.fs.create_dir(f"{self.root}/{row['path'].split('/')[0]}", recursive=True)
                self.fs.move(f"{stage}/{name}", f"{self.root}/{row['path']}")
                moved.append(f"{self.root}/{row['path']}")
        except OSError as e:  # a full disk: this shard's staged and moved files go, committed shards stay
            if not is_disk_full(e):
                raise
            self._remove([stage, *moved])
            raise disk_full_error(self.out, e) from None
        self.delete_dir(stage)
        return rows


def _open(uri: str):
    """(pyarrow filesystem, path) for ``uri``: pyarrow's own (local, s3, gs, hdfs, abfs), else an fsspec one wrapped
    for pyarrow (any protocol an installed fsspec implementation registers)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:
        if "Unrecognized filesystem type" not in str(e):
            raise
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _claim_fault() -> tuple[str, dict] | None:
    path = os.environ.get(FAULT_ENV)
    if not path:
        return None
    try:
        os.replace(path, path + ".claimed")
    except FileNotFoundError:  # none set, or another actor claimed it
        return None
    return path + ".claimed", json.loads(Path(path + ".claimed").read_text())


def _fail(fault: tuple[str, dict], shard_id: str, staged: list[str]) -> None:
    path, spec = fault
    Path(path).write_text(json.dumps({**spec, "shard": shard_id, "staged": staged}))
    if spec.get("how") == "exit":
        os._exit(1)
    if spec.get("how") == "enospc":  # as pyarrow.fs reports a full disk
        raise OSError(errno.ENOSPC, f"Error writing bytes to file. Detail: [errno {errno.ENOSPC}] "
                      f"{os.strerror(errno.ENOSPC)}")
    raise RuntimeError(f"injected fault ({FAULT_ENV}) after staging {len(staged)} PNGs of shard {shard_id}")


class StoreSetWriter:
    """The driver's side with ``write_from_workers``: settings check, committed shards, manifest commits, finalize
    (protocol steps 2-3). The same interface as :class:`raydistill.outputs.DistilledSetWriter`, less the PNGs."""

    def __init__(self, out: str, fingerprint: str, settings: dict, overwrite: bool = False) -> None:
        self.store = SetStore(out)
        self.out = Path(self.store.root) if self.store.local else self.store.out
        s = self.store
        if s.local:
            if check_output_dir(s.root, fingerprint, overwrite, settings):
                clear_set(Path(s.root))
        else:
            run = s.read(f"{s.root}/run.json")
            try:
                same = run is None or json.loads(run).get("fingerprint") == fingerprint
            except (ValueError, AttributeError):
                same = False
            foreign = run is None and s.has_entries(s.root) and not s.has_entries(s.sidecar)
            if foreign and not overwrite:
                raise UserError(f"{out} exists and is not a raydistill output", "choose another --out or pass "
                                "--overwrite")
            if not same and not overwrite:
                raise UserError(f"{out} holds a distilled set made with other settings (or a corrupt run.json)",
                                "choose another --out, or pass --overwrite to replace it")
            if foreign or not same:
                s.delete_dir(s.root)
                s.delete_dir(s.sidecar)
        self.shards = f"{s.sidecar}/shards"
        manifest = s.read(f"{s.root}/{MANIFEST}")
        self.done = {str(r["shard"]) for r in _rows(manifest)} if manifest is not None else set()
        self.done |= {p.rpartition("/")[2][:-len(".parquet")] for p in s.files(self.shards, ".parquet")}
        s.write(f"{s.root}/run.json", json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=1,
                                                  default=str).encode())

    def shard_done(self, shard_id: str) -> bool:
        return shard_id in self.done

    def commit_rows(self, shard_id: str, rows: list[dict]) -> None:
        """Commit a shard whose PNGs an actor placed: its manifest, written then moved into the sidecar."""
        self.store.write(f"{self.shards}/{shard_id}.parquet", parquet_bytes(rows))
        self.done.add(shard_id)

    def finalize(self) -> list[dict]:
        """``manifest.parquet`` = the sorted union of the shard manifests, then the sidecar goes; returns the rows."""
        s = self.store
        files = s.files(self.shards, ".parquet")
        if not files:
            manifest = s.read(f"{s.root}/{MANIFEST}")
            if manifest is not None:
                return _rows(manifest)
        rows = [r for f in files for r in _rows(s.read(f))]
        rows.sort(key=lambda r: (r["label"], r["index"]))
        s.write(f"{s.root}/{MANIFEST}", parquet_bytes(rows))
        s.delete_dir(s.sidecar)
        return rows


def _rows(data: bytes) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data)).to_pylist()
