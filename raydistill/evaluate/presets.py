"""Evaluation protocols as data: one frozen :class:`EvalPreset` per published protocol.

- ``dc``  : DC on Fashion-MNIST (benchmarks.md section 1): ConvNet-3, SGD lr 0.01 / momentum 0.9 / wd 5e-4, batch 256,
  E = 300 so E+1 passes, LR x0.1 once after pass E//2+1 (0-based, optimizer re-created, as DC's ``evaluate_synset``),
  no augmentation, Normalize(0.2861, 0.3530), the accuracy after the LAST pass is reported.
- ``dsa`` : the same with E = 1000 and DSA augmentation ``color_crop_cutout_flip_scale_rotate`` (one family per
  mini-batch, per-image parameters), applied to normalised tensors.
- ``idc`` : the IDC-derived hard-label protocol of Minimax/MGD^3 (methods.md section 0.4): SGD 0.01/0.9/5e-4, batch
  64, epochs from :func:`ipc_epoch` (incl. the nclass = 100 rule), MultiStepLR at 2E//3 and 5E//6 with gamma 0.2,
  RandomResizedCrop(scale 0.5-1) + flip + ColorJitter(0.4, 0.4, 0.4) + PCA lighting (0.1) + CutMix (p = 1, Beta(1, 1)),
  224 px, ImageNet mean/std, test every E//100 epochs, the BEST test accuracy is reported.
- ``igd`` : IGD's released ``train.py`` variant of ``idc``: AdamW lr 1e-3, betas (0.9, 0.999), wd 0.01, 256 px,
  mean = std = 0.5; same schedule, augmentation and report rule.
- ``rded``: RDED's soft-label protocol (benchmarks.md section 4, methods.md section 0.5), run by
  :mod:`raydistill.evaluate.soft_label`: a teacher's soft labels on every augmented + CutMixed batch, KL with T = 20,
  AdamW 1e-3 / (0.9, 0.999) / wd 0.01 on >= 2-dim weights, half-cosine LR factor per epoch, E = 300, batch by IPC,
  ShufflePatches + RandomResizedCrop + flip, best top-1 of the tests every 10 epochs over the last 20% of epochs.

Override fields with ``dataclasses.replace(get_preset("dc"), epochs=5)`` for quick runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raydistill.errors import UserError

__all__ = [
    "EvalPreset",
    "PRESET_NAMES",
    "PRESETS",
    "dc_decay_pass",
    "get_preset",
    "ipc_epoch",
    "multistep_milestones",
    "resolve_epochs",
    "resolve_eval_every",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
FMNIST_MEAN: tuple[float] = (0.2861,)
FMNIST_STD: tuple[float] = (0.3530,)


@dataclass(frozen=True)
class EvalPreset:
    """One evaluation protocol. Pure data; the training loop in :mod:`raydistill.evaluate.train` interprets it.

    Attributes:
        name: preset name.
        optimizer: "sgd" or "adamw".
        lr: initial learning rate.
        momentum: SGD momentum (ignored by AdamW).
        betas: AdamW betas (ignored by SGD).
        weight_decay: weight decay (coupled L2 for SGD, decoupled for AdamW).
        batch_size: mini-batch size.
        epochs: number of epochs E; ``None`` means "from the IPC by :func:`ipc_epoch`".
        schedule: "dc_step" (DC: E+1 passes, LR x ``lr_decay`` once after 0-based pass E//2+1, optimizer re-created)
            or "multistep" (IDC: E passes, MultiStepLR at E*num//den for each ``milestones`` fraction, x ``gamma``).
        lr_decay: factor of the single DC decay.
        milestones: MultiStepLR milestone fractions as (num, den) pairs, applied as ``num * E // den``.
        gamma: MultiStepLR factor.
        augment: "none", "dsa" (DSA families on normalised tensors) or "idc" (RRC/flip/jitter/lighting on [0, 1]
            tensors, then normalisation).
        dsa_strategy: DSA families joined by "_"; one family is drawn per mini-batch.
        cutmix_p: probability of CutMix per mini-batch (IDC: 1.0; 0 disables).
        cutmix_beta: Beta(beta, beta) parameter of the CutMix lambda (only 1.0, i.e. uniform, is supported).
        rrc_scale: RandomResizedCrop area range.
        jitter: ColorJitter (brightness, contrast, saturation) strengths.
        lighting_std: PCA lighting alpha std.
        size: training/test resolution (square); ``None`` keeps the input size.
        mean: per-channel normalisation mean (a one-element tuple is broadcast to all channels).
        std: per-channel normalisation std.
        report: "last" (accuracy after the final epoch) or "best" (max over the evaluated epochs).
        eval_every: test every this many epochs; 0 = only after training; ``None`` = IDC rule max(1, E // 100).
        labels: "hard" (cross-entropy on the set's labels, :mod:`.train`) or "soft" (teacher KL, :mod:`.soft_label`).
        temperature: soft: the KL temperature T (no T^2 factor).
        patch_factor: soft: ShufflePatches factor and RandomResizedCrop scale (1/factor, 1); ``None`` = 2 on ImageNet
            sets, 1 elsewhere (RDED's scripts; DD-Ranking's configs use 1).
        teacher: soft: teacher checkpoint; ``None`` = the built-in teacher (Fashion-MNIST only).
        teacher_net: soft: architecture of a checkpoint without raydistill metadata; ``None`` = the student's.
        report_from: tests count only after epoch ``report_from * E`` (RDED: 0.8, i.e. the last 20%).
        decay_matrices_only: weight decay only on >= 2-dim weights (RDED's ``get_parameters``; DD-Ranking: all).
        ``batch_size=None`` means by IPC (RDED) and empty ``mean``/``std`` mean by channels (ImageNet's for RGB,
        Fashion-MNIST's for grey); both are used by soft presets only.
    """

    name: str
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    batch_size: int | None = 256
    epochs: int | None = 300
    schedule: str = "dc_step"
    lr_decay: float = 0.1
    milestones: tuple[tuple[int, int], ...] = ((2, 3), (5, 6))
    gamma: float = 0.2
    augment: str = "none"
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    cutmix_p: float = 0.0
    cutmix_beta: float = 1.0
    rrc_scale: tuple[float, float] = (0.5, 1.0)
    jitter: tuple[float, float, float] = (0.4, 0.4, 0.4)
    lighting_std: float = 0.1
    size: int | None = None
    mean: tuple[float, ...] = FMNIST_MEAN
    std: tuple[float, ...] = FMNIST_STD
    report: str = "last"
    eval_every: int | None = 0
    labels: str = "hard"
    temperature: float = 20.0
    patch_factor: int | None = None
    teacher: str | None = None
    teacher_net: str | None = None
    report_from: float = 0.0
    decay_matrices_only: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in ("sgd", "adamw"), f"optimizer {self.optimizer!r}", "use 'sgd' or 'adamw'"),
            (self.schedule in ("dc_step", "multistep", "half_cosine"), f"schedule {self.schedule!r}",
             "use 'dc_step', 'multistep' or 'half_cosine'"),
            (self.augment in ("none", "dsa", "idc", "rded"), f"augment {self.augment!r}",
             "use 'none', 'dsa', 'idc' or 'rded'"),
            (self.report in ("last", "best"), f"report {self.report!r}", "use 'last' or 'best'"),
            (self.lr > 0, f"lr {self.lr}", "use a positive learning rate"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size {self.batch_size}", "use a positive one"),
            (self.epochs is None or self.epochs >= 1, f"epochs {self.epochs}", "use epochs >= 1 (or None: by IPC)"),
            (self.eval_every is None or self.eval_every >= 0, f"eval_every {self.eval_every}", "use >= 0 or None"),
            (self.cutmix_beta == 1.0, f"cutmix_beta {self.cutmix_beta}", "only Beta(1, 1) CutMix is supported"),
            (len(self.mean) == len(self.std), "mean/std lengths differ", "give one std per mean"),
            (self.labels in ("hard", "soft"), f"labels {self.labels!r}", "use 'hard' or 'soft'"),
            (self.temperature > 0, f"temperature {self.temperature}", "use a positive temperature"),
            (self.patch_factor is None or self.patch_factor >= 1, f"patch_factor {self.patch_factor}", "use >= 1"),
            (0.0 <= self.report_from < 1.0, f"report_from {self.report_from}", "use a fraction in [0, 1)"),
            (self.labels == "soft" or (self.batch_size is not None and self.mean), "batch by IPC / channel stats",
             "set batch_size and mean/std for hard-label presets"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise UserError(f"invalid evaluation preset {self.name!r}: {problem}", fix)


def ipc_epoch(ipc: int, nclass: int = 10) -> int:
    """IDC's ``ipc_epoch`` (methods.md section 0.4): training epochs from images per class.

    IPC 1 -> 3000, <= 10 -> 2000, <= 50 -> 1500, <= 200 -> 1000, <= 500 -> 500, else 300. For ``nclass == 100`` the
    count is multiplied by 2/3 and rounded down to a multiple of 100 (IPC 10 -> 1300, IPC 20 -> 1000).
    """
    if ipc == 1:
        epoch = 3000
    elif ipc <= 10:
        epoch = 2000
    elif ipc <= 50:
        epoch = 1500
    elif ipc <= 200:
        epoch = 1000
    elif ipc <= 500:
        epoch = 500
    else:
        epoch = 300
    if nclass == 100:
        epoch = int((2 / 3) * epoch)
        epoch -= epoch % 100
    return epoch


def resolve_epochs(preset: EvalPreset, ipc: int, nclass: int, epochs: int | None = None) -> int:
    """Epoch count E for a run: an explicit override, else the preset's fixed E, else :func:`ipc_epoch`."""
    if epochs is not None:
        if int(epochs) < 1:
            raise UserError(f"epochs must be >= 1, got {epochs}", "pass a positive epoch count")
        return int(epochs)
    if preset.epochs is not None:
        return preset.epochs
    return ipc_epoch(ipc, nclass)


def resolve_eval_every(preset: EvalPreset, epochs: int, eval_every: int | None = None) -> int:
    """Test interval in epochs (0 = only after training). ``None`` in the preset means IDC's max(1, E // 100)."""
    value = preset.eval_every if eval_every is None else eval_every
    if value is None:
        return max(1, epochs // 100)
    if value < 0:
        raise UserError(f"eval_every must be >= 0, got {value}", "pass 0 (end only) or a positive interval")
    return int(value)


def dc_decay_pass(epochs: int) -> int:
    """0-based pass after which DC multiplies the LR by 0.1 and re-creates the optimizer: ``E // 2 + 1``."""
    return epochs // 2 + 1


def multistep_milestones(preset: EvalPreset, epochs: int) -> list[int]:
    """MultiStepLR milestones, IDC style: ``[2 * E // 3, 5 * E // 6]`` for the default fractions."""
    return [num * epochs // den for num, den in preset.milestones]


DC = EvalPreset(name="dc")
DSA = dataclasses.replace(DC, name="dsa", epochs=1000, augment="dsa")
IDC = EvalPreset(
    name="idc",
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=5e-4,
    batch_size=64,
    epochs=None,
    schedule="multistep",
    milestones=((2, 3), (5, 6)),
    gamma=0.2,
    augment="idc",
    cutmix_p=1.0,
    size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    report="best",
    eval_every=None,
)
IGD = dataclasses.replace(
    IDC,
    name="igd",
    optimizer="adamw",
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.01,
    size=256,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)

RDED = EvalPreset(
    name="rded",
    labels="soft",
    optimizer="adamw",
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=0.01,
    decay_matrices_only=True,
    batch_size=None,
    epochs=300,
    schedule="half_cosine",
    augment="rded",
    cutmix_p=1.0,
    mean=(),
    std=(),
    report="best",
    eval_every=10,
    report_from=0.8,
)

PRESETS: dict[str, EvalPreset] = {p.name: p for p in (DC, DSA, IDC, IGD, RDED)}
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def get_preset(name: str | EvalPreset, **overrides: object) -> EvalPreset:
    """Look up a preset by name (dc, dsa, idc, igd, rded); keyword overrides go through ``dataclasses.replace``.

    Passing an :class:`EvalPreset` returns it (with overrides applied). Unknown names raise :class:`UserError`.
    """
    if isinstance(name, EvalPreset):
        preset = name
    else:
        key = str(name).strip().lower()
        if key not in PRESETS:
            raise UserError(f"unknown evaluation preset {name!r}", f"use one of: {', '.join(PRESET_NAMES)}")
        preset = PRESETS[key]
    if overrides:
        fields = {f.name for f in dataclasses.fields(EvalPreset)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise UserError(f"unknown preset field(s) {bad}", f"use fields of EvalPreset: {', '.join(sorted(fields))}")
        preset = dataclasses.replace(preset, **overrides)  # type: ignore[arg-type]
    return preset
