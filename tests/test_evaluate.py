"""Evaluation presets, batched augmentation and the training loop (tiny, fast problems only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raydistill.errors import UserError
from raydistill.evaluate import augment as A
from raydistill.evaluate.presets import (
    dc_decay_pass,
    get_preset,
    ipc_epoch,
    multistep_milestones,
    resolve_epochs,
    resolve_eval_every,
)
from raydistill.evaluate.train import evaluate_synthetic
from tests.conftest import load_benchmark

# ----------------------------------------------------------------------------------------------------------------------
# presets


def test_dc_preset_values() -> None:
    p = get_preset("dc")
    assert (p.optimizer, p.lr, p.momentum, p.weight_decay, p.batch_size) == ("sgd", 0.01, 0.9, 5e-4, 256)
    assert p.epochs == 300 and p.schedule == "dc_step" and p.lr_decay == 0.1
    assert dc_decay_pass(300) == 151  # LR x0.1 after 0-based pass E//2+1 (of E+1 passes)
    assert p.augment == "none" and p.report == "last" and p.eval_every == 0
    assert p.mean == (0.2861,) and p.std == (0.3530,)


def test_dsa_preset_values() -> None:
    p = get_preset("dsa")
    assert p.epochs == 1000 and p.augment == "dsa" and p.report == "last"
    assert p.dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    assert (p.lr, p.batch_size, p.schedule) == (0.01, 256, "dc_step")


def test_idc_and_igd_presets() -> None:
    idc, igd = get_preset("idc"), get_preset("igd")
    assert (idc.optimizer, idc.lr, idc.momentum, idc.weight_decay, idc.batch_size) == ("sgd", 0.01, 0.9, 5e-4, 64)
    assert idc.size == 224 and idc.report == "best" and idc.cutmix_p == 1.0 and idc.augment == "idc"
    assert idc.mean == (0.485, 0.456, 0.406) and idc.gamma == 0.2
    assert multistep_milestones(idc, 2000) == [1333, 1666]
    assert (igd.optimizer, igd.lr, igd.betas, igd.weight_decay) == ("adamw", 1e-3, (0.9, 0.999), 0.01)
    assert igd.size == 256 and igd.mean == igd.std == (0.5, 0.5, 0.5) and igd.report == "best"
    assert resolve_eval_every(idc, 2000) == 20 and resolve_eval_every(get_preset("dc"), 300) == 0


def test_ipc_epoch_table() -> None:
    assert [ipc_epoch(i) for i in (1, 2, 10, 11, 50, 51, 200, 201, 500, 501)] == [
        3000, 2000, 2000, 1500, 1500, 1000, 1000, 500, 500, 300,
    ]  # fmt: skip
    # nclass = 100: x2/3, rounded down to a multiple of 100
    assert ipc_epoch(10, nclass=100) == 1300
    assert ipc_epoch(20, nclass=100) == 1000
    assert ipc_epoch(1, nclass=100) == 2000
    assert resolve_epochs(get_preset("idc"), ipc=10, nclass=10) == 2000
    assert resolve_epochs(get_preset("idc"), ipc=10, nclass=10, epochs=3) == 3
    assert resolve_epochs(get_preset("dc"), ipc=10, nclass=10) == 300


def test_preset_override_and_errors() -> None:
    quick = dataclasses.replace(get_preset("dc"), epochs=2)
    assert quick.epochs == 2 and get_preset("dc").epochs == 300
    assert get_preset("dsa", epochs=5).epochs == 5
    with pytest.raises(UserError, match="dc"):
        get_preset("nope")
    with pytest.raises(UserError):
        get_preset("dc", not_a_field=1)
    with pytest.raises(UserError):
        dataclasses.replace(get_preset("dc"), report="median")


# ----------------------------------------------------------------------------------------------------------------------
# augmentation


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(c: int = 3, size: int = 16, b: int = 6) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=_gen(123))


DSA_FNS = [A.dsa_scale, A.dsa_rotate, A.dsa_flip, A.dsa_crop, A.dsa_cutout, A.dsa_color]


@pytest.mark.parametrize("fn", DSA_FNS + [A.random_resized_crop, A.color_jitter, A.lighting, A.idc_augment])
def test_augment_deterministic_and_shape(fn) -> None:
    x = _batch()
    a, b = fn(x, _gen(7)), fn(x, _gen(7))
    assert a.shape == x.shape and torch.equal(a, b)


def test_dsa_augment_one_family_deterministic() -> None:
    x = _batch(c=1, size=28)
    a = A.dsa_augment(x, _gen(3))
    assert a.shape == x.shape and torch.equal(a, A.dsa_augment(x, _gen(3)))
    with pytest.raises(UserError):
        A.dsa_augment(x, _gen(0), "color_warp")


def test_flip_twice_is_identity() -> None:
    x = _batch()
    once = A.dsa_flip(x, _gen(1))
    assert torch.equal(A.dsa_flip(once, _gen(1)), x)
    assert torch.equal(A.dsa_flip(x, _gen(1), p=1.0), x.flip(3))


def test_brightness_shifts_mean() -> None:
    x = _batch(c=1)
    y = A.dsa_brightness(x, _gen(2))
    shift = (y - x).mean(dim=(1, 2, 3))
    assert torch.allclose(shift, (y - x)[:, 0, 0, 0], atol=1e-6)  # one constant shift per image
    assert shift.abs().max() <= 0.5 and shift.abs().max() > 0
    # grey images: saturation is a no-op
    assert torch.allclose(A.dsa_saturation(x, _gen(2)), x, atol=1e-6)


def test_crop_and_cutout_geometry() -> None:
    x = torch.ones(8, 1, 28, 28)
    t = A.dsa_crop(x, _gen(0))
    zero_rows = (t[:, 0].sum(dim=2) == 0).sum(dim=1)
    assert zero_rows.max() <= 4  # translation of at most int(28 * 0.125 + 0.5) = 4 px
    c = A.dsa_cutout(x, _gen(0))
    holes = (c == 0).sum(dim=(1, 2, 3))
    assert holes.max() <= 14 * 14 and holes.min() > 0


def test_cutmix_weights() -> None:
    x = _batch(b=8, size=32)
    y = torch.arange(8)
    mix = A.cutmix(x, y, _gen(5))
    x1, y1, x2, y2 = mix.box
    assert mix.weight_a + mix.weight_b == pytest.approx(1.0)
    assert mix.weight_b == pytest.approx((x2 - x1) * (y2 - y1) / (32 * 32))
    assert torch.allclose(mix.soft_targets(8).sum(dim=1), torch.ones(8))
    assert torch.equal(A.cutmix(x, y, _gen(5)).x, mix.x)
    # outside the box the batch is unchanged; inside it comes from the partner
    assert torch.equal(mix.x[:, :, :x1], x[:, :, :x1])
    perm_src = x[:, :, x1:x2, y1:y2]
    assert torch.equal(mix.x[:, :, x1:x2, y1:y2], perm_src[(mix.y_b)])


def test_lighting_rgb_only() -> None:
    grey = _batch(c=1)
    assert torch.equal(A.lighting(grey, _gen(0)), grey)
    rgb = _batch(c=3)
    d = A.lighting(rgb, _gen(0)) - rgb
    assert torch.allclose(d, d[:, :, :1, :1].expand_as(d), atol=1e-6)  # one colour offset per image


def test_random_resized_crop_full_box_is_identity() -> None:
    x = _batch(size=16)
    out = A.random_resized_crop(x, _gen(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# training loop


def _bright_dark(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    dark = torch.rand(n_per_class, 1, 28, 28, generator=g) * 0.3
    bright = 0.7 + torch.rand(n_per_class, 1, 28, 28, generator=g) * 0.3
    x = torch.cat([dark, bright])
    y = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class)]).long()
    return x, y


def test_convnet3_learns_separable_problem() -> None:
    tx, ty = _bright_dark(5, seed=0)
    vx, vy = _bright_dark(50, seed=1)
    calls: list[tuple[int, int, float]] = []
    lines: list[str] = []
    res = evaluate_synthetic(
        tx, ty, vx, vy, preset="dc", num_nets=1, epochs=4, eval_every=2,
        on_epoch=lambda i, e, a: calls.append((i, e, a)), progress=lines.append,
    )  # fmt: skip
    assert res.reported_mean > 90.0 and res.last_accs == [res.reported_mean]
    assert [c[1] for c in calls] == [2, 4, 5]  # E + 1 = 5 passes, tested every 2 and after the last
    assert res.net == "convnet3" and res.epochs == 4 and len(lines) == 1 and lines[0].startswith("net 1/1 convnet3:")
    d = res.to_dict()
    assert d["preset"] == "dc" and d["best_accs"][0] >= d["last_accs"][0]


def test_progress_reports_passes_while_a_net_trains_and_changes_nothing() -> None:
    tx, ty = _bright_dark(3, seed=0)
    vx, vy = _bright_dark(10, seed=1)
    lines: list[str] = []
    kw = dict(preset="dc", num_nets=2, epochs=3, seed=1)
    res = evaluate_synthetic(tx, ty, vx, vy, progress=lines.append, progress_every_s=0, **kw)
    quiet = evaluate_synthetic(tx, ty, vx, vy, **kw)
    assert res.last_accs == quiet.last_accs  # the hook sees no model state
    passes = [ln.split(": ", 1)[1].split(" (")[0] for ln in lines if ": pass " in ln]
    assert passes == ["pass 1/4", "pass 2/4", "pass 3/4"] * 2  # E + 1 = 4 passes, none after the last
    assert [ln.split(":")[0] for ln in lines] == ["net 1/2 convnet3"] * 4 + ["net 2/2 convnet3"] * 4
    assert lines[3].startswith("net 1/2 convnet3: ") and "%" in lines[3] and "left)" in lines[0]
    slow: list[str] = []
    evaluate_synthetic(tx, ty, vx, vy, progress=slow.append, **kw)  # default: a line a minute at most
    assert len(slow) == 2 and all("pass" not in ln for ln in slow)


def test_seeds_reproduce_exactly() -> None:
    tx, ty = _bright_dark(3, seed=0)
    vx, vy = _bright_dark(10, seed=1)
    tx = tx * 0.5 + 0.25  # harder: overlapping classes so accuracies are not all 100
    kw = dict(preset="dsa", num_nets=2, epochs=1, seed=3)
    a = evaluate_synthetic(tx, ty, vx, vy, **kw)
    b = evaluate_synthetic(tx, ty, vx, vy, **kw)
    assert a.last_accs == b.last_accs and a.best_accs == b.best_accs and a.num_nets == 2


def test_idc_preset_runs_small() -> None:
    g = _gen(0)
    tx, ty = torch.rand(4, 3, 20, 20, generator=g), torch.tensor([0, 0, 1, 1])
    vx, vy = torch.rand(6, 3, 24, 24, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])
    p = get_preset("igd", size=16)
    res = evaluate_synthetic(tx, ty, vx, vy, preset=p, net="convnet3", num_nets=1, epochs=2)
    assert res.report == "best" and res.reported_mean == res.best_mean and res.epochs == 2
    reference = load_benchmark("eval_reference").evaluate_synthetic_dataloader  # the speed benchmark's pipeline
    ref = reference(tx, ty, vx, vy, preset=p, net="convnet3", num_nets=1, epochs=2)
    assert ref.pipeline == "dataloader" and 0.0 <= ref.reported_mean <= 100.0


def test_bad_inputs_raise_user_error() -> None:
    tx, ty = _bright_dark(2, seed=0)
    with pytest.raises(UserError):
        evaluate_synthetic(tx, ty, tx, ty, preset="fast", epochs=1)
    with pytest.raises(UserError):
        evaluate_synthetic(tx, ty, tx, ty, net="vgg", epochs=1)
    with pytest.raises(UserError):
        evaluate_synthetic(tx * 255, ty, tx, ty, epochs=1)
    with pytest.raises(UserError):
        evaluate_synthetic(tx[:, 0], ty, tx, ty, epochs=1)
    with pytest.raises(UserError):
        evaluate_synthetic(tx, ty.float(), tx, ty, epochs=1)
