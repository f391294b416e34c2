"""The method registry: names derived from parts, typed parameters, the docs and --help generated from it, and a
user's own guidance part loaded from outside the package (docs/METHODS.md, "Adding a method") through `raydistill
distill` on Ray and in-process."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from raydistill.config import DistillConfig
from raydistill.errors import UserError
from raydistill.methods import get_method, method_names, methods_markdown
from raydistill.methods import registry as reg
from tests.test_method_hashes import set_digest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "METHODS.md"


def test_combinations_are_derived_from_the_parts() -> None:
    assert method_names()[:7] == ["random", "herding", "recon", "dit", "mgd3", "igd", "minimax"]
    assert {"mgd3+igd", "minimax+mgd3", "minimax-igd"} <= set(method_names())
    spec = get_method("minimax-igd")
    assert [p.name for p in spec.parts] == ["minimax", "igd"] and spec.base == "minimax" and spec.whole_class
    assert get_method("mgd3+igd").precompute == ("modes",) and get_method("mgd3+igd").base == "dit"
    assert not get_method("minimax+mgd3").whole_class and get_method("minimax+mgd3+igd").whole_class
    assert get_method("herding").real is not None and not get_method("herding").generative
    for name, match in [("igd+mgd3", r"spelled 'mgd3\+igd'"), ("minimax+igd", "spelled 'minimax-igd'"),
                        ("dit+mgd3", "cannot be combined"), ("random+mgd3", "cannot be combined"),
                        ("mgd3+mgd3", "cannot be combined"), ("mgd3+nosuch", "unknown method 'mgd3\\+nosuch'")]:
        with pytest.raises(UserError, match=match):
            get_method(name)


def test_parameters_are_typed_with_defaults_and_checked_once() -> None:
    cfg = DistillConfig(method="mgd3+igd", extra={"mode_scale": 0.2, "igd_window": [10, 20]})
    p = get_method(cfg.method).parse(cfg.extra, cfg)
    assert (p["mgd3"].mode_scale, p["mgd3"].t_stop, p["igd"].igd_window, p["igd"].igd_impl) == (0.2, 25, (10, 20),
                                                                                               "fast")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p["mgd3"].t_stop = 3
    for extra, match in [({"mode_scale": float("nan")}, "mode_scale must be a finite number >= 0, got nan"),
                         ({"t_stop": 49}, r"t_stop must be an integer in -1\.\.48"),
                         ({"mode_snap": "yes"}, "mode_snap must be true or false"),
                         ({"igd_memory": True}, "igd_memory must be a positive integer"),
                         ({"herding_pool": 0}, "herding_pool must be a positive integer")]:
        with pytest.raises(UserError, match=match):
            DistillConfig(method="dit", extra=extra)  # checked whatever the method: baselines share extra
    assert DistillConfig(steps=10, method="mgd3", extra={"t_stop": 8}).extra == {"t_stop": 8}


def test_docs_and_help_list_every_parameter_from_the_registry(capsys) -> None:
    text = DOCS.read_text()
    block = text[text.index("<!-- registry:begin -->"):text.index("<!-- registry:end -->")]
    assert block.strip().removeprefix("<!-- registry:begin -->").strip() == methods_markdown().strip()
    from raydistill.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    for p in reg.parts():
        assert re.search(rf"^  {re.escape(p.name)} ", out, re.M), p.name
        for name, _, _ in reg.param_rows(p.params):
            assert f"--set {name}=" in out, name


PLUGIN = DOCS.read_text().split("## Adding a method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def plugin(tmp_path):
    """The documented example written to a file outside the package; unregistered afterwards."""
    path = tmp_path / "my_shrink.py"
    path.write_text(PLUGIN)
    yield path
    reg._REGISTRY.pop("shrink", None)


def test_a_users_guidance_part_runs_through_distill_on_ray_and_in_process(plugin, tiny_model, tmp_path,
                                                                           capsys) -> None:
    from raydistill.cli import main
    from raydistill.distill import distill_local

    dit, vae = tiny_model
    common = dict(dataset="digits", classes=("0", "1"), ipc=2, steps=4, model=str(dit), vae=str(vae))
    with pytest.raises(UserError, match="unknown method 'shrink'"):
        DistillConfig(method="shrink", **common)
    argv = ["distill", "--plugin", str(plugin), "--method", "shrink", "--dataset", "digits", "--classes", "0,1",
            "--ipc", "2", "--steps", "4", "--model", str(dit), "--vae", str(vae), "--set", "shrink_scale=0.5",
            "--set", "shrink_from=2", "--baselines", "dit", "--num-evals", "0", "--root", str(tmp_path / "runs"),
            "--out", str(tmp_path / "ray")]
    assert main(argv) == 0, capsys.readouterr().err
    assert "shrink" in capsys.readouterr().out  # the result table names the set
    cfg = DistillConfig(method="shrink", plugins=(str(plugin),), out=str(tmp_path / "local"),
                        extra={"shrink_scale": 0.5, "shrink_from": 2}, **common)
    distill_local(cfg, device="cpu")
    ray_set, local_set = tmp_path / "ray", tmp_path / "local"
    assert set_digest(ray_set) == set_digest(local_set)  # Ray actors imported the plugin and made the same bytes
    assert set_digest(ray_set) != set_digest(tmp_path / "runs" / "digits" / "dit-ipc2-seed0")  # the term acted
    spec = get_method("mgd3+shrink")  # it combines with the built-in parts, in registration order
    assert [p.name for p in spec.parts] == ["mgd3", "shrink"]
    with pytest.raises(UserError, match="shrink_scale must be a finite number >= 0, got -1"):
        DistillConfig(method="shrink", plugins=(str(plugin),), extra={"shrink_scale": -1}, **common)


def test_a_broken_or_missing_plugin_is_one_line(tmp_path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('oops')\n")
    with pytest.raises(UserError, match=r"plugin .*broken\.py failed to import: RuntimeError: oops"):
        DistillConfig(plugins=(str(bad),))
    with pytest.raises(UserError, match="plugin file not found"):
        DistillConfig(plugins=(str(tmp_path / "none.py"),))
    with pytest.raises(UserError, match="cannot import plugin module 'no_such_plugin_module'"):
        DistillConfig(plugins=("no_such_plugin_module",))
