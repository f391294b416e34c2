"""Soft-label evaluation as RDED's ``validation/`` code runs it (benchmarks.md section 4, methods.md section 0.5).

Per mini-batch of the synthetic set (data, augmentation and the teacher all on the device, batched):

1. augment (``augment="rded"``): :func:`shuffle_patches` (factor) -> RandomResizedCrop(size, scale (1/factor, 1),
   ratio (3/4, 4/3)) -> horizontal flip -> normalise; then CutMix (Beta(1, 1), a random partner, one box) on every
   batch (``cutmix_p = 1``);
2. the teacher (frozen, eval mode) scores exactly that batch: soft labels on the fly, nothing stored;
3. loss = ``KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T))`` with T = 20 (:func:`soft_label_loss`): no T^2
   factor and no cross-entropy term, as RDED.

AdamW (lr 1e-3, betas (0.9, 0.999), wd 0.01 only on weights with >= 2 dims, :func:`param_groups`; the DD-Ranking
option ``decay_matrices_only=False`` decays all), LR x :func:`half_cosine_factor` per epoch (LambdaLR stepped after
each epoch, so the last epoch runs at ~0.5x), E = 300, batch by IPC (:func:`rded_batch_size`). Top-1 on the real test
set at the epochs of :func:`report_epochs` (every 10 epochs in the last 20%, and the last); the best is reported.
On ImageNet sets the test view is RDED's Resize(S // 7 * 8) + CenterCrop(S); elsewhere the native images.

Net i uses seed ``seed + i`` for its initialisation, data order, augmentation and CutMix draws.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.data.subsets import SUBSET_NAMES
from raydistill.errors import UserError
from raydistill.evaluate.augment import cutmix, random_flip, random_resized_crop
from raydistill.evaluate.fit import pass_reporter, test_accuracy
from raydistill.evaluate.presets import EvalPreset, get_preset, resolve_epochs
from raydistill.evaluate.teacher import BUILTIN_TEACHER, Teacher, build_teacher_net, channel_stats, load_teacher
from raydistill.evaluate.train import (
    EvalResult,
    _check_inputs,
    _cudnn_context,
    _default_test_batch,
    _resize,
    _resolve_net_label,
    _summarise,
)

__all__ = [
    "SoftEvalResult",
    "evaluate_soft",
    "half_cosine_factor",
    "make_optimizer",
    "param_groups",
    "prepare_teacher",
    "rded_augment",
    "rded_batch_size",
    "report_epochs",
    "resolve_patch_factor",
    "shuffle_patches",
    "soft_label_loss",
    "teacher_columns",
    "teacher_path",
    "train_student",
]

ProgressFn = Callable[[str], None]
EpochFn = Callable[[int, int, float], None]


@dataclass
class SoftEvalResult(EvalResult):
    """An :class:`EvalResult` (accuracies in percent) plus the soft-label settings and the teacher's identity."""

    labels: str = "soft"
    temperature: float = 20.0
    patch_factor: int = 1
    batch_size: int = 0
    eval_every: int = 10
    report_from: float = 0.8
    teacher: str = ""
    teacher_sha256: str = ""
    teacher_net: str = ""
    teacher_test_acc: float = 0.0
    teacher_recorded_test_acc: float | None = None


# ----------------------------------------------------------------------------------------------------------------------
# the protocol's pieces


def rded_batch_size(ipc: int, num_classes: int) -> int:
    """RDED's batch by IPC: 1 / 10 / 50 -> 10 / 50 / 100 (IPC <= 1, <= 10, more), doubled for >= 100 classes."""
    base = 10 if ipc <= 1 else 50 if ipc <= 10 else 100
    return 2 * base if num_classes >= 100 else base


def resolve_patch_factor(preset: EvalPreset, dataset_name: str | None) -> int:
    """The preset's factor, else RDED's default: 2 on ImageNet sets, 1 elsewhere."""
    if preset.patch_factor is not None:
        return preset.patch_factor
    return 2 if dataset_name in SUBSET_NAMES else 1


def half_cosine_factor(epoch: int, epochs: int) -> float:
    """RDED's LambdaLR factor after ``epoch`` scheduler steps: ``0.5 (1 + cos(pi e / (2E)))`` for e <= E, else 0."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs / 2)) if epoch <= epochs else 0.0


def param_groups(model: nn.Module, matrices_only: bool, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups. ``matrices_only`` (RDED's ``get_parameters``): decay params whose name contains "weight" and that
    have >= 2 dims; biases and norm affines get wd 0. Otherwise (DD-Ranking) one group, all decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not matrices_only:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "weight" in n and p.dim() > 1]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, preset: EvalPreset, epochs: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """RDED's AdamW over :func:`param_groups` and its per-epoch ``LambdaLR`` with :func:`half_cosine_factor`."""
    opt = torch.optim.AdamW(param_groups(model, preset.decay_matrices_only, preset.weight_decay), lr=preset.lr,
                            betas=preset.betas, weight_decay=preset.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: half_cosine_factor(e, epochs))


