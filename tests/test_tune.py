"""`raydistill tune` and `compare`: space files, a tiny real Ray Tune study tracked in a real sqlite MLflow store."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from raydistill.cli import main
from raydistill.errors import UserError
from raydistill.evaluate.presets import get_preset
from raydistill.tune_space import load_space
from tests.conftest import needs_fmnist

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_load_and_validate(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    space = load_space(path, {"surrogate": "/nowhere"})  # IGD's surrogate is only opened when a trial runs
    cfg = space.base_config()
    assert cfg.method == data["config"]["method"] and space.params and space.num_samples >= 12
    assert space.scheduler["name"] == "asha" and 0 < space.eval_every < space.eval_epochs()
    # the proxy's winner is confirmed against the defaults on the full protocol, one net each (docs/TUNE.md)
    assert space.confirm_top >= 1 and space.confirm_defaults
    assert space.confirm_config == {"classes": None, "eval_epochs": None, "num_evals": 1}
    full = get_preset(cfg.eval_preset).epochs  # dc 300, dsa 1,000
    assert space.eval_epochs() == cfg.eval_epochs < full  # a shortened evaluation under the preset
    values = {p.name: (p.values[0] if p.values else p.high) for p in space.params}
    trial = space.trial_config(values)  # config fields (cfg_scale) set the field, method parameters go to extra
    assert {p.name: getattr(trial, p.name) if p.is_field else trial.extra.get(p.name) for p in space.params} == values
    assert not any(p.name in trial.extra for p in space.params if p.is_field)


def _space(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


GOOD = """name: t
config: {method: mgd3, ipc: 2}
params: {mode_scale: {dist: uniform, low: 0.0, high: 1.0}}
"""
BAD = {
    "no params": ("name: t\nconfig: {method: mgd3}\n", r"params must map at least one parameter"),
    "bad dist": (GOOD.replace("uniform", "gaussian"), r"params\.mode_scale needs dist: one of uniform"),
    "low above high": (GOOD.replace("high: 1.0", "high: -1.0"), r"params\.mode_scale has low 0 and high -1"),
    "unknown section": (GOOD + "bogus: 1\n", r"unknown section\(s\) bogus"),
    "unknown method": (GOOD.replace("mgd3", "nosuch"), r"config: unknown method 'nosuch'"),
    "unknown config key": (GOOD.replace("ipc: 2", "ipc: 2, colour: red"), r"unknown config key\(s\): colour"),
    "bad scheduler": (GOOD + "scheduler: {name: pbt}\n", r"unknown scheduler 'pbt'"),
    "bad samples": (GOOD + "budget: {num_samples: 0}\n", r"budget\.num_samples must be a positive integer"),
    "not yaml": ("params: [1\n", r"not valid YAML"),
    "confirm top": (GOOD + "confirm: {top: -1}\n", r"confirm\.top must be an integer >= 0, got -1"),
    "confirm searched": (GOOD.replace("mode_scale", "cfg_scale") + "confirm: {top: 1, config: {cfg_scale: 2.0}}\n",
                         r"confirm\.config cannot set cfg_scale"),
    "confirm method parameter": (GOOD + "confirm: {top: 1, config: {t_stop: 5}}\n",
                                 r"confirm\.config cannot set t_stop"),
    "confirm no nets": (GOOD + "confirm: {top: 1, config: {num_evals: 0}}\n",
                        r"confirm\.config\.num_evals must be an integer >= 1, got 0"),
    "confirm bad value": (GOOD + "confirm: {top: 1, config: {steps: 0}}\n", r"confirm\.config: steps and batch"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_is_one_clear_error(tmp_path: Path, capsys, case: str) -> None:
    text, pattern = BAD[case]
    assert main(["tune", str(_space(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydistill: error: search space "), err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert "; " in lines[0]  # problem; fix


@pytest.fixture(scope="module")
def studies(ray_local, tiny_model, tmp_path_factory):
    """Two tiny studies on one local Ray into one MLflow store: MGD3 on the tiny DiT (2 trials, shared state) and
    real random subsets over 6 seeds (their accuracies differ, so ASHA has something to stop)."""
    from raydistill.orchestration.tune_job import run_study

    tmp = tmp_path_factory.mktemp("tune")
    dit, vae = tiny_model
    mgd3 = _space(tmp, f"""name: tiny-mgd3
