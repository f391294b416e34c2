"""Bad input through ``raydistill.cli.main``: exit status 2, exactly one ``raydistill: error:`` line, no traceback,
and existing outputs left byte-identical. Every case must fail before Ray starts or a net is trained: the pipeline
entry points are replaced by a guard that fails the test if reached (the validation itself runs for real)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from raydistill.cli import main
from raydistill.config import DistillConfig
from raydistill.distill import distill_local
from raydistill.outputs import png_bytes
from tests.conftest import FMNIST_ROOT, needs_fmnist

F = str(FMNIST_ROOT)


class ReachedPipeline(Exception):
    """Raised by the guard: the CLI went past validation into Ray or training."""


@pytest.fixture
def guarded(monkeypatch):
    import raydistill.distill
    import raydistill.orchestration.distill_job

    def guard(*args, **kwargs):
        raise ReachedPipeline

    monkeypatch.setattr(raydistill.orchestration.distill_job, "run_main_job", guard)
    monkeypatch.setattr(raydistill.distill, "evaluate_images", guard)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _distill(tmp: Path, *extra: str) -> list[str]:
    """A distill command line valid up to ``extra`` (real Fashion-MNIST, two classes, outputs under tmp)."""
    return ["distill", "--data-root", F, "--root", str(tmp / "runs"), "--classes", "0,1", "--ipc", "3", *extra]


def _random_set(out: Path, **kw) -> Path:
    cfg = dict(data_root=F, classes=("0", "1"), ipc=3, method="random", seed=0, out=str(out))
    distill_local(DistillConfig(**{**cfg, **kw}))
    return out


def _png_tree(root: Path, corrupt: str | None = None) -> Path:
    for label, name in enumerate(("t-shirt_top", "trouser")):
        (root / name).mkdir(parents=True)
        for k in range(3):
            img = torch.full((1, 28, 28), 40 * label + k, dtype=torch.uint8)
            (root / name / f"{k}.png").write_bytes(png_bytes(img))
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


def _dit_pt(tmp: Path, tiny) -> Path:
    """The tiny model (DiT size "test") saved as an original facebookresearch DiT .pt."""
    from raydistill.models.dit import DIT_SIZES, DiTConfig
    from raydistill.models.dit_convert import _SHARED, diffusers_to_original, load_dit

    sd = load_dit(tiny[0]).state_dict()
    for key in _SHARED.values():  # the original layout has one embedder: tie the tiny model's per-block copies
        for i in range(1, DIT_SIZES["test"].depth):
            sd[f"transformer_blocks.{i}.{key}"] = sd[f"transformer_blocks.0.{key}"]
    pt = tmp / "dit.pt"
    torch.save(diffusers_to_original(sd, DiTConfig(size="test", input_size=8, num_classes=10)), pt)
    return pt


def _yaml(tmp: Path, text: str) -> Path:
    p = tmp / "cfg.yaml"
    p.write_text(text)
    return p


class _Evil:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that a checkpoint would execute code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_pt(tmp: Path) -> Path:
    pt = tmp / "evil.pt"
    torch.save({"model": _Evil(tmp / "code-ran")}, pt)
    return pt


def _junk(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _unfinished(tmp: Path) -> Path:
    """The set ``_random_set`` makes, killed after its first shard: one shard manifest in the sidecar, no manifest."""
    from raydistill.distill import ShardRunner, plan_shards, selected_labels
    from raydistill.outputs import DistilledSetWriter

    cfg = DistillConfig(data_root=F, classes=("0", "1"), ipc=3, method="random", seed=0, out=str(tmp / "set"))
    runner = ShardRunner(cfg)
    writer = DistilledSetWriter(cfg.out, runner.ds.class_names, cfg.fingerprint(), cfg.generation_key())
    shard = plan_shards(cfg, selected_labels(cfg, runner.ds))[1]
    writer.commit(shard.shard_id, *runner.run(shard))
    return tmp / "set"


def _edited(tmp: Path, how: str) -> Path:
    """A random set (seed 0, classes 0,1, IPC 3) under ``tmp/set``, finished or not, then changed by hand ``how``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.outputs import shards_dir

    if how == "shard garbage":
        out = _unfinished(tmp)
        (shards_dir(out) / "c0001-i00000.parquet").write_bytes(b"PAR1 not really")
        return out
    if how == "shard png":
        out = _unfinished(tmp)
        (out / "trouser" / "1.png").write_bytes(png_bytes(torch.zeros(1, 28, 28, dtype=torch.uint8)))
        return out
    out = _random_set(tmp / "set", seed=0)
    manifest = out / "manifest.parquet"
    if how == "png":
        (out / "trouser" / "1.png").write_bytes(png_bytes(torch.zeros(1, 28, 28, dtype=torch.uint8)))
    elif how == "manifest path":
        rows = pq.read_table(manifest).to_pylist()
        rows[0]["path"] = "../../escaped.png"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    elif how == "manifest":
        rows = pq.read_table(manifest).to_pylist()
        pq.write_table(pa.Table.from_pylist(rows[1:]), manifest)
    return out