def report_epochs(epochs: int, every: int, report_from: float) -> list[int]:
    """1-based epochs after which the student is tested: every ``every`` epochs once past ``report_from * E`` (RDED:
    0-based epoch > 0.8 E), and always the last one. Equal to RDED's rule for every E > 5 (below, RDED tests nothing
    and reports 0). ``every = 0``: the last epoch only."""
    late = [e for e in range(1, epochs + 1) if every > 0 and e % every == 0 and e - 1 > report_from * epochs]
    return sorted(set(late) | {epochs})


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KLDivLoss(reduction="batchmean")(log_softmax(s / T), softmax(t / T))``: sum over classes and the batch of
    ``p_t (log p_t - log p_s)``, divided by the batch size. No T^2 factor (RDED)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    target = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, target, reduction="batchmean")


def _strip_order(gen: torch.Generator, b: int, factor: int, device: torch.device) -> torch.Tensor:
    return torch.argsort(torch.rand(b, factor, generator=gen, device=gen.device), dim=1).to(device)


def shuffle_patches(x: torch.Tensor, gen: torch.Generator, factor: int) -> torch.Tensor:
    """RDED's ``ShufflePatches(factor)``, batched, one random order per image: cut the image into ``factor`` vertical
    strips of width W // factor and shuffle them, then the same with horizontal strips of height H // factor. A
    remainder of W % factor (H % factor) pixels is dropped, as RDED's slicing does. factor 1 is the identity."""
    if factor == 1:
        return x
    b, c, h, w = x.shape
    if h < factor or w < factor:
        raise UserError(f"patch factor {factor} is larger than the {h}x{w} images", "use a smaller patch_factor")
    for dim, side in ((3, w), (2, h)):
        t = side // factor
        order = _strip_order(gen, b, factor, x.device)  # [B, factor]
        idx = (order.unsqueeze(-1) * t + torch.arange(t, device=x.device)).reshape(b, factor * t)
        shape = [b, 1, 1, factor * t] if dim == 3 else [b, 1, factor * t, 1]
        size = list(x.shape)
        size[dim] = factor * t
        x = torch.gather(x, dim, idx.view(shape).expand(size))
    return x


def rded_augment(x: torch.Tensor, gen: torch.Generator, factor: int, size: int, mean: torch.Tensor,
                 std: torch.Tensor) -> torch.Tensor:
    """RDED's train transform on a [0, 1] batch: ShufflePatches -> RandomResizedCrop(size, (1/factor, 1)) -> flip ->
    normalise."""
    x = shuffle_patches(x, gen, factor)
    x = random_resized_crop(x, gen, scale=(1.0 / factor, 1.0), size=size)
    return (random_flip(x, gen) - mean) / std


def teacher_columns(teacher_classes: int, num_classes: int, dataset: Any = None,
                    classes: Sequence[int] | None = None) -> list[int] | None:
    """Which teacher outputs are the student's classes (None: all, in order).

    A teacher of the whole dataset serves any class subset (its columns ``classes``); a 1000-class ImageNet-1K teacher
    serves an ImageNet subset through the subset's ImageNet-1K indices. Anything else is a mismatch (UserError).
    """
    fix = "use a teacher trained on this dataset's classes (`raydistill teacher`)"
    if dataset is not None and classes is not None:
        if teacher_classes == dataset.num_classes:
            cols = [int(c) for c in classes]
        elif teacher_classes == 1000 and dataset.name in SUBSET_NAMES:
            cols = [int(dataset.dit_labels[c]) for c in classes]
        else:
            raise UserError(f"the teacher predicts {teacher_classes} classes but dataset {dataset.name} has "
                            f"{dataset.num_classes}", fix)
        return None if cols == list(range(teacher_classes)) else cols
    if teacher_classes != num_classes:
        raise UserError(f"the teacher predicts {teacher_classes} classes but the set has {num_classes}", fix)
    return None


class _TeacherView(nn.Module):
    """The frozen teacher's logits at the student's classes; ``train()`` never takes it out of eval mode."""

    def __init__(self, teacher: nn.Module, columns: list[int] | None) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        self.columns = columns

    def train(self, mode: bool = True) -> _TeacherView:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.teacher(x)
        return out if self.columns is None else out[:, self.columns]


# ----------------------------------------------------------------------------------------------------------------------
# training one student


