"""Soft-label evaluation (the RDED protocol), its teacher, and DD-Ranking's scores, on tiny data (digits, 8 px)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from raydistill.cli import main
from raydistill.config import DistillConfig
from raydistill.data import load_dataset
from raydistill.distill import distill_local, evaluate_images
from raydistill.errors import UserError
from raydistill.evaluate import augment as A
from raydistill.evaluate.presets import get_preset
from raydistill.evaluate.scores import exp_score, records_from_results, robustness_scores, score_table
from raydistill.evaluate.soft_label import (
    evaluate_soft,
    half_cosine_factor,
    make_optimizer,
    param_groups,
    prepare_teacher,
    rded_augment,
    rded_batch_size,
    report_epochs,
    resolve_patch_factor,
    shuffle_patches,
    soft_label_loss,
    train_student,
)
from raydistill.evaluate.teacher import file_sha256, load_teacher
from raydistill.models.evalnets import build_eval_net
from tests.conftest import FMNIST_ROOT, needs_fmnist


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, digits) -> Path:
    """A digits teacher trained by the CLI command (6 short epochs: ~65% test accuracy, far above chance)."""
    out = tmp_path_factory.mktemp("teacher") / "digits.safetensors"
    argv = ["teacher", "--dataset", "digits", "--epochs", "6", "--batch-size", "32", "--lr", "0.05", "--out", str(out)]
    assert main(argv) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the protocol's pieces


def test_loss_is_batchmean_kl_at_temperature_without_t_squared() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 4, torch.randn(6, 5, generator=g) * 4
    T = 20.0
    p_t = torch.softmax(t / T, dim=1)
    by_hand = (p_t * (p_t.log() - torch.log_softmax(s / T, dim=1))).sum() / 6
    got = soft_label_loss(s, t, T)
    assert torch.allclose(got, by_hand, atol=1e-7)
    assert torch.allclose(got, nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, 1), F.softmax(t / T, 1)))
    assert float(soft_label_loss(t, t, T)) == pytest.approx(0.0, abs=1e-7)
    assert get_preset("rded").temperature == 20.0


def test_half_cosine_schedule_and_adamw_match_rded() -> None:
    E = 300
    rded = [0.5 * (1.0 + math.cos(math.pi * e / E / 2)) if e <= E else 0 for e in range(E + 2)]  # RDED's lambda
    assert [half_cosine_factor(e, E) for e in range(E + 2)] == rded
    model = build_eval_net("convnet", 1, 10, 28)
    opt, sched = make_optimizer(model, get_preset("rded"), E)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    lrs = []
    for _ in range(E):  # the loop steps the scheduler once after each epoch
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: changes nothing, keeps torch's step-order check quiet
        sched.step()
    assert lrs[0] == 1e-3 and lrs == pytest.approx([1e-3 * f for f in rded[:E]])
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 299 / 600)))  # ends near 0.5x, not 0


def test_weight_decay_groups_match_rded_and_the_ddranking_option() -> None:
    model = build_eval_net("convnet", 1, 10, 28)
    decay, rest = param_groups(model, True, 0.01)
    named = dict(model.named_parameters())
    want = {n for n, p in named.items() if "weight" in n and p.dim() > 1}  # RDED's get_parameters
    assert {n for n, p in named.items() if any(p is q for q in decay["params"])} == want
    assert want == {"features.0.weight", "features.4.weight", "features.8.weight", "classifier.weight"}
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert len(decay["params"]) + len(rest["params"]) == len(named)  # GroupNorm affines and biases: no decay
    (everything,) = param_groups(model, False, 0.01)
    assert len(everything["params"]) == len(named) and everything["weight_decay"] == 0.01
    assert get_preset("rded").decay_matrices_only and not get_preset("dsa").decay_matrices_only


def test_report_rule_is_rdeds_and_ddranking_every_20() -> None:
    for E in (6, 10, 37, 100, 300, 401):
        rded = [e + 1 for e in range(E) if (e % 10 == 9 or e == E - 1) and e > E * 0.8]  # RDED validation/main.py
        assert report_epochs(E, 10, 0.8) == rded
    assert report_epochs(300, 10, 0.8) == list(range(250, 301, 10))
    assert report_epochs(300, 20, 0.8) == [260, 280, 300]  # DD-Ranking's every 20 in the last 20%
    assert report_epochs(3, 10, 0.8) == [3] and report_epochs(5, 0, 0.8) == [5]  # short runs: the last one


def test_batch_by_ipc_and_patch_factor_defaults() -> None:
    assert [rded_batch_size(i, 10) for i in (1, 10, 50)] == [10, 50, 100]
    assert [rded_batch_size(i, c) for i, c in ((1, 100), (10, 1000), (50, 1000))] == [20, 100, 200]
    p = get_preset("rded")
    assert (resolve_patch_factor(p, "imagenette"), resolve_patch_factor(p, "imagenet-1k")) == (2, 2)
    assert (resolve_patch_factor(p, "fashion-mnist"), resolve_patch_factor(p, None)) == (1, 1)
    assert resolve_patch_factor(get_preset("rded", patch_factor=1), "imagenet-1k") == 1


def test_shuffle_patches_permutes_strips_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    quads = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(3, 0).repeat_interleave(3, 1)  # 6x6 quadrants
    x = quads.expand(64, 2, 6, 6).clone()
    out = shuffle_patches(x, g, 2)
    assert out.shape == x.shape
    for img in out:
        corners = img[0, ::3, ::3]
        assert (img[0] == corners.repeat_interleave(3, 0).repeat_interleave(3, 1)).all()  # strips stay whole
        assert sorted(corners.flatten().tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert len({tuple(img[0, ::3, ::3].flatten().tolist()) for img in out}) == 4  # 2 column x 2 row orders
    assert torch.equal(shuffle_patches(x, g, 1), x)
    assert shuffle_patches(torch.rand(2, 1, 7, 9), g, 2).shape == (2, 1, 6, 8)  # remainder dropped, as RDED


class _Recorder(nn.Module):
    """A tiny linear classifier that records every input batch it sees."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def test_teacher_scores_exactly_the_students_augmented_cutmixed_batch() -> None:
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    student, teacher = _Recorder(0), _Recorder(1).requires_grad_(False)
    p = get_preset("rded", patch_factor=2)
    mean, std = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.4)
    gen = torch.Generator().manual_seed(7)
    train_student(student, teacher, x, p, 2, 4, 2, 8, mean, std, gen, lambda m: 50.0, [2])
    assert len(teacher.seen) == len(student.seen) == 2 * 3  # every step of 2 epochs of ceil(10 / 4) batches
    assert all(torch.equal(a, b) for a, b in zip(student.seen, teacher.seen))
    replay = torch.Generator().manual_seed(7)  # the same draws: order, ShufflePatches, crop, flip, CutMix
    expected = []
    for _ in range(2):
        perm = torch.randperm(10, generator=replay)
        for start in range(0, 10, 4):
            idx = perm[start:start + 4]
            xb = rded_augment(x[idx], replay, 2, 8, mean, std)
            expected.append(A.cutmix(xb, torch.zeros(len(idx), dtype=torch.long), replay).x)
    assert all(torch.equal(a, b) for a, b in zip(teacher.seen, expected))
    assert not torch.equal(teacher.seen[0], (x[torch.randperm(10, generator=torch.Generator().manual_seed(7))[:4]]
                                             - mean) / std)  # augmented, not the plain images