def _folder(tmp: Path, bad_class: str) -> Path:
    root = tmp / "folder"
    for name in ("cat", bad_class):
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "0.png").write_bytes(png_bytes(torch.zeros(3, 8, 8, dtype=torch.uint8)))
    return root


def _damaged_model(t: Path, tiny, how: str) -> list[str]:
    """Distill flags with a copy of the tiny model damaged ``how``: a truncated DiT, a VAE whose config.json does
    not describe its weights."""
    import json

    dit, vae = shutil.copytree(tiny[0], t / "dit"), shutil.copytree(tiny[1], t / "vae")
    if how == "truncated dit":
        w = dit / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        cfg = json.loads((vae / "config.json").read_text())
        cfg["block_out_channels"] = [16, 16, 16]
        (vae / "config.json").write_text(json.dumps(cfg))
    return ["--model", str(dit), "--vae", str(vae)]


def _corrupt_folder(t: Path) -> Path:
    """A `folder` dataset whose class 'dog' holds one garbage .png among good ones."""
    root = t / "folder"
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for k in range(2):
            (root / "train" / name / f"{k}.png").write_bytes(png_bytes(torch.full((3, 8, 8), k, dtype=torch.uint8)))
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


def _resume(t: Path, how: str) -> tuple[list[str], Path]:
    """The command that made ``_edited``'s set, rerun on it after the hand edit."""
    out = _edited(t, how)
    return _distill(t, "--method", "random", "--seed", "0", "--out", str(out)), out


