"""Train fresh evaluation nets on a synthetic set and test them: the score of a distilled dataset.

:func:`evaluate_synthetic` is the fast path: the whole (preprocessed) synthetic set lives on the device as one tensor,
every epoch draws a permutation from a seeded ``torch.Generator`` and slices mini-batches, augmentation is batched
(:mod:`raydistill.evaluate.augment`), and the test set is preprocessed once and scored in large batches under
``torch.inference_mode``. :func:`run_nets` is the one per-net loop (one net through its schedule: :mod:`.fit`); the
plain ``DataLoader`` reference pipeline of the speed benchmark (``benchmarks/eval_reference.py``) uses it too.

Protocols (see :mod:`raydistill.evaluate.presets`):

- ``dc_step`` schedule (DC ``evaluate_synset``, benchmarks.md section 1): E+1 passes over the data; after 0-based pass
  E//2+1 the LR is multiplied by 0.1 and the optimizer re-created (momentum reset). Test accuracy after the last pass
  is reported.
- ``multistep`` schedule (IDC ``train.py``, methods.md section 0.4): epochs 1..E, ``MultiStepLR`` stepped after each
  epoch with milestones 2E//3 and 5E//6, test every max(1, E//100) epochs (and after the last), best is reported.

Net i (0-based) uses seed ``seed + i`` both for its initialisation and for its data order and augmentation draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.errors import UserError
from raydistill.evaluate.augment import dsa_augment, idc_augment
from raydistill.evaluate.fit import Batches, EpochFn, ProgressFn, TestFn, fit, pass_reporter, test_accuracy
from raydistill.evaluate.presets import EvalPreset, get_preset, resolve_epochs, resolve_eval_every
from raydistill.models.evalnets import build_eval_net, convnet_depth_for_size
from raydistill.precision import check_precision, maybe_compile

__all__ = ["EvalResult", "evaluate_synthetic", "run_nets", "setup"]

_TEST_PIXEL_BUDGET = {"cpu": 1 << 18, "other": 1 << 23}  # pixels per test batch (bounded activation memory)


@dataclass
class EvalResult:
    """Accuracies (percent) of ``num_nets`` freshly trained nets.

    ``reported_mean``/``reported_std`` follow the preset's report rule ("last" for dc/dsa, "best" for idc/igd);
    std is the population std (``numpy.std`` default), as the DC code prints.
    """

    preset: str
    net: str
    report: str
    epochs: int
    num_nets: int
    seed: int
    last_accs: list[float]
    best_accs: list[float]
    last_mean: float
    last_std: float
    best_mean: float
    best_std: float
    reported_mean: float
    reported_std: float
    seconds: float
    net_seconds: list[float] = field(default_factory=list)
    pipeline: str = "tensor"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# input handling


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{name} is not array-like ({type(value).__name__})", "pass a torch tensor") from exc


def _check_inputs(
    train_x: Any, train_y: Any, test_x: Any, test_y: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tx, ty, vx, vy = (
        _as_tensor(train_x, "train_x"),
        _as_tensor(train_y, "train_y"),
        _as_tensor(test_x, "test_x"),
        _as_tensor(test_y, "test_y"),
    )
    for name, x, y in (("train", tx, ty), ("test", vx, vy)):
        if x.dim() != 4:
            raise UserError(f"{name}_x must have shape [N, C, H, W], got {tuple(x.shape)}", "stack images into 4-D")
        if not x.is_floating_point():
            raise UserError(f"{name}_x must be float images in [0, 1], got dtype {x.dtype}", "convert with x / 255.0")
        if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise UserError(f"{name}_y must be 1-D integer labels, got {y.dtype} {tuple(y.shape)}", "pass int64 labels")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise UserError(
                f"{name}_x has {x.shape[0]} images but {name}_y has {y.shape[0]} labels", "pass one label per image"
            )
        if int(y.min()) < 0:
            raise UserError(f"{name}_y has negative labels", "use class indices 0..K-1")
        if float(x.max()) > 1.5 or float(x.min()) < -0.5:
            raise UserError(f"{name}_x values are outside [0, 1]", "pass unnormalised images scaled to [0, 1]")
    if tx.shape[1] != vx.shape[1]:
        raise UserError(f"train has {tx.shape[1]} channels but test has {vx.shape[1]}", "use matching images")
    return tx, ty.long(), vx, vy.long()


def _resize(x: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """torchvision ``Resize(size) + CenterCrop(size)`` as bilinear (antialiased) interpolation, done in chunks."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    out = []
    for i in range(0, x.shape[0], chunk):
        r = F.interpolate(x[i : i + chunk], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        out.append(r[:, :, top : top + size, left : left + size])
    return torch.cat(out)


def _norm_stats(preset: EvalPreset, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = preset.mean, preset.std
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise UserError(
            f"preset {preset.name!r} normalises {len(mean)} channels but the images have {channels}",
            "use a preset for this kind of image or override mean/std",
        )
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
    return m, s


def _resolve_net_label(net: str, im_size: int) -> str:
    key = str(net).strip().lower().replace("-", "_")
    if key == "convnet":
        return f"convnet{convnet_depth_for_size(im_size)}"
    return key


def _default_test_batch(device: torch.device, h: int, w: int) -> int:
    budget = _TEST_PIXEL_BUDGET["cpu" if device.type == "cpu" else "other"]
    return max(16, min(4096, budget // max(1, h * w)))


# ----------------------------------------------------------------------------------------------------------------------
# the shared training loop


def _summarise(
    preset: EvalPreset,
    net_label: str,
    epochs: int,
    seed: int,
    last: list[float],
    best: list[float],
    seconds: float,
    net_seconds: list[float],
    pipeline: str,
) -> EvalResult:
    def mean_std(v: list[float]) -> tuple[float, float]:
        m = sum(v) / len(v)
        return m, math.sqrt(sum((a - m) ** 2 for a in v) / len(v))

    lm, ls = mean_std(last)
    bm, bs = mean_std(best)
    rm, rs = (lm, ls) if preset.report == "last" else (bm, bs)
    return EvalResult(
        preset=preset.name,
        net=net_label,
        report=preset.report,
        epochs=epochs,
        num_nets=len(last),
        seed=seed,
        last_accs=last,
        best_accs=best,
        last_mean=lm,
        last_std=ls,
        best_mean=bm,
        best_std=bs,
        reported_mean=rm,
        reported_std=rs,
        seconds=seconds,
        net_seconds=net_seconds,
        pipeline=pipeline,
    )


def setup(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    preset: str | EvalPreset,
    net: str,
    num_nets: int,
    device: str | torch.device,
    epochs: int | None,
    eval_every: int | None,
    precision: str = "fp32",
    compile: bool = False,
) -> dict[str, Any]:
    p = get_preset(preset)
    check_precision(precision, "eval_precision")
    tx, ty, vx, vy = _check_inputs(train_x, train_y, test_x, test_y)
    if not isinstance(num_nets, int) or num_nets < 1:
        raise UserError(f"num_nets must be a positive integer, got {num_nets!r}", "pass num_nets >= 1")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r}", "use 'cpu', 'cuda' or 'cuda:N'") from exc
    if p.size is not None:
        size = p.size
    else:
        if tuple(tx.shape[-2:]) != tuple(vx.shape[-2:]):
            raise UserError(
                f"train images are {tuple(tx.shape[-2:])} but test images are {tuple(vx.shape[-2:])}",
                "resize them to one size or use a preset with a fixed size",
            )
        if tx.shape[-2] != tx.shape[-1]:
            raise UserError(f"images must be square, got {tuple(tx.shape[-2:])}", "crop or resize to a square")
        size = int(tx.shape[-1])
    num_classes = int(max(int(ty.max()), int(vy.max()))) + 1
    ipc = max(1, round(ty.shape[0] / max(1, int(torch.unique(ty).numel()))))
    n_epochs = resolve_epochs(p, ipc, num_classes, epochs)
    n_eval = resolve_eval_every(p, n_epochs, eval_every)
    net_label = _resolve_net_label(net, size)
    # fail early on a bad net name, before any data is moved
    build_eval_net(net, int(tx.shape[1]), num_classes, size)
    return {
        "preset": p,
        "tx": tx,
        "ty": ty,
        "vx": vx,
        "vy": vy,
        "device": dev,
        "size": size,
        "num_classes": num_classes,
        "epochs": n_epochs,
        "eval_every": n_eval,
        "net_label": net_label,
        "precision": precision,
        "compile": compile,
    }


def _new_net(net: str, channels: int, num_classes: int, size: int, seed: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # init on CPU from seed, caller's global RNG untouched
        torch.manual_seed(seed)
        model = build_eval_net(net, channels, num_classes, size)
    return model.to(device)


def _cudnn_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------------
# fast path


def evaluate_synthetic(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    preset: str | EvalPreset = "dc",
    net: str = "convnet",
    num_nets: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epochs: int | None = None,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    eval_every: int | None = None,
    test_batch_size: int | None = None,
    progress_every_s: float = 60.0,
    precision: str = "fp32",
    compile: bool = False,
) -> EvalResult:
    """Score a synthetic set: train ``num_nets`` fresh nets on it under ``preset`` and test on the real test set.

    Args:
        train_x: synthetic images, float in [0, 1], [N, C, H, W].
        train_y: int64 labels [N].
        test_x: real test images, float in [0, 1], [M, C, H', W'].
        test_y: int64 labels [M].
        preset: "dc", "dsa", "idc", "igd" or an :class:`EvalPreset` (e.g. ``dataclasses.replace``'d).
        net: evaluation net name for :func:`raydistill.models.evalnets.build_eval_net` ("convnet" picks the depth
            from the image size: ConvNet-3 for Fashion-MNIST, ConvNet-6 at 224/256 px).
        num_nets: number of nets; net i uses seed ``seed + i`` for init, data order and augmentation.
        seed: base seed.
        device: torch device for training and testing.
        epochs: override E (quick runs); default = the preset's E, or IDC's ``ipc_epoch`` for idc/igd.
        progress: called with one line per finished net, e.g. "net 2/5 convnet3: 73.4% (142 s)", and while a net
            trains with its pass count and time left, e.g. "net 2/5 convnet3: pass 400/1001 (310 s, ~465 s left)".
        on_epoch: ``on_epoch(net_index, epoch, test_acc)`` whenever test accuracy is computed (every
            ``eval_every`` epochs and after the last); an exception raised there aborts the evaluation (early stop).
        eval_every: test interval in epochs; default = the preset's (dc/dsa: only at the end; idc/igd: E // 100).
        test_batch_size: test mini-batch; default from a pixel budget (large batches).
        progress_every_s: least seconds between two in-net progress lines (0: one per pass).
        precision: numerics of training and testing (:mod:`raydistill.precision`): fp32 (the published protocols),
            tf32, bf16 (autocast around the forwards) or auto.
        compile: train and test ``torch.compile``'d nets (same accuracy to float tolerance; warm-up per net).

    Images are resized once to the preset's size when it sets one (bilinear, antialiased Resize + CenterCrop) and
    normalised with the preset's mean/std (dc/dsa before augmentation, idc/igd after it).

    Raises:
        UserError: bad shapes/dtypes/values, unknown preset or net, bad device.
    """
    t0 = time.perf_counter()
    cfg = setup(train_x, train_y, test_x, test_y, preset, net, num_nets, device, epochs, eval_every, precision,
                compile)
    p: EvalPreset = cfg["preset"]
    dev: torch.device = cfg["device"]
    size: int = cfg["size"]
    channels = int(cfg["tx"].shape[1])
    mean, std = _norm_stats(p, channels, dev)

    x = _resize(cfg["tx"].to(dev, torch.float32), size)
    if p.augment != "idc":
        x = (x - mean) / std
    y = cfg["ty"].to(dev)
    vx = torch.cat([(_resize(c.to(dev, torch.float32), size) - mean) / std for c in cfg["vx"].split(1024)])
    vy = cfg["vy"].to(dev)
    tbs = test_batch_size or _default_test_batch(dev, size, size)
    n, bs = x.shape[0], p.batch_size

    def data(s: int, gen: torch.Generator) -> tuple[Batches, TestFn]:
        def batches(gen: torch.Generator = gen) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            perm = torch.randperm(n, generator=gen, device=gen.device).to(dev)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                xb, yb = x[idx], y[idx]
                if p.augment == "dsa":
                    xb = dsa_augment(xb, gen, p.dsa_strategy)
                elif p.augment == "idc":
                    xb = (idc_augment(xb, gen, p.rrc_scale, p.jitter, p.lighting_std) - mean) / std
                yield xb, yb

        def test_fn(m: nn.Module) -> float:
            return test_accuracy(m, ((vx[j : j + tbs], vy[j : j + tbs]) for j in range(0, vx.shape[0], tbs)),
                                 vx.shape[0])

        return batches, test_fn

    return run_nets(cfg, net, num_nets, seed, data, progress, progress_every_s, on_epoch, "tensor", t0)


def run_nets(cfg: dict[str, Any], net: str, num_nets: int, seed: int,
             data: Callable[[int, torch.Generator], tuple[Batches, TestFn]], progress: ProgressFn | None,
             progress_every_s: float, on_epoch: EpochFn | None, pipeline: str, t0: float) -> EvalResult:
    """The per-net loop of every pipeline: net i gets seed ``seed + i`` for its initialisation and its generator,
    ``data(seed_i, generator)`` returns its batches and test function, :func:`.fit.fit` runs the schedule."""
    p: EvalPreset = cfg["preset"]
    dev: torch.device = cfg["device"]
    channels = int(cfg["tx"].shape[1])
    last, best, net_seconds = [], [], []
    with _cudnn_context(dev):
        for i in range(num_nets):
            t_net = time.perf_counter()
            s = seed + i
            model = maybe_compile(_new_net(net, channels, cfg["num_classes"], cfg["size"], s, dev), cfg["compile"])
            gen = torch.Generator(device=dev).manual_seed(s)
            batches, test_fn = data(s, gen)
            on_pass = pass_reporter(progress, progress_every_s, i, num_nets, cfg["net_label"])
            la, be = fit(model, p, cfg["epochs"], cfg["eval_every"], batches, test_fn, gen, on_epoch, i, on_pass,
                         cfg["precision"])
            last.append(la)
            best.append(be)
            net_seconds.append(time.perf_counter() - t_net)
            if progress is not None:
                shown = la if p.report == "last" else be
                progress(f"net {i + 1}/{num_nets} {cfg['net_label']}: {shown:.1f}% ({net_seconds[-1]:.0f} s)")
    return _summarise(
        p, cfg["net_label"], cfg["epochs"], seed, last, best, time.perf_counter() - t0, net_seconds, pipeline
    )