def train_student(
    student: nn.Module,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    preset: EvalPreset,
    epochs: int,
    batch_size: int,
    factor: int,
    size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    gen: torch.Generator,
    test_fn: Callable[[nn.Module], float],
    test_at: Sequence[int],
    on_epoch: EpochFn | None = None,
    net_index: int = 0,
    on_pass: Callable[[int, int], None] | None = None,
) -> tuple[float, float]:
    """Train ``student`` on ``x`` ([0, 1] images, already at ``size`` unless ``preset.augment == "rded"``) against
    ``teacher``'s soft labels; returns (last, best) test accuracy over the epochs ``test_at``."""
    opt, sched = make_optimizer(student, preset, epochs)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # CutMix's label bookkeeping only
    accs: list[float] = []
    n = x.shape[0]
    for epoch in range(1, epochs + 1):
        student.train()
        perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            if preset.augment == "rded":
                xb = rded_augment(x[idx], gen, factor, size, mean, std)
            else:
                xb = (x[idx] - mean) / std
            if preset.cutmix_p >= 1.0 or (
                preset.cutmix_p > 0 and float(torch.rand(1, generator=gen, device=gen.device)) < preset.cutmix_p
            ):
                xb = cutmix(xb, labels[idx], gen).x
            with torch.no_grad():
                target = teacher(xb)
            loss = soft_label_loss(student(xb), target, preset.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_pass is not None:
            on_pass(epoch, epochs)
        if epoch in test_at:
            accs.append(test_fn(student))
            if on_epoch is not None:
                on_epoch(net_index, epoch, accs[-1])
        sched.step()
    return accs[-1], max(accs)


# ----------------------------------------------------------------------------------------------------------------------
# the evaluation


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top = int(round((x.shape[-2] - size) / 2.0))
    left = int(round((x.shape[-1] - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def _new_student(net: str, channels: int, num_classes: int, size: int, seed: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # init on CPU from seed, caller's global RNG untouched
        torch.manual_seed(seed)
        model = build_teacher_net(net, channels, num_classes, size)
    return model.to(device)


def teacher_path(preset: EvalPreset, dataset_name: str | None) -> Path:
    """The checkpoint a soft preset reads: the preset's ``teacher``, else the built-in one for Fashion-MNIST
    (:data:`BUILTIN_TEACHER`). No teacher, or a missing built-in one, is one :class:`UserError` line."""
    if preset.teacher is not None:
        return Path(preset.teacher)
    if dataset_name != "fashion-mnist":
        raise UserError(f"the {preset.name} preset needs a teacher for dataset {dataset_name or '(tensors)'}",
                        "pass a teacher (--teacher PATH, or the preset's teacher=PATH) trained on the full "
                        "training set (`raydistill teacher --out PATH`)")
    if not BUILTIN_TEACHER.is_file():
        raise UserError(f"the built-in Fashion-MNIST teacher {BUILTIN_TEACHER} is missing",
                        "train it with `raydistill teacher` (or pass --teacher PATH)")
    return BUILTIN_TEACHER


def prepare_teacher(preset: EvalPreset, net: str, channels: int, size: int, num_classes: int, dataset: Any = None,
                    classes: Sequence[int] | None = None, device: str | torch.device = "cpu",
                    teacher: Teacher | None = None) -> tuple[Teacher, list[int] | None]:
    """Load and check the teacher of a soft preset for a student ``net`` on ``num_classes`` classes of ``channels``-
    channel ``size`` px images: the checkpoint (the preset's, else the built-in one for Fashion-MNIST), its dataset,
    classes and normalisation, and which of its outputs are the student's classes. Reads only; use it as the
    preflight of a job (it raises the same one-line errors the evaluation would)."""
    build_teacher_net(net, channels, num_classes, size)  # a bad student name fails before the teacher is read
    if teacher is None:
        path = teacher_path(preset, getattr(dataset, "name", None))
        mean, std = channel_stats(preset.mean, preset.std, channels)
        teacher = load_teacher(path, channels, size, net=preset.teacher_net or net, mean=mean, std=std, device=device)
    if dataset is not None and teacher.meta and teacher.meta.get("classes") != list(dataset.class_names):
        raise UserError(f"teacher {teacher.path} was trained on {teacher.meta.get('dataset')} with other classes "
                        f"than {dataset.name}", "use a teacher trained on this dataset (`raydistill teacher`)")
    return teacher, teacher_columns(teacher.num_classes, num_classes, dataset, classes)


def evaluate_soft(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    preset: str | EvalPreset = "rded",
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
    dataset: Any = None,
    classes: Sequence[int] | None = None,
    teacher: Teacher | None = None,
) -> SoftEvalResult:
    """Score a synthetic set under a soft-label preset (``rded``): train ``num_nets`` students against the teacher.

    Arguments as :func:`raydistill.evaluate.train.evaluate_synthetic`, plus ``dataset`` (the :class:`ClassDataset`,
    for the ImageNet-set defaults, the built-in teacher and the teacher's class mapping), ``classes`` (the dataset
    labels of the set's classes 0..K-1) and ``teacher`` (an already loaded teacher; default: the preset's checkpoint,
    else the built-in one for Fashion-MNIST). The teacher is loaded and checked before any training; its test accuracy
    on the same test set is measured once and returned with its path and sha256.
    """
    t0 = time.perf_counter()
    p = get_preset(preset)
    if p.labels != "soft" or p.augment not in ("rded", "none"):
        raise UserError(f"preset {p.name!r} is not a soft-label preset", "use 'rded' (labels='soft', augment='rded')")
    tx, ty, vx, vy = _check_inputs(train_x, train_y, test_x, test_y)
    if not isinstance(num_nets, int) or num_nets < 1:
        raise UserError(f"num_nets must be a positive integer, got {num_nets!r}", "pass num_nets >= 1")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r}", "use 'cpu', 'cuda' or 'cuda:N'") from exc
    if p.size is None and (tx.shape[-2] != tx.shape[-1] or tuple(tx.shape[-2:]) != tuple(vx.shape[-2:])):
        raise UserError(f"train images are {tuple(tx.shape[-2:])} and test images {tuple(vx.shape[-2:])}",
                        "use square images of one size or set the preset's size")
    size, channels = int(p.size or tx.shape[-1]), int(tx.shape[1])
    num_classes = int(max(int(ty.max()), int(vy.max()))) + 1
    ipc = max(1, round(ty.shape[0] / max(1, int(torch.unique(ty).numel()))))
    n_epochs = resolve_epochs(p, ipc, num_classes, epochs)
    every = p.eval_every if eval_every is None else eval_every
    if every is None or every < 0:
        raise UserError(f"eval_every must be >= 0 for soft presets, got {every}", "pass 0 (end only) or an interval")
    test_at = report_epochs(n_epochs, every, p.report_from)
    bs = p.batch_size or rded_batch_size(ipc, num_classes)
    name = getattr(dataset, "name", None)
    factor = resolve_patch_factor(p, name)
    mean_l, std_l = channel_stats(p.mean, p.std, channels)
    teacher, columns = prepare_teacher(p, net, channels, size, num_classes, dataset, classes, dev, teacher)
    view = _TeacherView(teacher.module.to(dev), columns)

    mean = torch.tensor(mean_l, device=dev).view(1, channels, 1, 1)
    std = torch.tensor(std_l, device=dev).view(1, channels, 1, 1)
    x = tx.to(dev, torch.float32)
    if p.augment != "rded":
        x = _resize(x, size)
    if name in SUBSET_NAMES:  # RDED's ImageNet test view
        vxs = [_center_crop(_resize(c.to(dev, torch.float32), size // 7 * 8), size) for c in vx.split(1024)]
    else:
        vxs = [_resize(c.to(dev, torch.float32), size) for c in vx.split(1024)]
    vx_n = torch.cat([(c - mean) / std for c in vxs])
    vy_d = vy.to(dev)
    tbs = test_batch_size or _default_test_batch(dev, size, size)

    def test_fn(m: nn.Module) -> float:
        return test_accuracy(m, ((vx_n[j:j + tbs], vy_d[j:j + tbs]) for j in range(0, vx_n.shape[0], tbs)),
                              vx_n.shape[0])

    label = _resolve_net_label(net, size)
    last, best, net_seconds = [], [], []
    with _cudnn_context(dev):
        teacher_acc = test_fn(view)
        if progress is not None:
            progress(f"teacher {teacher.net} ({teacher.path}): {teacher_acc:.1f}% on the test set")
        for i in range(num_nets):
            t_net = time.perf_counter()
            student = _new_student(net, channels, num_classes, size, seed + i, dev)
            gen = torch.Generator(device=dev).manual_seed(seed + i)
            on_pass = pass_reporter(progress, progress_every_s, i, num_nets, label)
            la, be = train_student(student, view, x, p, n_epochs, bs, factor, size, mean, std, gen, test_fn, test_at,
                                   on_epoch, i, on_pass)
            last.append(la)
            best.append(be)
            net_seconds.append(time.perf_counter() - t_net)
            if progress is not None:
                progress(f"net {i + 1}/{num_nets} {label}: {be:.1f}% ({net_seconds[-1]:.0f} s)")
    base = _summarise(p, label, n_epochs, seed, last, best, time.perf_counter() - t0, net_seconds, "tensor")
    info = teacher.info()
    return SoftEvalResult(**dataclasses.asdict(base), temperature=p.temperature, patch_factor=factor, batch_size=bs,
                          eval_every=every, report_from=p.report_from, teacher=info["teacher"],
                          teacher_sha256=info["teacher_sha256"], teacher_net=info["teacher_net"],
                          teacher_test_acc=teacher_acc, teacher_recorded_test_acc=info["teacher_recorded_test_acc"])