# Each case: (tmp, tiny model) -> (argv, folder that must stay byte-identical or None), and a regex for the line.
Case = Callable[[Path, tuple], tuple[list[str], Path | None]]
CASES: dict[str, tuple[Case, str]] = {
    "missing data root": (lambda t, m: (["distill", "--data-root", str(t / "nope"), "--method", "random"], None),
                          r"Fashion-MNIST directory .*nope not found"),
    "unknown dataset": (lambda t, m: (["distill", "--dataset", "nosuch"], None), r"unknown dataset 'nosuch'"),
    "unknown class": (lambda t, m: (_distill(t, "--classes", "nosuch"), None), r"unknown class 'nosuch'"),
    "ipc 0": (lambda t, m: (_distill(t, "--ipc", "0"), None), r"IPC must be a positive integer, got 0"),
    "ipc -3": (lambda t, m: (_distill(t, "--ipc", "-3"), None), r"IPC must be a positive integer, got -3"),
    "ipc not a number": (lambda t, m: (_distill(t, "--ipc", "ten"), None), r"--ipc: invalid int value: 'ten'"),
    "steps 0 (argparse)": (lambda t, m: (_distill(t, "--steps", "0"), None),
                           r"--steps: must be a positive integer, got 0"),
    "unknown option": (lambda t, m: (_distill(t, "--bogus"), None), r"unrecognized arguments: --bogus"),
    "unknown command": (lambda t, m: (["bogus"], None), r"invalid choice: 'bogus'"),
    "no command": (lambda t, m: ([], None), r"required: command"),
    "unknown method": (lambda t, m: (_distill(t, "--method", "nosuch"), None), r"unknown method 'nosuch'"),
    "missing model path": (lambda t, m: (_distill(t, "--model", str(t / "missing.pt"), "--vae", str(m[1])), None),
                           r"DiT checkpoint not found: .*missing\.pt"),
    "model without vae": (lambda t, m: (_distill(t, "--model", str(m[0])), None), r"--model is given without --vae"),
    "missing vae path": (lambda t, m: (_distill(t, "--model", str(m[0]), "--vae", str(t / "novae")), None),
                         r"VAE not found at .*novae"),
    "unknown model size": (lambda t, m: (_distill(t, "--model", str(m[0]), "--vae", str(m[1]), "--model-size", "XXL"),
                                         None), r"unknown DiT size 'XXL'"),
    "pt does not fit model size": (
        lambda t, m: (_distill(t, "--model", str(_dit_pt(t, m)), "--vae", str(m[1]), "--model-size", "fmnist"), None),
        r"dit\.pt does not match DiT-fmnist: x_embedder\.proj\.weight has shape \(32, 4, 2, 2\), expected "
        r"\(192, 4, 2, 2\).*choose --model-size test"),
    "eval preset nosuch": (lambda t, m: (_distill(t, "--method", "random", "--eval-preset", "nosuch"), None),
                           r"unknown evaluation preset 'nosuch'"),
    "eval nets nosuch": (lambda t, m: (_distill(t, "--method", "random", "--eval-nets", "convnet,nosuch"), None),
                         r"unknown evaluation net 'nosuch'"),
    "config unknown key": (lambda t, m: (["distill", "--config", str(_yaml(t, "ipc: 3\nbogus_key: 1\n"))], t),
                           r"unknown config key\(s\): bogus_key"),
    "config not yaml": (lambda t, m: (["distill", "--config", str(_yaml(t, "ipc: [3\nseed: {\n"))], t),
                        r"cfg\.yaml is not valid YAML"),
    "config not a mapping": (lambda t, m: (["distill", "--config", str(_yaml(t, "- 1\n- 2\n"))], t),
                             r"must hold a mapping"),
    "config missing": (lambda t, m: (["distill", "--config", str(t / "none.yaml")], None),
                       r"config file not found: .*none\.yaml"),
    "out holds other settings": (
        lambda t, m: (_distill(t, "--method", "random", "--seed", "0", "--out", str(_random_set(t / "set", seed=1))),
                      t),
        r"set holds a distilled set made with other settings \(differs in: seed\); choose another --out, or pass "
        r"--overwrite"),
    "baseline folder holds other settings": (
        lambda t, m: (_distill(t, "--model", str(m[0]), "--vae", str(m[1]), "--out", str(t / "new"), "--seed", "0"),
                      _random_set(t / "runs" / "fashion-mnist" / "random-ipc3-seed0", classes=("0", "2"))),
        r"random-ipc3-seed0 holds a distilled set made with other settings"),
    "out is a file": (lambda t, m: (_distill(t, "--method", "random", "--out", str(_yaml(t, "x: 1\n"))), t),
                      r"output folder .*cfg\.yaml is a file"),
    "evaluate corrupt png": (lambda t, m: (["evaluate", str(_png_tree(t / "set", "trouser/1.png")), "--data-root", F,
                                            "--classes", "0,1"], t / "set"),
                             r"corrupt image .*set/trouser/1\.png"),
    "evaluate missing dir": (lambda t, m: (["evaluate", str(t / "nope"), "--data-root", F], None),
                             r"distilled set not found: .*nope"),
    "evaluate class missing in set": (
        lambda t, m: (["evaluate", str(_png_tree(t / "set")), "--data-root", F], t / "set"),
        r"class 'pullover' has no images"),
    "evaluate eval nets nosuch": (lambda t, m: (["evaluate", str(_png_tree(t / "set")), "--data-root", F, "--classes",
                                                 "0,1", "--eval-nets", "nosuch"], t / "set"),
                                  r"unknown evaluation net 'nosuch'"),
    "evaluate eval preset nosuch": (lambda t, m: (["evaluate", str(_png_tree(t / "set")), "--data-root", F,
                                                   "--classes", "0,1", "--eval-preset", "nosuch"], t / "set"),
                                    r"unknown evaluation preset 'nosuch'"),
    # method parameters (--set / extra:), windows and weights: refused before Ray starts
    "igd window reversed": (lambda t, m: (_distill(t, "--method", "igd", "--set", "igd_window=[45,30]"), None),
                            r"guidance window must be two integers \[low, high\] with low <= high, got \[45, 30\]"),
    "igd window not a pair": (lambda t, m: (_distill(t, "--method", "igd", "--set", "igd_window=30"), None),
                              r"guidance window must be two integers"),
    "igd scale negative": (lambda t, m: (_distill(t, "--method", "igd", "--set", "igd_scale=-5"), None),
                           r"igd_scale must be a finite number >= 0, got -5"),
    "igd gamma not a number": (lambda t, m: (_distill(t, "--method", "igd", "--set", "igd_gamma=lots"), None),
                               r"igd_gamma must be a finite number >= 0, got 'lots'"),
    "igd grad ipc 0": (lambda t, m: (_distill(t, "--method", "igd", "--set", "igd_grad_ipc=0"), None),
                       r"igd_grad_ipc must be a positive integer, got 0"),
    "igd surrogate missing": (lambda t, m: (_distill(t, "--method", "igd", "--set", f"surrogate={t / 'traj'}"),
                                            None), r"surrogate trajectory not found: .*traj"),
    "mgd3 mode method nosuch": (lambda t, m: (_distill(t, "--method", "mgd3", "--set", "mode_method=spectral"), None),
                                r"mode_method must be one of kmeans, gmm, got 'spectral'"),
    "mode scale negative": (lambda t, m: (_distill(t, "--method", "mgd3", "--set", "mode_scale=-0.1"), None),
                            r"mode_scale must be a finite number >= 0"),
    "unknown --set key": (lambda t, m: (_distill(t, "--set", "igd_windw=[30,45]"), None),
                          r"unknown method parameter\(s\): igd_windw"),
    "--set without =": (lambda t, m: (_distill(t, "--set", "igd_window"), None), r"expected KEY=VALUE"),
    "config igd window reversed": (
        lambda t, m: (["distill", "--config", str(_yaml(t, "method: igd\nextra: {igd_window: [45, 30]}\n"))], t),
        r"guidance window must be two integers"),
    "config ipc not a number": (lambda t, m: (["distill", "--config", str(_yaml(t, "ipc: ten\n"))], t),
                                r"IPC must be a positive integer, got 'ten'"),
    "config cfg weight negative": (lambda t, m: (["distill", "--config", str(_yaml(t, "cfg_scale: -2\n"))], t),
                                   r"cfg_scale must be a finite number >= 0, got -2"),
    "config classes nosuch": (lambda t, m: (["distill", "--data-root", F, "--config",
                                             str(_yaml(t, "classes: [trouser, nosuch]\n"))], t),
                              r"unknown class 'nosuch'"),
    "image size 0": (lambda t, m: (_distill(t, "--image-size", "0"), None), r"--image-size: must be a positive"),
    # checkpoint files: read without executing code
    "checkpoint is an unsafe pickle": (
        lambda t, m: (_distill(t, "--model", str(_evil_pt(t)), "--vae", str(m[1]), "--model-size", "test"), t),
        r"evil\.pt holds Python objects besides tensors and would need unsafe unpickling"),
    "checkpoint is junk": (
        lambda t, m: (_distill(t, "--model", str(_junk(t, "dit.pt", b"not a checkpoint")), "--vae", str(m[1])), t),
        r"cannot read .*dit\.pt as a torch checkpoint"),
    # class names that would escape the output folder
    "folder class name with ..": (lambda t, m: (["distill", "--dataset", "folder", "--data-root",
                                                 str(_folder(t, "a..b")), "--method", "random"], t / "folder"),
                                  r"class name 'a\.\.b'"),
    # a set edited by hand after it was written: resuming it is refused, nothing is touched
    "resume: png replaced": (lambda t, m: _resume(t, "png"),
                             r"trouser/1\.png is missing or does not match its sha256 in manifest\.parquet "
                             r".*pass --overwrite"),
    "resume: shard png replaced": (lambda t, m: _resume(t, "shard png"),
                                   r"trouser/1\.png is missing or does not match its sha256 in shard manifest "
                                   r"c0001-i00000\.parquet .*delete .*c0001-i00000\.parquet to make that shard "
                                   r"again, or pass --overwrite"),
    "resume: manifest path escapes": (lambda t, m: _resume(t, "manifest path"),
                                      r"manifest\.parquet has a malformed row"),
    "resume: shard manifest garbage": (lambda t, m: _resume(t, "shard garbage"),
                                       r"shard manifest c0001-i00000\.parquet is not a readable parquet file"),
    "resume: manifest rows removed": (lambda t, m: _resume(t, "manifest"),
                                      r"t-shirt_top/0\.png is in the set but not in manifest\.parquet .*remove it"),
    # issue 25.1: every float parameter finite and in range, before Ray starts
    "cfg scale nan": (lambda t, m: (_distill(t, "--cfg-scale", "nan"), None), r"cfg_scale must be a finite number "
                      r">= 0, got nan"),
    "cfg scale inf": (lambda t, m: (_distill(t, "--cfg-scale", "inf"), None), r"cfg_scale must be a finite number"),
    "cfg interval reversed": (lambda t, m: (_distill(t, "--cfg-interval", "600,80"), None),
                              r"cfg_interval must be two model timesteps LO,HI with 0 <= LO <= HI <= 999, got "
                              r"\(600, 80\).*--cfg-interval 80,580"),
    "cfg interval not two integers": (lambda t, m: (_distill(t, "--cfg-interval", "80"), None),
                                      r"'80' is not two integers LO,HI"),
    "config cfg interval past the schedule": (lambda t, m: (["distill", "--config",
                                                             str(_yaml(t, "cfg_interval: [80, 1000]\n"))], t),
                                              r"cfg_interval must be two model timesteps .*got \(80, 1000\)"),
    "igd scale nan": (lambda t, m: (_distill(t, "--method", "igd", "--set", "igd_scale=.nan"), None),
                      r"igd_scale must be a finite number >= 0, got nan"),
    "igd gamma inf": (lambda t, m: (_distill(t, "--method", "igd", "--set", "igd_gamma=.inf"), None),
                      r"igd_gamma must be a finite number >= 0, got inf"),
    "mode scale nan": (lambda t, m: (_distill(t, "--method", "mgd3", "--set", "mode_scale=.nan"), None),
                       r"mode_scale must be a finite number >= 0, got nan"),
    "surrogate lr nan": (lambda t, m: (["surrogate", "--local", "--out", str(t / "traj"), "--lr", "nan"], None),
                         r"surrogate lr must be a finite number > 0, got nan"),
    "surrogate lr inf": (lambda t, m: (["surrogate", "--local", "--out", str(t / "traj"), "--lr", "inf"], None),
                         r"surrogate lr must be a finite number > 0, got inf"),
    # issue 25.4: range checks
    "t_stop 100": (lambda t, m: (_distill(t, "--method", "mgd3", "--set", "t_stop=100"), None),
                   r"t_stop must be an integer in -1\.\.48 for 50 steps .*got 100"),
    "t_stop -5": (lambda t, m: (_distill(t, "--method", "mgd3", "--set", "t_stop=-5"), None),
                  r"t_stop must be an integer >= -1, got -5"),
    "seed -1": (lambda t, m: (_distill(t, "--method", "random", "--seed", "-1"), None),
                r"seed must be an integer >= 0, got -1"),
    "root is a file": (lambda t, m: (_distill(t, "--method", "random", "--root", str(_yaml(t, "x: 1\n"))), t),
                       r"output root .*cfg\.yaml is not a folder"),
    "ipc 1e9": (lambda t, m: (_distill(t, "--ipc", "1000000000"), None),
                r"IPC 1000000000 is above the limit of 10000 images per class"),
    "ipc above the class's real images": (lambda t, m: (_distill(t, "--method", "herding", "--ipc", "7000"), None),
                                          r"class 't-shirt_top' has 6000 training images, fewer than IPC 7000"),
    "classes twice": (lambda t, m: (_distill(t, "--classes", "coat,coat"), None),
                      r"class 'coat' is listed twice in classes"),
    "classes twice (name and label)": (lambda t, m: (_distill(t, "--classes", "coat,4"), None),
                                       r"class '4' \(coat\) is selected twice"),
    "classes empty": (lambda t, m: (_distill(t, "--classes", ""), None), r"classes is empty"),
    # issue 25.3: damaged model files and images found before Ray starts
    "dit weights truncated": (lambda t, m: (_distill(t, *_damaged_model(t, m, "truncated dit")), t / "dit"),
                              r"cannot read the DiT weights .*dit/diffusion_pytorch_model\.safetensors .*truncated"),
    "vae config does not match its weights": (
        lambda t, m: (_distill(t, *_damaged_model(t, m, "vae config")), t / "vae"),
        r"the VAE weights in .*vae do not match its config\.json: .* has shape"),
    "folder image corrupt": (lambda t, m: (["distill", "--dataset", "folder", "--data-root", str(_corrupt_folder(t)),
                                            "--method", "random", "--ipc", "1", "--root", str(t / "runs")],
                                           t / "folder"), r"cannot decode image .*dog/1\.png"),
    # issue 25: reading commands write nothing, flags are named as the user typed them
    "compare missing root": (lambda t, m: (["compare", "--root", str(t / "new")], None),
                             r"no raydistill runs in sqlite:///.*new/mlflow\.db \(no such database\)"),
    "compare empty root": (lambda t, m: (["compare", "--root", str(_empty(t / "empty"))], t / "empty"),
                           r"no raydistill runs in sqlite:///.*empty/mlflow\.db"),
    "evaluate num-evals 0": (lambda t, m: (["evaluate", str(_png_tree(t / "set")), "--data-root", F, "--classes",
                                            "0,1", "--num-evals", "0"], t / "set"),
                             r"--num-evals must be at least 1 to evaluate, got 0"),
    "evaluate ipc above set": (lambda t, m: (["evaluate", str(_png_tree(t / "set")), "--data-root", F, "--classes",
                                              "0,1", "--ipc", "5"], t / "set"),
                               r"has 3 images in .*fewer than IPC 5"),
    "evaluate corrupt png (truncated)": (
        lambda t, m: (["evaluate", str(_png_tree(t / "set")), "--data-root", F, "--classes", "0,1"], _truncate(t)),
        r"corrupt image .*set/t-shirt_top/0\.png"),
}
NO_FMNIST = {"missing data root", "unknown dataset", "unknown command", "no command", "config missing",
             "ipc 0", "ipc -3", "ipc not a number", "steps 0 (argparse)", "unknown option", "unknown method",
             "igd window reversed", "igd window not a pair", "igd scale negative", "igd gamma not a number",
             "igd grad ipc 0", "mgd3 mode method nosuch", "mode scale negative",
             "unknown --set key", "--set without =", "config igd window reversed", "config ipc not a number",
             "config cfg weight negative", "image size 0", "folder class name with ..", "cfg scale nan",
             "cfg scale inf", "cfg interval reversed", "cfg interval not two integers",
             "config cfg interval past the schedule", "igd scale nan", "igd gamma inf", "mode scale nan", "t_stop 100",
             "t_stop -5",
             "seed -1", "ipc 1e9", "folder image corrupt", "compare missing root", "compare empty root"}