# ----------------------------------------------------------------------------------------------------------------------
# teacher loading: one-line errors before any training


def _set(ds, ipc: int = 2):
    x, y = ds.load("train", limit=ipc)
    vx, vy = ds.load("test")
    return x.float() / 255, y, vx.float() / 255, vy


def _fails_before_training(ds, teacher: str | Path, match: str, **preset) -> None:
    lines: list[str] = []
    with pytest.raises(UserError, match=match) as err:
        evaluate_soft(*_set(ds), preset=get_preset("rded", teacher=str(teacher), **preset), num_nets=1, epochs=2,
                      dataset=ds, classes=list(range(10)), progress=lines.append)
    assert "\n" not in str(err.value) and lines == []  # one line, and not even the teacher was scored


def test_missing_corrupt_and_mismatched_teachers_are_one_line_errors(tmp_path, digits, teacher_path) -> None:
    _fails_before_training(digits, tmp_path / "nope.safetensors", "teacher checkpoint not found")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(teacher_path.read_bytes()[:200])
    _fails_before_training(digits, bad, "cannot read teacher checkpoint")
    pt = tmp_path / "bad.pt"
    pt.write_bytes(b"not a pickle")
    _fails_before_training(digits, pt, "cannot read teacher checkpoint")
    rgb = tmp_path / "rgb.pt"
    torch.save(build_eval_net("convnet3", 3, 10, 8).state_dict(), rgb)
    _fails_before_training(digits, rgb, "takes 3-channel images but the set has 1")
    five = tmp_path / "five.pt"
    torch.save(build_eval_net("convnet3", 1, 5, 8).state_dict(), five)
    _fails_before_training(digits, five, "predicts 5 classes but dataset digits has 10")
    _fails_before_training(digits, five, "is not a resnet18", teacher_net="resnet18")
    _fails_before_training(digits, teacher_path, "expects normalisation", mean=(0.5,), std=(0.5,))
    fm = tmp_path / "other.safetensors"  # a raydistill teacher of another dataset with the same shapes
    with safe_open(str(teacher_path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    other = {**meta, "classes": list("abcdefghij"), "dataset": "letters"}
    save_file(load_file(str(teacher_path)), str(fm), metadata={"format": "raydistill-teacher/1",
                                                               "meta": json.dumps(other)})
    _fails_before_training(digits, fm, "trained on letters with other classes")


def test_digits_without_a_teacher_is_one_cli_line(tmp_path, capsys) -> None:
    out = tmp_path / "set"
    distill_local(DistillConfig(dataset="digits", method="random", ipc=2, out=str(out), baselines=()))
    assert main(["evaluate", str(out), "--dataset", "digits", "--eval-preset", "rded"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a teacher for dataset digits" in err[0] and "--teacher" in err[0]


def test_teacher_file_records_identity_and_accuracy(digits, teacher_path) -> None:
    t = load_teacher(teacher_path, 1, 8, mean=[0.2861], std=[0.3530])
    assert t.net == "convnet3" and t.num_classes == 10 and t.meta["dataset"] == "digits"
    assert t.sha256 == file_sha256(teacher_path) and len(t.sha256) == 64
    assert t.meta["train_images"] == 1500 and t.meta["epochs"] == 6 and 40.0 < t.meta["test_accuracy"] <= 100.0
    assert not any(p.requires_grad for p in t.module.parameters()) and not t.module.training
    assert main(["teacher", "--dataset", "digits", "--epochs", "1", "--out", str(teacher_path)]) == 2  # no overwrite
    p = get_preset("rded", teacher=str(teacher_path))
    assert prepare_teacher(p, "convnet", 1, 8, 10, digits, list(range(10)))[1] is None  # all outputs, in order
    assert prepare_teacher(p, "convnet", 1, 8, 2, digits, [3, 5])[1] == [3, 5]  # a class subset: its columns
    with pytest.raises(UserError, match="unknown evaluation net"):
        prepare_teacher(p, "vgg", 1, 8, 10, digits, list(range(10)))


# ----------------------------------------------------------------------------------------------------------------------
# a real (short) run


def test_short_rded_run_beats_chance_and_reports_the_teacher(digits, teacher_path) -> None:
    x, y = digits.load("train", limit=10)
    lines: list[str] = []
    r = evaluate_images(x, y, digits, "rded", "convnet", 1, epochs=40, device="cpu", progress=lines.append,
                        teacher=str(teacher_path))
    assert r.labels == "soft" and r.batch_size == 50 and r.patch_factor == 1 and r.epochs == 40
    assert r.reported_mean == r.best_mean > 20.0  # chance is 10%
    assert r.teacher == str(teacher_path) and r.teacher_sha256 == file_sha256(teacher_path)
    assert r.teacher_test_acc == pytest.approx(r.teacher_recorded_test_acc, abs=0.5)  # same 297 test images
    assert lines[0].startswith("teacher convnet3") and lines[-1].startswith("net 1/1 convnet3:")
    d = r.to_dict()
    assert d["teacher_sha256"] == r.teacher_sha256 and d["preset"] == "rded"


# ----------------------------------------------------------------------------------------------------------------------
# DD-Ranking's scores


def test_scores_on_known_numbers_use_fractions() -> None:
    s = robustness_scores(real_hard=90, syn_hard=70, syn_soft=80, random_soft=60)
    assert (s.hlr, s.ior) == (20, 20) and s.ars is None
    assert s.lrs == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))  # a = 0 -> 0.2689
    s = robustness_scores(real_hard=90, syn_hard=80, syn_soft=90, random_soft=60)  # a = 0.5 * 0.3 - 0.5 * 0.1 = 0.1
    assert s.lrs == pytest.approx((math.exp(0.1) - math.exp(-1)) / (math.e - math.exp(-1))) == pytest.approx(0.31369,
                                                                                                              abs=1e-5)
    s = robustness_scores(syn_aug=85, random_aug=80, syn_noaug=82, random_noaug=72)
    assert s.ars == pytest.approx(exp_score(0.075)) and s.lrs is None
    assert exp_score(-1) == 0.0 and exp_score(1) == pytest.approx(1.0)  # the whole range is [0, 1]
    assert robustness_scores(100, 0, 100, 0).lrs == pytest.approx(exp_score(0.0))
    with pytest.raises(UserError, match="percentage"):
        robustness_scores(real_hard=0.93, syn_hard=170)
    with pytest.raises(UserError, match="lambda"):
        robustness_scores(lam=2)


def test_score_table_and_cli_from_quality_results(tmp_path, capsys) -> None:
    runs = {}
    for method, preset, accs in (("dit", "dc", [70, 72]), ("dit", "rded", [80, 82]), ("random", "rded", [75, 75]),
                                 ("random", "dc", [71, 71]), ("dit", "dsa", [74, 74]), ("random", "dsa", [73, 73])):
        for i, a in enumerate(accs):
            report = "best" if preset == "rded" else "last"
            runs[f"{method}|ipc10|{preset}|convnet|epochsNone|set0|net{i}"] = {"last": a - 5 * (report == "best"),
                                                                                 "best": a, "report": report}
    runs["dit|ipc10|rded|convnet|epochs5|set0|net0"] = {"last": 10, "best": 10, "report": "best"}  # shortened: apart
    path = tmp_path / "quality-x.json"
    path.write_text(json.dumps({"runs": runs}))
    rows = {r["method"]: r for r in score_table(records_from_results([str(path)]), 90.0)}
    dit = rows["dit"]
    assert (dit["hard"], dit["soft"], dit["n_soft"]) == (71, 81, 2)
    assert (dit["scores"].hlr, dit["scores"].ior) == (19, 6) and dit["missing"] == []
    assert dit["scores"].lrs == pytest.approx(exp_score(0.5 * 0.06 - 0.5 * 0.19))
    assert dit["scores"].ars == pytest.approx(exp_score(0.5 * 0.01 + 0.5 * 0.0))
    assert rows["random"]["scores"].ior == 0
    assert main(["score", str(path), "--real-hard", "90"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if " dit " in ln)
    assert line.split()[3:8] == ["71.00", "81.00", "+19.00", "+6.00", f"{exp_score(-0.065):.3f}"]
    assert "percentage points" in out and "[0, 1]" in out
    assert main(["score", str(path), "--ipc", "50"]) == 2

    # a reader that left (`raydistill score ... | head`): a real pipe whose read end is closed, no traceback
    import os
    import sys

    r, w = os.pipe()
    os.close(r)
    real = sys.stdout
    sys.stdout = os.fdopen(w, "w", buffering=1)
    try:
        assert main(["score", str(path), "--real-hard", "90"]) == 0
    finally:
        broken, sys.stdout = sys.stdout, real
    broken.close() if broken is not real and not broken.closed else None


def test_score_from_tracked_mlflow_runs(tmp_path) -> None:
    from raydistill.orchestration.score_runs import records_from_mlflow
    from raydistill.orchestration.tracking import SetRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for i, (method, preset, acc) in enumerate((("dit", "dc", 70.0), ("dit", "rded", 80.0), ("random", "rded", 77.0),
                                               ("dit", "rded", 81.0))):  # the later dit/rded run wins
        params = {"method": method, "dataset": "fashion-mnist", "ipc": "10", "num_evals": "3", "eval_epochs": "",
                  "classes": ""}
        run = SetRun(uri, tmp_path / f"{method}-{preset}-{i}", f"{method}-{preset}", params, {"method": method},
                     start_s=time.time())
        run.finish({f"acc_{preset}_convnet_mean": acc, f"acc_{preset}_convnet_std": 0.1}, [], {})
        time.sleep(0.02)  # distinct start times: the latest run wins
    rec = records_from_mlflow(uri)
    assert rec[("fashion-mnist", 10, "dit", "rded", "convnet")] == [81.0] * 3
    (dit,) = [r for r in score_table(rec, 93.0) if r["method"] == "dit"]
    assert (dit["scores"].hlr, dit["scores"].ior) == (23.0, 4.0)


def test_imagenet_subset_with_a_torchvision_1k_teacher(tmp_path) -> None:
    """ImageNet defaults on a tiny real ImageNet-layout folder: factor 2, RDED's test view, a 1000-class torchvision
    ResNet-18 teacher (a plain ``.pth`` state dict) mapped to the subset through its ImageNet-1K indices."""
    from PIL import Image
    from torchvision.models import resnet18

    from raydistill.data.imagenet import ImageNetSubset
    from raydistill.data.subsets import subset_classes
    from raydistill.evaluate.soft_label import teacher_columns

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 2), ("val", 1)):
        for wnid in subset_classes("imagenette"):
            (tmp_path / split / wnid).mkdir(parents=True)
            for k in range(n):
                arr = (torch.rand(60, 60, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(tmp_path / split / wnid / f"{k}.png")
    ds = ImageNetSubset(tmp_path, "imagenette", image_size=56, allow_other_split=True)  # a toy tree
    pth = tmp_path / "resnet18-1k.pth"
    torch.save(resnet18(weights=None, num_classes=1000).state_dict(), pth)
    assert teacher_columns(1000, 10, ds, list(range(10))) == ds.dit_labels
    x, y = ds.load("train")
    p = get_preset("rded", teacher=str(pth), teacher_net="torchvision-resnet18")
    r = evaluate_images(x, y, ds, p, "convnet", 1, epochs=2, device="cpu")
    assert (r.patch_factor, r.batch_size, r.net, r.teacher_net) == (2, 50, "convnet4", "torchvision-resnet18")
    assert r.teacher_sha256 == file_sha256(pth) and r.teacher_recorded_test_acc is None
    assert 0.0 <= r.teacher_test_acc <= 100.0 and 0.0 <= r.reported_mean <= 100.0


def test_teacher_training_resumes_per_epoch_to_the_same_weights(tmp_path, digits) -> None:
    """A teacher run stopped after epoch 1 of 3 and rerun continues at epoch 2 (not 1) and ends with the weights of an
    uninterrupted run, bit for bit; a state from other settings is one clear error; the state is gone at the end."""
    from raydistill.evaluate.teacher import teacher_state_path, train_teacher

    kw = {"epochs": 3, "batch_size": 64, "lr": 0.05, "device": "cpu"}
    whole = tmp_path / "whole.safetensors"
    train_teacher(digits, whole, **kw)

    out = tmp_path / "cut.safetensors"

    def stop_after_first(line: str) -> None:
        if line.startswith("teacher epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(digits, out, progress=stop_after_first, **kw)
    assert teacher_state_path(out).exists() and not out.exists()
    with pytest.raises(UserError, match=r"other settings \(lr 0\.05 -> 0\.1\)"):
        train_teacher(digits, out, **{**kw, "lr": 0.1})
    lines: list[str] = []
    train_teacher(digits, out, progress=lines.append, **kw)
    assert lines[0].startswith("teacher: resumed after epoch 1/3")
    assert [ln.split(":")[0] for ln in lines if ln.startswith("teacher epoch")] == ["teacher epoch 2/3",
                                                                                      "teacher epoch 3/3"]
    a, b = load_file(str(whole)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not teacher_state_path(out).exists()


@needs_fmnist
def test_the_shipped_fashion_mnist_teacher_loads_and_scores_what_it_records() -> None:
    """The built-in teacher (``raydistill teacher``, shipped in raydistill/assets/fmnist): its metadata names the
    recipe, and on the first 2,000 test images it scores within 1.5 points of the test accuracy it records."""
    from raydistill.evaluate.teacher import BUILTIN_TEACHER

    fm = load_dataset("fashion-mnist", str(FMNIST_ROOT))
    t = load_teacher(BUILTIN_TEACHER, 1, 28, mean=[0.2861], std=[0.3530])
    assert t.net == "convnet3" and t.num_classes == 10 and t.meta["dataset"] == "fashion-mnist"
    assert t.meta["train_images"] == 60000 and t.meta["test_accuracy"] > 88.0
    x, y = fm.load("test")
    x, y = x[:2000].float() / 255.0, y[:2000]
    with torch.inference_mode():
        acc = 100.0 * float((t.module((x - 0.2861) / 0.3530).argmax(1) == y).float().mean())
    assert abs(acc - t.meta["test_accuracy"]) < 1.5
