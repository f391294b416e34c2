"""jobs/configs/paper/*.yaml (issue 24 item 1): every published cell is a config that parses through
``raydistill distill --preset``, names a real method and carries the spec's numbers.

The tables below are typed from ../shared/spec/benchmarks.md section 2 and methods.md (sections 0.4, 1.1-1.6, 2.1,
2.3, 2.6, 3.2-3.3), independently of jobs/configs/paper/generate.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from raydistill.cli import _config, build_parser
from raydistill.methods import get_method
from raydistill.methods.minimax.finetune import FinetuneConfig
from raydistill.reproduce import published_band

PAPER = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "paper"
FILES = sorted(PAPER.glob("*.yaml"))
W, N, D, H, K = "imagewoof", "imagenette", "imageidc", "imagenet-100", "imagenet-1k"
A, C, R = "resnet_ap10", "convnet", "resnet18"
MGD3_FT = "minimax+mgd3"  # MGD3's ImageWoof rows: mode guidance on a plainly fine-tuned DiT (methods.md 3.3)

# (dataset, IPC, method, net) -> (accuracy, std)
SPEC: dict[tuple, tuple] = {
    (W, 10, "dit", A): (34.7, None), (W, 10, "minimax", A): (39.2, 1.3), (W, 10, MGD3_FT, A): (40.4, None),
    (W, 10, "minimax-igd", A): (43.3, 0.3), (W, 10, "random", A): (29.4, None),
    (W, 50, "dit", A): (49.3, None), (W, 50, "minimax", A): (56.3, 1.0), (W, 50, MGD3_FT, A): (56.5, None),
    (W, 50, "random", A): (47.2, None),
    (W, 10, "dit", C): (34.2, None), (W, 10, "dit", R): (34.7, None), (W, 10, "minimax", C): (37.0, 1.0),
    (W, 10, "minimax", R): (37.6, 0.9), (W, 10, "random", C): (24.3, None), (W, 10, "random", R): (27.7, None),
    (W, 10, MGD3_FT, C): (34.7, None), (W, 10, MGD3_FT, R): (38.5, None),
    (W, 50, "dit", C): (46.5, None), (W, 50, "dit", R): (50.1, None), (W, 50, "minimax", C): (53.9, 0.6),
    (W, 50, "minimax", R): (57.1, 0.6), (W, 50, "random", C): (41.3, None), (W, 50, "random", R): (47.9, None),
    (W, 50, MGD3_FT, C): (54.5, None), (W, 50, MGD3_FT, R): (58.3, None),
    (N, 10, "dit", A): (59.1, None), (N, 10, "minimax", A): (62.0, 0.2), (N, 10, "mgd3", A): (66.4, 2.4),
    (N, 10, "minimax-igd", A): (65.3, None), (N, 10, "random", A): (54.2, None),
    (N, 50, "dit", A): (73.3, None), (N, 50, "minimax", A): (76.6, 0.2), (N, 50, "mgd3", A): (79.5, 1.3),
    (N, 50, "random", A): (76.1, None),
    (N, 10, "mgd3", C): (59.6, None), (N, 10, "mgd3", R): (64.4, None), (N, 10, "igd", C): (61.9, None),
    (N, 10, "minimax", C): (58.2, None),
    (D, 10, "dit", A): (54.1, None), (D, 10, "minimax", A): (53.1, 0.2), (D, 10, "mgd3", A): (55.9, 2.1),
    (D, 10, "random", A): (48.1, None),
    (D, 50, "dit", A): (64.3, None), (D, 50, "minimax", A): (69.6, 0.2), (D, 50, "mgd3", A): (72.1, 0.8),
    (D, 50, "random", A): (68.1, None),
    (H, 10, "mgd3", C): (23.4, None), (H, 10, "mgd3", A): (25.8, None), (H, 10, "mgd3", R): (23.6, None),
    (H, 20, "mgd3", C): (30.6, None), (H, 20, "mgd3", A): (33.9, None), (H, 20, "mgd3", R): (32.6, None),
    (H, 50, "mgd3", R): (51.8, None),
    (H, 10, "minimax", C): (22.3, None), (H, 10, "minimax", A): (24.8, None), (H, 10, "minimax", R): (22.5, None),
    (H, 20, "minimax", C): (29.3, None), (H, 20, "minimax", A): (32.3, None), (H, 20, "minimax", R): (31.2, None),
    (K, 10, "dit", R): (39.6, 0.4), (K, 10, "minimax", R): (44.3, 0.5), (K, 10, "mgd3", R): (45.6, None),
    (K, 10, "igd", R): (45.5, None), (K, 10, "minimax-igd", R): (46.2, None),
    (K, 50, "dit", R): (52.9, 0.6), (K, 50, "minimax", R): (58.6, 0.3), (K, 50, "mgd3", R): (60.2, None),
    (K, 50, "igd", R): (59.8, None), (K, 50, "minimax-igd", R): (60.3, None),
}
RERUNS = {(W, 10, "minimax-igd", A): [35.6, 35.8], (W, 10, "minimax", A): [36.2]}  # DD_IGD #4, MinimaxDiffusion #11
TABLE7 = {(N, "igd", 10): (5, 50), (W, "minimax-igd", 10): (10, 50), (N, "minimax-igd", 10): (15, 10),
          (K, "igd", 10): (5, 120), (K, "igd", 50): (5, 120), (K, "minimax-igd", 10): (10, 100),
          (K, "minimax-igd", 50): (10, 100)}
IGD_EPOCHS = {W: [0, 5, 16, 40], N: [0, 2, 11, 40], K: [0, 5, 18, 50]}  # 1k: the released 52 is out of range
MINIMAX = {"steps": 12000, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9999, "lambda_pos": 0.002,
           "lambda_neg": 0.008, "memory_size": 64}


def _parse(path: Path, tmp_path: Path, *more: str):
    argv = ["distill", "--preset", str(path), "--data-root", str(tmp_path / "imagenet"), "--model",
            str(tmp_path / "dit.pt"), *more]
    return _config(build_parser().parse_args(argv))


def test_one_config_per_published_cell():
    found = {}
    for f in FILES:
        d = yaml.safe_load(f.read_text())
        found[d["dataset"], d["ipc"], d["method"], d["eval_nets"][0]] = f.name
    assert set(found) == set(SPEC)
    assert len(FILES) == len(SPEC)


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_config_parses_and_carries_the_spec(path: Path, tmp_path: Path):
    cfg = _parse(path, tmp_path)
    assert cfg.data_root == str(tmp_path / "imagenet") and cfg.model == str(tmp_path / "dit.pt")  # flags win
    assert cfg.vae == "/models/sd-vae-ft-mse" and cfg.model_size == "XL/2" and cfg.image_size == 256
    assert get_method(cfg.method).name == cfg.method and cfg.baselines == ()  # a registered, canonical name
    key = (cfg.dataset, cfg.ipc, cfg.method, cfg.eval_nets[0])
    acc, std = SPEC[key]
    p = cfg.published
    assert (p["accuracy"], p["std"], p["net"]) == (acc, std, cfg.eval_nets[0]) and len(cfg.eval_nets) == 1
    assert p.get("reruns", []) == RERUNS.get(key, [])
    band = published_band(p)
    half = max(std or 0.0, 2.0)
    assert (band.low, band.high) == (pytest.approx(acc - half), pytest.approx(acc + half))
    # spec 0.1: DiT-XL/2, 50 DDPM steps, CFG 4; 0.4 / 0.5: idc hard labels on subsets, RDED soft labels on 1K
    assert (cfg.steps, cfg.sampler, cfg.cfg_scale) == (50, "ddpm", 4.0)
    assert cfg.eval_preset == ("rded" if cfg.dataset == K else "idc")
    igd = cfg.method.endswith("igd")
    assert cfg.num_evals == p["runs"] == (5 if igd else 3) and cfg.seed == (1 if igd else 0)
    ex = cfg.extra
    if igd:
        assert (ex["igd_scale"], ex["igd_gamma"]) == TABLE7[cfg.dataset, cfg.method, cfg.ipc]
        assert ex["igd_epochs"] == IGD_EPOCHS[cfg.dataset] and ex["igd_window"] == [30, 45]
        assert (ex["igd_grad_ipc"], ex["igd_memory"], ex["igd_impl"]) == (200, 64, "reference")
    if "mgd3" in cfg.method:
        assert (ex["mode_scale"], ex["t_stop"], ex["mode_method"], ex["mode_snap"]) == (0.1, 25, "kmeans", False)
    if cfg.method.startswith("minimax"):
        recipe = p["finetune"]
        want = {**MINIMAX, **({"lambda_pos": 0.0, "lambda_neg": 0.0} if cfg.method == MGD3_FT else {})}
        assert {k: recipe[k] for k in want} == want
        FinetuneConfig(**recipe)  # the recipe is valid `raydistill finetune` settings
        assert "finetune" in ex
    else:
        assert "finetune" not in p and "finetune" not in ex
    # the method parameters are known keys of the right types: the registry parses them when the config is made
    spec = get_method(cfg.method)
    assert set(ex) - {"finetune", "surrogate"} <= spec.param_keys() and spec.parse(ex, cfg) is not None


def test_committed_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("paper_generate", PAPER / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for cell in gen.CELLS:
        cfg, needs = gen.cell_config(*cell)
        name = gen.file_name(*cell[:4])
        label = cell[2]
        body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100)
        assert (PAPER / name).read_text() == gen.header(cfg, label, needs, name) + body, name


def test_published_block_is_checked(tmp_path: Path):
    from raydistill.errors import UserError

    bad = tmp_path / "bad.yaml"
    for published, msg in (({"accuracy": 40.0, "net": "resnet18"}, "lacks 'source'"),
                           ({"accuracy": "40", "net": "resnet18", "source": "x"}, "wrong type"),
                           ({"accuracy": 40.0, "net": "resnet18", "source": "x", "mean": 1}, "unknown published key"),
                           ({"accuracy": 40.0, "net": "resnet18", "source": "x", "reruns": ["a"]}, "reruns")):
        bad.write_text(yaml.safe_dump({"method": "dit", "published": published}))
        with pytest.raises(UserError, match=msg):
            _config(build_parser().parse_args(["distill", "--preset", str(bad)]))