def _empty(d: Path) -> Path:
    d.mkdir()
    return d


def _truncate(t: Path) -> Path:
    """Cut the first PNG of the tree ``_png_tree`` made under ``t/set`` in half; returns the set."""
    f = t / "set" / "t-shirt_top" / "0.png"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return t / "set"


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in NO_FMNIST else [needs_fmnist]) for n in CASES])
def test_bad_input_gives_one_line_and_exit_2(name: str, tmp_path: Path, tiny_model, guarded, capsys) -> None:
    build, pattern = CASES[name]
    argv, keep = build(tmp_path, tiny_model)
    before = _snapshot(keep) if keep is not None else None
    capsys.readouterr()  # drop whatever building the inputs printed
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("raydistill: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in out + err
    if keep is not None:
        assert _snapshot(keep) == before  # (compare on an empty root: no mlflow.db either)
    assert not (tmp_path / "new").exists()  # no main output folder was started either
    assert not (tmp_path / "code-ran").exists()  # no checkpoint ran code while being read


@needs_fmnist
def test_valid_inputs_pass_validation(tmp_path: Path, tiny_model, guarded, capsys) -> None:
    """The guard is reached (validation passed) for a resumable set, a new set with the tiny model, a fitting .pt,
    and a valid evaluate; nothing is written by validation."""
    s = _random_set(tmp_path / "set", seed=1)
    before = _snapshot(s)
    dit, vae = tiny_model
    pt = _dit_pt(tmp_path, tiny_model)
    for argv in (_distill(tmp_path, "--method", "random", "--seed", "1", "--out", str(s)),
                 _distill(tmp_path, "--model", str(dit), "--vae", str(vae), "--out", str(tmp_path / "new")),
                 _distill(tmp_path, "--model", str(pt), "--vae", str(vae), "--model-size", "test", "--method", "dit"),
                 ["evaluate", str(s), "--data-root", F, "--classes", "0,1", "--num-evals", "1"]):
        with pytest.raises(ReachedPipeline):
            main(argv)
    assert _snapshot(s) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()
    assert "Traceback" not in "".join(capsys.readouterr())


@pytest.mark.parametrize("args", [["distill", "--ipc", "0"], ["distill", "--steps", "0"]])
def test_subprocess_bad_input_exit_2_one_line(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "raydistill.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydistill: error: "), p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory


def test_python_dash_m_raydistill_and_a_plain_pickle_give_only_our_line(tmp_path: Path, tiny_model) -> None:
    """``python -m raydistill`` (``__main__.py``) runs the CLI; a plain pickle (protocol 4) as --model gives our one
    line and not torch's protocol warning before it."""
    import pickle

    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["distill", "--ipc", "0"],
                 _distill(tmp_path, "--model", str(tmp_path / "plain.pt"), "--vae", str(tiny_model[1]),
                          "--model-size", "test")):
        p = subprocess.run([sys.executable, "-m", "raydistill", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("raydistill: error: "), p.stderr
    assert "cannot read" in p.stderr and "plain.pt as a torch checkpoint" in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plain.pt"]


def test_console_script_matches_module(tmp_path: Path) -> None:
    """The installed ``raydistill`` entry point behaves like ``python -m raydistill.cli``."""
    exe = shutil.which("raydistill", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("raydistill console script not installed next to this interpreter")
    p = subprocess.run([exe, "distill", "--ipc", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