config: {{dataset: digits, image_size: 32, model: {dit}, vae: {vae}, method: mgd3, classes: ["0", "1"], ipc: 2,
          steps: 6, batch_size: 2, eval_epochs: 2, num_evals: 1, cfg_interval: [200, 600], extra: {{t_stop: 2}}}}
params:
  mode_scale: {{dist: grid, values: [0.0, 3.0]}}
  t_stop: {{dist: int, low: 0, high: 4}}
budget: {{num_samples: 1, max_concurrent: 1}}
evaluation: {{eval_every: 1}}
confirm: {{top: 1, defaults: true, config: {{classes: ["0", "1", "2"], eval_epochs: 3, num_evals: 2}}}}
""")
    seeds = tmp / "seeds.yaml"
    seeds.write_text("""name: seeds
config: {dataset: digits, method: random, classes: ["0", "1", "2"], ipc: 1, eval_epochs: 20, num_evals: 1}
params:
  seed: {dist: grid, values: [0, 1, 2, 3, 4, 5]}
budget: {num_samples: 1, max_concurrent: 1}
scheduler: {name: asha, grace_period: 5, reduction_factor: 2}
evaluation: {eval_every: 5}
""")
    a = run_study(load_space(mgd3), tmp / "runs", log=lambda m: None)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["tune", str(seeds), "--root", str(tmp / "runs")]) == 0  # the command itself
    (summary,) = (tmp / "runs" / "tune").glob("seeds-*/summary.json")
    return tmp / "runs", a, {**json.loads(summary.read_text()), "printed": printed.getvalue()}


def _runs(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["raydistill"])


def test_study_writes_parent_and_child_runs_sharing_state(studies, tiny_model) -> None:
    import mlflow

    root, summary, _ = studies
    runs = _runs(root)
    parent = runs[(runs["tags.kind"] == "study") & (runs["tags.study"] == "tiny-mgd3")]
    children = runs[(runs["tags.kind"] == "trial") & (runs["tags.study"] == "tiny-mgd3")]
    assert len(parent) == 1 and len(children) == 2 and not any(t["error"] for t in summary["trials"])
    assert set(children["tags.mlflow.parentRunId"]) == {parent.iloc[0]["run_id"]}
    assert sorted(float(v) for v in children["params.extra.mode_scale"]) == [0.0, 3.0]
    assert set(children["params.method"]) == {"mgd3"} and set(children["tags.tune.status"]) == {"completed"}
    assert all(0 <= a <= 100 for a in children["metrics.acc_dc_convnet_mean"])
    assert sorted(children["metrics.shared_state_reused"]) == [0.0, 1.0]  # the 2nd trial reused DiT + VAE
    for run_id in children["run_id"]:
        assert {"grid.png", "manifest.parquet"} <= {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert parent.iloc[0]["metrics.trials_completed"] == 2
    assert all(u.startswith((root.resolve() / "mlartifacts").as_uri()) for u in runs["artifact_uri"])

    # the best configuration is a preset `distill --preset` takes; explicit flags override it
    from raydistill.cli import _config, build_parser

    best = yaml.safe_load(Path(summary["proposed"]).read_text())  # the search's best (best.yaml: confirmed)
    best_trial = max(summary["trials"], key=lambda t: t["accuracy"])
    assert best["extra"]["mode_scale"] == best_trial["values"]["mode_scale"] and best["method"] == "mgd3"
    assert "classes" not in best and "out" not in best
    a = build_parser().parse_args(["distill", "--preset", summary["preset"], "--ipc", "3", "--set", "t_stop=3"])
    cfg = _config(a)
    assert cfg.ipc == 3 and cfg.extra["t_stop"] == 3 and cfg.extra["mode_scale"] == best["extra"]["mode_scale"]
    assert cfg.model == str(tiny_model[0]) and cfg.dataset == "digits" and cfg.method == "mgd3"


def test_confirmation_reruns_the_best_trial_and_the_defaults_on_the_full_protocol(studies) -> None:
    """``confirm``: the best trial and the space's fixed config (no searched value) are distilled again under
    confirm.config (here 3 classes, 3 epochs, 2 nets, where the trials had 2 classes, 2 epochs, 1 net) with the same
    seeds; the better becomes best.yaml, the search's winner proposed.yaml; each is an MLflow child run."""
    import torch

    from raydistill.distill import evaluate_images, load_distilled, open_dataset
    from raydistill.orchestration.tune_confirm import confirm_config
    from raydistill.orchestration.tune_job import format_summary
    from raydistill.tune_space import best_preset

    root, summary, _ = studies
    space = load_space(summary["space_file"])
    proposed = max(summary["trials"], key=lambda t: t["accuracy"])
    trial, defaults = summary["confirm"]
    assert (trial["label"], trial["values"], trial["proxy"]) == (f"trial-{proposed['trial_id']}",
                                                                  proposed["values"], proposed["accuracy"])
    assert (defaults["label"], defaults["values"], defaults["proxy"]) == ("defaults", {}, None)
    for c in (trial, defaults):  # the full protocol's set: 3 classes x IPC 2, two nets each
        assert sorted(p.name for p in Path(c["out"]).iterdir() if p.is_dir()) == ["0", "1", "2"]
        assert len(c["nets"]) == 2 and c["accuracy"] == pytest.approx(sum(c["nets"]) / 2)
    chosen = summary["confirmed"]
    better = trial if trial["accuracy"] > defaults["accuracy"] else defaults  # a tie goes to the defaults
    assert chosen["label"] == better["label"]
    assert yaml.safe_load(Path(summary["preset"]).read_text()) == best_preset(space, chosen["values"])
    assert yaml.safe_load(Path(summary["proposed"]).read_text()) == best_preset(space, proposed["values"])
    # the recorded accuracy is the set's own under the confirmation protocol (recomputed here, same seed)
    cfg = confirm_config(space, trial["values"], trial["out"])
    ds = open_dataset(cfg)
    x, y = load_distilled(cfg.out, ds, [0, 1, 2], ipc=cfg.ipc)
    torch.manual_seed(123)  # the evaluation seeds itself: no global state leaks in
    r = evaluate_images(x, y, ds, cfg.eval_preset, "convnet", 2, seed=cfg.seed, epochs=3, device="cpu")
    assert r.last_accs == pytest.approx(trial["nets"])
    runs = _runs(root)
    confirms = runs[(runs["tags.kind"] == "confirm") & (runs["tags.study"] == "tiny-mgd3")]
    assert sorted(confirms["tags.contender"]) == sorted([trial["label"], "defaults"])
    assert set(confirms["params.num_evals"]) == {"2"} and (confirms["status"] == "FINISHED").all()
    parent = runs[(runs["tags.kind"] == "study") & (runs["tags.study"] == "tiny-mgd3")].iloc[0]
    assert set(confirms["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert parent["metrics.confirmed_accuracy"] == pytest.approx(chosen["accuracy"])
    assert parent["params.confirmed.label"] == chosen["label"]
    assert f"the search's best: {summary['proposed']}" in format_summary(summary, "accuracy")


def test_confirmation_choice_ties_and_min_mode(tmp_path: Path) -> None:
    """The contenders are the top trials in the metric's order, then the defaults; a tie goes to the defaults, then
    to the better-ranked trial; a failed contender is never chosen; ``mode: min`` reverses every order."""
    from dataclasses import replace

    from raydistill.orchestration.tune_confirm import confirmed_best, contenders

    space = replace(load_space(_space(tmp_path, GOOD)), confirm_top=2)
    rows = [{"trial_id": i, "values": {"mode_scale": v}, "accuracy": a} for i, v, a in
            (("a", 0.1, 60.0), ("b", 0.2, 62.0), ("c", 0.3, 61.0))]
    assert [c["label"] for c in contenders(space, rows)] == ["trial-b", "trial-c", "defaults"]
    low = replace(space, mode="min")
    assert [c["label"] for c in contenders(low, rows)] == ["trial-a", "trial-c", "defaults"]
    assert [c["label"] for c in contenders(replace(space, confirm_defaults=False), rows)] == ["trial-b", "trial-c"]
    done = [{"label": "trial-b", "accuracy": 70.0}, {"label": "trial-c", "accuracy": 70.0},
            {"label": "x", "error": "boom"}, {"label": "defaults", "accuracy": 70.0}]
    assert confirmed_best(space, done)["label"] == "defaults"  # a search result must beat the defaults
    assert confirmed_best(space, done[:2])["label"] == "trial-b"
    assert confirmed_best(space, done[2:3]) is None
    scored = [{"label": "trial-b", "accuracy": 71.0}, {"label": "defaults", "accuracy": 70.0}]
    assert confirmed_best(space, scored)["label"] == "trial-b" and confirmed_best(low, scored)["label"] == "defaults"


def test_confirm_flag_overrides_the_space() -> None:
    from raydistill.cli import build_parser, tune_space_of

    space = "tune_spaces/mgd3.yaml"
    top = {flags: tune_space_of(build_parser().parse_args(["tune", space, *flags])).confirm_top
           for flags in ((), ("--confirm", "0"), ("--confirm", "3"))}
    assert top == {(): 1, ("--confirm", "0"): 0, ("--confirm", "3"): 3}


def test_asha_early_stopped_trials_are_marked(studies) -> None:
    root, _, summary = studies
    runs = _runs(root)
    children = runs[(runs["tags.kind"] == "trial") & (runs["tags.study"] == "seeds")]
    assert len(children) == 6
    stopped = children[children["tags.tune.status"] == "early_stopped"]
    done = children[children["tags.tune.status"] == "completed"]
    assert len(stopped) + len(done) == 6 and len(done) >= 1
    assert (done["metrics.stopped_at_epoch"] == 20).all() and (done["metrics.early_stopped"] == 0).all()
    assert len(stopped) >= 1, f"ASHA stopped no trial: {summary['trials']}"
    assert (stopped["metrics.stopped_at_epoch"] < 20).all() and (stopped["metrics.early_stopped"] == 1).all()
    assert set(stopped["tags.tune.stopped_by"]) == {"scheduler"}
    assert set(stopped["tags.trial_id"]) == set(summary["early_stopped"])
    assert summary["best"]["completed"] and Path(summary["preset"]).is_file()
    table = summary["printed"].strip().splitlines()  # `raydistill tune` printed its trials, best first
    assert table[-1].startswith("best configuration: ") and sum("early_stopped" in ln for ln in table) == len(stopped)


def test_compare_prints_filters_and_plots(studies, tmp_path: Path, capsys) -> None:
    root = str(studies[0])
    capsys.readouterr()
    assert main(["compare", "--root", root, "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["method", "dataset", "IPC"]
    mgd3 = [ln for ln in out if ln.startswith("mgd3 ")]  # two trials (2 classes), two confirmation runs (3)
    assert len(mgd3) == 4 and sum(" confirm " in ln and " 3cls " in ln for ln in mgd3) == 2
    assert sum(ln.startswith("random ") for ln in out) == 6
    # a set's CFG interval is a key parameter; a run without one shows none (not an empty value)
    assert all(("cfg_interval=200,600" in ln) == ln.startswith("mgd3 ") for ln in out[1:-1])
    assert all("digits" in ln for ln in out[1:-1])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is a dependency
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["compare", "--root", root, "--method", "random", "--ipc", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 7 and sum("early_stopped" in ln for ln in out) >= 1
    assert main(["compare", "--root", root, "--method", "igd"]) == 2
    assert "no runs with an accuracy match" in capsys.readouterr().err


@needs_fmnist
def test_igd_space_without_surrogate_fails_before_ray(tmp_path: Path, capsys) -> None:
    space = str(Path(__file__).resolve().parents[1] / "tune_spaces" / "igd.yaml")
    assert main(["tune", space, "--set", f"surrogate={tmp_path / 'nowhere'}", "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "surrogate trajectory not found" in err[0] and "nowhere" in err[0]
    assert not (tmp_path / "r").exists()


def test_study_whose_every_trial_fails_is_one_error(ray_local, tiny_model, tmp_path: Path) -> None:
    """A parameter the space cannot check (a path, read when the trial builds its guidance) fails every trial."""
    from raydistill.orchestration.tune_job import run_study

    dit, vae = tiny_model
    space = load_space(_space(tmp_path, f"""name: bad
config: {{dataset: digits, image_size: 32, model: {dit}, vae: {vae}, method: igd, classes: ["0"], ipc: 1, steps: 2,
          eval_epochs: 1, extra: {{igd_window: [0, 1]}}}}
params: {{surrogate: {{dist: choice, values: [{tmp_path / "nowhere"}]}}}}
budget: {{num_samples: 1}}
"""))
    expected = r"all 1 trials of study bad failed; the first: .*nowhere"  # a path is only read in the trial
    with pytest.raises(UserError, match=expected):
        run_study(space, tmp_path / "runs", log=lambda m: None)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["raydistill"])
    trial = runs[runs["tags.kind"] == "trial"]
    assert list(trial["tags.tune.status"]) == ["error"] and list(trial["status"]) == ["FAILED"]


def test_failed_confirmation_keeps_the_search_best(ray_local, tiny_model, tmp_path: Path) -> None:
    """A contender that fails on the full protocol (a class the dataset lacks, only read when it runs) is recorded as
    failed, in the summary and as a FAILED MLflow run, and best.yaml stays the search's best trial."""
    from raydistill.orchestration.tune_job import format_summary, run_study

    dit, vae = tiny_model
    space = load_space(_space(tmp_path, f"""name: unconfirmed
config: {{dataset: digits, image_size: 32, model: {dit}, vae: {vae}, method: dit, classes: ["0"], ipc: 1, steps: 2,
          eval_epochs: 1}}
params: {{cfg_scale: {{dist: grid, values: [1.0]}}}}
budget: {{num_samples: 1}}
confirm: {{top: 1, defaults: false, config: {{classes: ["nosuch"]}}}}
"""))
    summary = run_study(space, tmp_path / "runs", log=lambda m: None)
    (c,) = summary["confirm"]
    assert "accuracy" not in c and "nosuch" in c["error"] and "confirmed" not in summary
    header = Path(summary["preset"]).read_text().splitlines()[0]
    assert header.startswith("# best of study unconfirmed") and "confirmation failed" in header
    assert yaml.safe_load(Path(summary["preset"]).read_text())["cfg_scale"] == 1.0
    assert "nosuch" in format_summary(summary, "accuracy")
    runs = _runs(tmp_path / "runs")
    assert list(runs[runs["tags.kind"] == "confirm"]["status"]) == ["FAILED"]


@pytest.mark.parametrize("preset, study_best, method, expected", [
    ("fmnist-mgd3+igd-tuned.yaml", "m4/mgd3+igd-best.yaml", "mgd3+igd",
     {"cfg_scale": 3.5816103691334944, "igd_scale": 17.805487040095848, "igd_gamma": 3.3319343551039444,
      "mode_scale": 0.17634952302877413, "t_stop": 11}),
    ("fmnist-igd-tuned.yaml", "m4/igd-best.yaml", "igd",
     {"cfg_scale": 3.835108789890624, "igd_scale": 9.716707176635781, "igd_gamma": 111.36229888148317}),
    ("fmnist-mgd3-tuned.yaml", "m4/mgd3-best.yaml", "mgd3",
     {"cfg_scale": 2.5760629674271778, "mode_scale": 0.2773171194143533, "t_stop": 24}),
    ("fmnist-minimax-igd-tuned.yaml", "m4/minimax-igd-best.yaml", "minimax-igd",
     {"cfg_scale": 3.7818889431943044, "igd_scale": 0.3305527105705819, "igd_gamma": 74.3633960391274}),
    ("fmnist-minimax+mgd3-tuned.yaml", "m4/minimax+mgd3-best.yaml", "minimax+mgd3",
     {"cfg_scale": 2.8461553344437616, "mode_scale": 0.1969604478764867, "t_stop": 14}),
    ("fmnist-minimax-tuned.yaml", "m4/minimax-best.yaml", "minimax", {"cfg_scale": 3.188489682951995}),
])
def test_shipped_tuned_preset_is_the_benchmarked_configuration(preset, study_best, method, expected) -> None:
    """A shipped tuned preset (jobs/configs) reads through `distill --preset` into the settings that
    docs/BENCHMARKS.md section 8 evaluated (the values of its `benchmarks/quality.py --set` command), equal to its
    study's best.yaml on the shipped model (copied to benchmarks/results/m4; the model of 2026-12-06's are in
    benchmarks/results/m3, Appendix B.8), and parses into the method's typed parameters."""
    from raydistill.cli import _config, build_parser
    from raydistill.methods import get_method

    def load(path):
        return _config(build_parser().parse_args(["distill", "--preset", path]))

    def setting(c, key):  # cfg_scale is a DistillConfig field, the guidance weights are method parameters
        return c.cfg_scale if key == "cfg_scale" else c.extra[key]

    cfg, best = load(f"jobs/configs/{preset}"), load(f"benchmarks/results/{study_best}")
    assert set(get_method(method).parse(cfg.extra, cfg)) == set(re.split(r"[+-]", method))  # minimax-igd: both
    assert cfg.method == best.method == method and cfg.dataset == "fashion-mnist" and cfg.ipc == 10
    for key, value in expected.items():
        assert setting(cfg, key) == pytest.approx(value), key
        assert setting(cfg, key) == setting(best, key), key
    assert set(cfg.extra) == set(best.extra)
