"""The soft-label teacher through the jobs (issue 21): ``--eval-preset rded --teacher PATH`` on the main job, on a
real local Ray and a real sqlite MLflow store, with tiny digits sets (8 px, 2 images per class, 2 epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raydistill.cli import main
from raydistill.config import DistillConfig
from raydistill.data import load_dataset
from raydistill.errors import UserError
from raydistill.evaluate.presets import get_preset
from raydistill.evaluate.teacher import file_sha256, train_teacher
from raydistill.models.evalnets import build_eval_net

ARGS = ["--dataset", "digits", "--method", "random", "--baselines", "", "--ipc", "2", "--eval-epochs", "2",
        "--seed", "0"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "digits.safetensors"
    train_teacher(digits, out, epochs=4, batch_size=32, lr=0.05, device="cpu")
    return out


@pytest.fixture(scope="module")
def ray_local():
    from raydistill.orchestration.runtime import ray_session

    with ray_session(num_cpus=2, num_gpus=0):
        yield


def _runs(root: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["raydistill"], order_by=["attributes.start_time ASC"])


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_teacher_is_a_config_field_outside_the_generation_key(teacher) -> None:
    a = DistillConfig(dataset="digits", method="random", eval_preset="rded", teacher=str(teacher))
    b = DistillConfig(dataset="digits", method="random")
    assert a.fingerprint() == b.fingerprint()  # the same images: only the evaluation differs
    assert a.flat_params()["teacher"] == str(teacher)
    with pytest.raises(UserError, match="teacher must be a checkpoint path"):
        DistillConfig(teacher="")


def test_distill_job_with_rded_and_a_teacher_records_soft_labels(ray_local, tmp_path, teacher, capsys) -> None:
    root = tmp_path / "runs"
    conf = tmp_path / "conf.yaml"
    conf.write_text("coverage: false\n")  # digits has no VAE to measure mode coverage with
    args = [*ARGS, "--config", str(conf)]
    assert main(["distill", *args, "--root", str(root), "--eval-preset", "rded", "--teacher", str(teacher)]) == 0
    out = root / "digits" / "random-ipc2-seed0"
    sha = file_sha256(teacher)
    key = f"rded/convnet/seed0/2ep/teacher-{sha[:12]}"
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["evals"]) == [key]
    e = m["evals"][key]
    assert e["labels"] == "soft" and e["teacher_sha256"] == sha and e["teacher"] == str(teacher)
    assert e["batch_size"] == 50 and e["temperature"] == 20.0  # RDED's batch at IPC 2 (<= 10)
    (run,) = [r for _, r in _runs(root).iterrows()]
    assert run["params.label_mode"] == "soft" and run["params.teacher"] == str(teacher)
    assert run["params.teacher_sha256"] == sha and run["params.teacher_net"] == "convnet3"
    assert run["params.eval_preset"] == "rded"
    assert run["metrics.teacher_test_acc"] == pytest.approx(e["teacher_test_acc"])
    assert run["metrics.teacher_test_acc"] > 30.0  # a trained teacher on all 10 digits: far above chance
    assert run["metrics.acc_rded_convnet_mean"] == pytest.approx(e["reported_mean"])

    # the same set under the hard-label dc protocol: added next to the soft entry, not replacing it
    assert main(["distill", *args, "--root", str(root), "--eval-preset", "dc"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert sorted(m2["evals"]) == ["dc/convnet/seed0/2ep", key]
    assert m2["evals"][key] == e and "teacher_sha256" not in m2["evals"]["dc/convnet/seed0/2ep"]
    hard = _runs(root).iloc[-1]
    assert hard["params.label_mode"] == "hard" and hard["params.eval_preset"] == "dc"
    assert not isinstance(hard.get("params.teacher_sha256"), str)  # no teacher params on a hard-label run

    # a retrained teacher at another path is another evaluation; the first teacher's entry stays as it was
    other = tmp_path / "other.safetensors"
    train_teacher(load_dataset("digits"), other, epochs=1, batch_size=64, lr=0.05, seed=1, device="cpu")
    assert main(["distill", *args, "--root", str(root), "--eval-preset", "rded", "--teacher", str(other)]) == 0
    m3 = json.loads((out / "metrics.json").read_text())
    assert len(m3["evals"]) == 3 and m3["evals"][key] == e
    assert m3["evals"][f"rded/convnet/seed0/2ep/teacher-{file_sha256(other)[:12]}"]["teacher"] == str(other)
    capsys.readouterr()
    n_runs = len(_runs(root))
    assert main(["distill", *args, "--root", str(root), "--eval-preset", "rded", "--teacher", str(teacher)]) == 0
    assert len(_runs(root)) == n_runs  # asked again: the stored soft evaluation is reused, nothing is written
    assert json.loads((out / "metrics.json").read_text()) == m3


def test_bad_teachers_fail_in_preflight_with_one_line_and_write_nothing(tmp_path, teacher, capsys) -> None:
    root = tmp_path / "runs"
    rded = ["distill", *ARGS, "--root", str(root), "--eval-preset", "rded"]
    _one_line_error(capsys, [*rded, "--teacher", str(tmp_path / "nope.safetensors")], "teacher checkpoint not found")
    five = tmp_path / "five.pt"
    torch.save(build_eval_net("convnet3", 1, 5, 8).state_dict(), five)
    _one_line_error(capsys, [*rded, "--teacher", str(five)], "predicts 5 classes but dataset digits has 10")
    rgb = tmp_path / "rgb.pt"
    torch.save(build_eval_net("convnet3", 3, 10, 8).state_dict(), rgb)
    _one_line_error(capsys, [*rded, "--teacher", str(rgb)], "takes 3-channel images but the set has 1")
    _one_line_error(capsys, [*rded, "--teacher", str(teacher), "--image-size", "16"],
                    "trained on 1-channel 8 px images but the student gets 1-channel 16 px")
    _one_line_error(capsys, rded, "needs a teacher for dataset digits")
    _one_line_error(capsys, ["distill", *ARGS, "--root", str(root), "--teacher", str(teacher)],
                    "--teacher is read only by soft-label presets")
    assert not root.exists()  # no set folder, no MLflow database: nothing was sampled or tracked
    set_dir = tmp_path / "set"  # `raydistill evaluate` runs the same check before loading anything
    _one_line_error(capsys, ["evaluate", str(set_dir), "--dataset", "digits", "--eval-preset", "rded", "--teacher",
                             str(five)], "predicts 5 classes")


def test_missing_builtin_teacher_names_the_command_that_trains_it(tmp_path, monkeypatch) -> None:
    import raydistill.evaluate.soft_label as soft

    monkeypatch.setattr(soft, "BUILTIN_TEACHER", tmp_path / "teacher.safetensors")  # as in a fresh checkout
    with pytest.raises(UserError) as err:
        soft.teacher_path(get_preset("rded"), "fashion-mnist")
    assert "built-in Fashion-MNIST teacher" in err.value.problem and "`raydistill teacher`" in err.value.fix
    assert "\n" not in str(err.value)
    assert soft.teacher_path(get_preset("rded", teacher="x.pt"), "fashion-mnist") == Path("x.pt")


def test_evaluate_command_passes_the_teacher(tmp_path, teacher, capsys) -> None:
    from raydistill.distill import distill_local

    out = tmp_path / "set"
    distill_local(DistillConfig(dataset="digits", method="random", ipc=2, out=str(out), baselines=()))
    argv = ["evaluate", str(out), "--dataset", "digits", "--eval-preset", "rded", "--eval-epochs", "2"]
    assert main([*argv, "--teacher", str(teacher)]) == 0
    text = capsys.readouterr().out
    assert f"teacher convnet3 ({teacher})" in text and "preset rded" in text
