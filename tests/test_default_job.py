"""`raydistill distill` alone runs the built-in default preset (the best measured for the built-in model) next to
plain DiT at the same CFG and the random real subset; anything the user names leaves the library defaults."""

from __future__ import annotations

import yaml

from raydistill.cli import _config, build_parser
from raydistill.config import BUILTIN_DEFAULT_PRESET, DistillConfig
from raydistill.distill import set_configs


def _cfg(*argv: str) -> DistillConfig:
    return _config(build_parser().parse_args(["distill", *argv]))


def test_plain_distill_runs_the_builtin_default_preset():
    preset = yaml.safe_load(BUILTIN_DEFAULT_PRESET.read_text())
    cfg = _cfg()
    assert (cfg.method, cfg.cfg_scale, cfg.extra) == (preset["method"], preset["cfg_scale"], preset.get("extra", {}))
    assert cfg.baselines == tuple(preset["baselines"]) and {"dit", "random"} <= set(cfg.baselines)
    again = _cfg("--ipc", "50", "--num-evals", "3")  # flags override single keys and keep the rest
    assert (again.ipc, again.num_evals, again.method, again.cfg_scale) == (50, 3, cfg.method, cfg.cfg_scale)


def test_naming_a_method_model_config_or_dataset_leaves_the_library_defaults(tmp_path):
    library = DistillConfig()
    conf = tmp_path / "c.yaml"
    conf.write_text("ipc: 2\n")
    for argv in (["--method", "dit"], ["--model", str(tmp_path / "dit")], ["--dataset", "digits"],
                 ["--config", str(conf)]):
        cfg = _cfg(*argv)
        assert (cfg.cfg_scale, cfg.baselines, cfg.extra) == (library.cfg_scale, library.baselines, {}), argv
    assert _cfg("--method", "mgd3").method == "mgd3"


def test_a_generative_baseline_is_the_plain_baseline_at_the_methods_cfg(tmp_path):
    cfg = DistillConfig(method="mgd3", cfg_scale=2.0, extra={"mode_scale": 0.2, "t_stop": 20},
                        baselines=("dit", "random"))
    sets = set_configs(cfg, tmp_path)
    assert sets["mgd3"].extra == {"mode_scale": 0.2, "t_stop": 20}
    assert (sets["dit"].extra, sets["dit"].cfg_scale) == ({}, 2.0)
    plain = DistillConfig(method="dit", cfg_scale=2.0)  # the same set as plain DiT run on its own at that CFG
    assert sets["dit"].fingerprint() == plain.fingerprint()
    assert sets["dit"].fingerprint() != DistillConfig(method="dit").fingerprint()  # CFG 4: other images
    assert sets["random"].extra == cfg.extra  # real subsets ignore extra and keep the keys their sets were made with
