"""Sets written by the sampler actors (``write_from_workers``, raydistill.storage; issue 22, item 5) on a real local
Ray: byte-identical to the driver-written set (every file; the manifest up to its timing column), through a
``file://`` URI and a plain path; an actor that fails or dies mid-shard leaves nothing of that shard visible and the
shard is made again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raydistill.config import DistillConfig
from raydistill.errors import UserError
from raydistill.storage import FAULT_ENV
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def ray_faults(tmp_path_factory):
    """A private loopback Ray whose workers see ``RAYDISTILL_FAULT_FILE`` (set before Ray starts: they inherit it)."""
    from raydistill.orchestration.runtime import ray_session

    fault = tmp_path_factory.mktemp("fault") / "fault.json"
    old = os.environ.get(FAULT_ENV)
    os.environ[FAULT_ENV] = str(fault)
    try:
        with ray_session(num_cpus=2, num_gpus=0):
            yield fault
    finally:
        os.environ.pop(FAULT_ENV) if old is None else os.environ.__setitem__(FAULT_ENV, old)


def _cfg(tiny_model, out: str, **kw) -> DistillConfig:
    dit, vae = tiny_model
    return DistillConfig(model=str(dit), vae=str(vae), classes=("0", "1", "2"), ipc=3, steps=6, batch_size=2,
                         out=out, **kw)


def _tree(out: Path) -> dict[str, bytes]:
    """Every file of a set -> its bytes (PNGs, run.json, grid.png), but manifest.parquet -> its schema and rows
    without their timing column (``seconds``: how long each image took, never the same twice)."""
    import pyarrow.parquet as pq

    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    table = pq.read_table(out / "manifest.parquet")
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in table.to_pylist()]
    files["manifest.parquet"] = (str(table.schema) + json.dumps(rows)).encode()
    return files


def _run(cfg: DistillConfig, pool_size: int = 2):
    from raydistill.orchestration.pipeline import distill_ray

    return distill_ray(cfg, pool_size=pool_size, shard_size=3, cpus_per_actor=0.5, threads_per_actor=1)


@pytest.fixture(scope="module")
def reference(ray_faults, tiny_model, tmp_path_factory) -> Path:
    """The driver-written set (default mode)."""
    out = tmp_path_factory.mktemp("ref") / "set"
    _run(_cfg(tiny_model, str(out)))
    return out


def test_worker_written_set_is_byte_identical_to_the_driver_written_one(ray_faults, reference, tiny_model,
                                                                        tmp_path):
    from raydistill.outputs import sidecar, verify_set

    out = tmp_path / "set"
    cfg = _cfg(tiny_model, out.as_uri(), write_from_workers=True)
    assert cfg.out == str(out) and cfg.fingerprint() == _cfg(tiny_model, str(reference)).fingerprint()
    res = _run(cfg)
    assert res.shards_run == 3 and len(res.rows) == 9
    assert _tree(out) == _tree(reference) and verify_set(out) == []
    assert not sidecar(out).exists()
    again = _run(cfg)  # a rerun of the finished set: nothing made, nothing changed
    assert again.shards_run == 0 and _tree(out) == _tree(reference)


def test_uri_outputs_need_the_worker_mode_and_a_folder():
    with pytest.raises(UserError, match="only the sampler actors can write") as e:
        DistillConfig(out="s3://bucket/prefix/set")
    assert "--write-from-workers" in e.value.fix
    from raydistill.storage import SetStore

    with pytest.raises(UserError, match="bucket root"):
        SetStore("s3://bucket")
    with pytest.raises(UserError, match="write_from_workers must be true or false"):
        DistillConfig(write_from_workers="yes")


def test_failed_actor_mid_shard_leaves_no_partial_shard_and_a_rerun_completes_it(ray_faults, reference, tiny_model,
                                                                                  tmp_path):
    from raydistill.outputs import MANIFEST, shards_dir, sidecar, staging_dir

    out = tmp_path / "set"
    cfg = _cfg(tiny_model, str(out), write_from_workers=True)
    ray_faults.write_text(json.dumps({"after_pngs": 2, "how": "raise"}))
    with pytest.raises(Exception, match="injected fault"):
        _run(cfg, pool_size=1)
    claimed = json.loads(Path(f"{ray_faults}.claimed").read_text())
    Path(f"{ray_faults}.claimed").unlink()
    failed = claimed["shard"]
    # the failed shard: its 2 PNGs only in its staging folder, no manifest, none of its files in the set
    staged = [p for p in staging_dir(out).rglob("*.png")]
    assert sorted(p.name for p in staged) == sorted(claimed["staged"]) and len(staged) == 2
    assert all(p.parent.name.startswith(failed + "-") for p in staged)
    committed = {p.stem for p in shards_dir(out).glob("*.parquet")}
    assert failed not in committed and not (out / MANIFEST).exists()
    import pyarrow.parquet as pq

    listed = {r["path"] for f in shards_dir(out).glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    visible = {str(p.relative_to(out)) for p in out.glob("*/*.png")}
    assert listed <= visible
    # the set holds whole shards only (one shard = one class here): the committed ones, and any an actor finished
    # while the job was failing, before the driver committed its manifest (redone with the same bytes on the rerun)
    by_class: dict[str, set[str]] = {}
    for v in visible:
        by_class.setdefault(v.split("/")[0], set()).add(v)
    ref = _tree(reference)
    assert all(len(files) == 3 and all((out / f).read_bytes() == ref[f] for f in files) for files in by_class.values())
    ref_rows = pq.read_table(reference / "manifest.parquet").to_pylist()
    failed_files = {r["path"] for r in ref_rows if r["shard"] == failed}
    assert len(failed_files) == 3 and not failed_files & visible  # nothing of the failed shard is in the set
    res = _run(cfg)
    assert res.shards_run == 3 - len(committed) and res.shards_skipped == len(committed)
    assert _tree(out) == _tree(reference) and not sidecar(out).exists()


def test_full_disk_inside_an_actor_is_one_line_and_keeps_committed_shards(ray_faults, reference, tiny_model,
                                                                          tmp_path):
    """ENOSPC while an actor stages its shard (as pyarrow.fs raises it): the job ends with the full-disk line of the
    default mode, that shard's staged files are gone and none of its PNGs is in the set, committed shards stay, and
    the same command completes the set once there is room."""
    from raydistill.orchestration.runtime import user_errors_from_ray
    from raydistill.outputs import MANIFEST, shards_dir, staging_dir

    out = tmp_path / "set"
    cfg = _cfg(tiny_model, str(out), write_from_workers=True)
    ray_faults.write_text(json.dumps({"after_pngs": 2, "how": "enospc"}))
    line = r"^no space left on the device of .*set \(No space left on device\); free"
    with pytest.raises(UserError, match=line) as e, user_errors_from_ray():  # as ray_session unwraps it for the CLI
        _run(cfg, pool_size=1)
    assert "rerun the same command: finished shards are kept" in str(e.value)
    failed = json.loads(Path(f"{ray_faults}.claimed").read_text())["shard"]
    Path(f"{ray_faults}.claimed").unlink()
    assert not [p for p in staging_dir(out).rglob("*") if failed in p.name]
    import pyarrow.parquet as pq

    ref_rows = pq.read_table(reference / "manifest.parquet").to_pylist()
    failed_files = {r["path"] for r in ref_rows if r["shard"] == failed}
    visible = {str(p.relative_to(out)) for p in out.glob("*/*.png")}
    assert len(failed_files) == 3 and not failed_files & visible and not (out / MANIFEST).exists()
    committed = {p.stem for p in shards_dir(out).glob("*.parquet")}
    ref = _tree(reference)
    assert all((out / f).read_bytes() == ref[f] for f in visible)
    res = _run(cfg)
    assert res.shards_skipped == len(committed) and _tree(out) == ref


def test_full_disk_on_a_driver_write_of_the_store_is_one_line_and_leaves_no_temporary(tmp_path):
    import errno

    from raydistill.storage import SetStore

    store = SetStore(str(tmp_path / "set"))
    real = store.fs

    class Full:  # the store's filesystem with a full disk for new files
        def __getattr__(self, name):
            return getattr(real, name)

        def open_output_stream(self, path, *a, **k):
            f = real.open_output_stream(path, *a, **k)
            f.write(b"half")
            f.close()
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    store.fs = Full()
    with pytest.raises(UserError, match="no space left on the device of"):
        store.write(f"{store.root}/run.json", b"{}")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_killed_actor_mid_shard_is_restarted_and_the_set_is_whole(ray_faults, reference, tiny_model, tmp_path):
    out = tmp_path / "set"
    ray_faults.write_text(json.dumps({"after_pngs": 2, "how": "exit"}))  # the actor's process dies (os._exit)
    res = _run(_cfg(tiny_model, str(out), write_from_workers=True), pool_size=1)
    claimed = json.loads(Path(f"{ray_faults}.claimed").read_text())
    assert len(claimed["staged"]) == 2  # it did die mid-shard; Ray restarted it and retried the shard
    assert res.shards_run == 3 and _tree(out) == _tree(reference)


def test_cli_uri_out_without_the_flag_is_one_line_and_the_flag_sets_the_key(tiny_model, tmp_path, capsys):
    from raydistill.cli import _config, build_parser, main

    dit, vae = tiny_model
    flags = ["distill", "--model", str(dit), "--vae", str(vae), "--classes", "0", "--ipc", "1",
             "--root", str(tmp_path)]
    assert main([*flags, "--out", "s3://bucket/prefix/set"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a URI" in err[0] and "--write-from-workers" in err[0]
    cfg = _config(build_parser().parse_args([*flags, "--write-from-workers", "--out", (tmp_path / "s").as_uri()]))
    assert cfg.write_from_workers and cfg.out == str(tmp_path / "s")
    assert not _config(build_parser().parse_args(flags)).write_from_workers


def test_in_process_distill_refuses_a_uri_output(tiny_model):
    from raydistill.distill import distill_local

    with pytest.raises(UserError, match="only the Ray pipeline"):
        distill_local(_cfg(tiny_model, "s3://bucket/prefix/set", write_from_workers=True))


def test_object_store_protocol_resume_settings_and_overwrite(tmp_path):
    """The object-store branch (no local path: settings from run.json only) on fsspec's in-process memory://
    filesystem, through the same calls an actor (place_shard) and the driver (commit_rows, finalize) make."""
    import torch

    from raydistill.outputs import png_bytes
    from raydistill.storage import SetStore, StoreSetWriter

    uri = f"memory://{tmp_path.name}/sets/a"

    def shard(label: int) -> tuple[list[dict], list[bytes]]:
        g = torch.Generator().manual_seed(label)
        pngs = [png_bytes(torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8, generator=g)) for _ in range(2)]
        return [{"class_name": f"c{label}", "label": label, "index": k} for k in range(2)], pngs

    store = SetStore(uri)
    assert not store.local and store.sidecar.endswith("/sets/.a.raydistill")
    w = StoreSetWriter(uri, "fp1", {"ipc": 2})
    rows, pngs = shard(1)
    w.commit_rows("s1", store.place_shard("s1", rows, pngs))
    assert store.read(f"{store.root}/c1/0.png") == pngs[0] and not store.files(f"{store.sidecar}/staging", ".png")
    w2 = StoreSetWriter(uri, "fp1", {"ipc": 2})  # a rerun: s1 is committed, s0 is not
    assert w2.shard_done("s1") and not w2.shard_done("s0")
    rows0, pngs0 = shard(0)
    w2.commit_rows("s0", store.place_shard("s0", rows0, pngs0))
    final = w2.finalize()
    assert [(r["label"], r["index"]) for r in final] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not store.has_entries(store.sidecar) and store.read(f"{store.root}/manifest.parquet") is not None
    assert StoreSetWriter(uri, "fp1", {"ipc": 2}).finalize() == final  # a finished set: its manifest's rows
    with pytest.raises(UserError, match="other settings"):
        StoreSetWriter(uri, "fp2", {"ipc": 3})
    StoreSetWriter(uri, "fp2", {"ipc": 3}, overwrite=True)  # replaced: the old images are gone
    assert store.read(f"{store.root}/c1/0.png") is None
    other = SetStore(f"memory://{tmp_path.name}/sets/b")
    other.write(f"{other.root}/notes.txt", b"not a set")
    with pytest.raises(UserError, match="not a raydistill output"):
        StoreSetWriter(other.out, "fp1", {})
