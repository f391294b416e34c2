"""Batched, on-device augmentation for evaluation training: one call per mini-batch tensor [B, C, H, W].

Two families, both drawing every random number from an explicit ``torch.Generator`` (reproducible; no global RNG):

- DSA (benchmarks.md section 1; DSA's ``DiffAugment`` with ``aug_mode='S'``): :func:`dsa_augment` draws ONE family
  per mini-batch from the strategy (e.g. ``color_crop_cutout_flip_scale_rotate``) with per-image parameters.
  color = brightness + U(-0.5, 0.5), saturation x U(0, 2) about the channel mean (a no-op on grey), contrast
  x U(0.5, 1.5) about the image mean; crop = translate +-round(0.125 * size) px with zero fill; cutout = one
  round(0.5 * size) square; flip p 0.5; scale x, y ~ U[1/1.2, 1.2]; rotate U(+-15 deg). Scale/rotate use
  ``affine_grid``/``grid_sample`` (align_corners=True) like DSA. Applied to normalised tensors.
- IDC (methods.md section 0.4; ``transform_imagenet(augment=True)`` + ``mixup='cut'``): :func:`idc_augment` =
  RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) -> horizontal flip -> ColorJitter(0.4, 0.4, 0.4) (PyramidNet/IDC
  lerp jitter, random order per image) -> PCA lighting(0.1), on [0, 1] tensors before normalisation; :func:`cutmix`
  (Beta(1, 1) lambda, a random permutation partner, one box per mini-batch, label weight by box area).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raydistill.errors import UserError

__all__ = [
    "DSA_FAMILIES",
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "CutMix",
    "color_jitter",
    "cutmix",
    "dsa_augment",
    "dsa_brightness",
    "dsa_color",
    "dsa_contrast",
    "dsa_crop",
    "dsa_cutout",
    "dsa_flip",
    "dsa_rotate",
    "dsa_saturation",
    "dsa_scale",
    "idc_augment",
    "lighting",
    "random_flip",
    "random_resized_crop",
]

IMAGENET_PCA_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


# ----------------------------------------------------------------------------------------------------------------------
# random draws (always from the given generator, on the generator's device, then moved to the data's device)


def _rand(gen: torch.Generator, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device).to(device=like.device, dtype=like.dtype)


def _randn(gen: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).to(device=like.device, dtype=like.dtype)


def _randint(gen: torch.Generator, low: int, high: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=gen, device=gen.device).to(device)


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise UserError(f"augmentation expects a [B, C, H, W] batch, got shape {tuple(x.shape)}", "pass a 4-D tensor")


# ----------------------------------------------------------------------------------------------------------------------
# DSA family (DSA DiffAugment, per-image parameters)


def dsa_scale(x: torch.Tensor, gen: torch.Generator, ratio: float = 1.2) -> torch.Tensor:
    """Per-image anisotropic scale, sx, sy ~ U[1/ratio, ratio] (DSA ``rand_scale``)."""
    b = x.shape[0]
    sx = _rand(gen, b, x) * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = _rand(gen, b, x) * (ratio - 1.0 / ratio) + 1.0 / ratio
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = sy
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def dsa_rotate(x: torch.Tensor, gen: torch.Generator, degrees: float = 15.0) -> torch.Tensor:
    """Per-image rotation by U(-degrees, +degrees) (DSA ``rand_rotate``), zero fill."""
    b = x.shape[0]
    ang = (_rand(gen, b, x) - 0.5) * 2 * degrees / 180 * math.pi
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = sin
    theta[:, 1, 0] = -sin
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def dsa_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Per-image horizontal flip with probability ``p`` (DSA ``rand_flip``)."""
    mask = _rand(gen, x.shape[0], x).view(-1, 1, 1, 1) < p
    return torch.where(mask, x.flip(3), x)


def dsa_brightness(x: torch.Tensor, gen: torch.Generator, ratio: float = 1.0) -> torch.Tensor:
    """Add U(-ratio/2, ratio/2) per image (DSA ``rand_brightness``)."""
    return x + (_rand(gen, x.shape[0], x).view(-1, 1, 1, 1) - 0.5) * ratio


def dsa_saturation(x: torch.Tensor, gen: torch.Generator, ratio: float = 2.0) -> torch.Tensor:
    """Scale the deviation from the channel mean by U(0, ratio) (DSA ``rand_saturation``; a no-op on grey)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(gen, x.shape[0], x).view(-1, 1, 1, 1) * ratio) + mean


def dsa_contrast(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Scale the deviation from the image mean by U(ratio, ratio + 1) (DSA ``rand_contrast``)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(gen, x.shape[0], x).view(-1, 1, 1, 1) + ratio) + mean


def dsa_color(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DSA "color" family: brightness, then saturation, then contrast."""
    return dsa_contrast(dsa_saturation(dsa_brightness(x, gen), gen), gen)


def dsa_crop(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Per-image translation by integers in [-s, s], s = int(size * ratio + 0.5), zero fill (DSA ``rand_crop``).

    Output pixel (i, j) reads input pixel (i + tx, j + ty), as DSA's index grid does.
    """
    b, _, h, w = x.shape
    sx, sy = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = _randint(gen, -sx, sx + 1, b, x.device)
    ty = _randint(gen, -sy, sy + 1, b, x.device)
    xp = F.pad(x, [sy, sy, sx, sx])
    rows = torch.arange(h, device=x.device).view(1, h) + tx.view(b, 1) + sx  # [B, H]
    cols = torch.arange(w, device=x.device).view(1, w) + ty.view(b, 1) + sy  # [B, W]
    bidx = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bidx, rows.view(b, h, 1), cols.view(b, 1, w)]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def dsa_cutout(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of side int(size * ratio + 0.5) per image, centred anywhere (DSA ``rand_cutout``)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = _randint(gen, 0, h + (1 - ch % 2), b, x.device).view(b, 1) - ch // 2
    oy = _randint(gen, 0, w + (1 - cw % 2), b, x.device).view(b, 1) - cw // 2
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    in_r = (r >= ox) & (r < ox + ch)  # [B, H]
    in_c = (c >= oy) & (c < oy + cw)  # [B, W]
    keep = ~(in_r.view(b, h, 1) & in_c.view(b, 1, w))
    return x * keep.unsqueeze(1).to(x.dtype)


DSA_FAMILIES = {
    "color": dsa_color,
    "crop": dsa_crop,
    "cutout": dsa_cutout,
    "flip": dsa_flip,
    "scale": dsa_scale,
    "rotate": dsa_rotate,
}


def dsa_augment(
    x: torch.Tensor, gen: torch.Generator, strategy: str = "color_crop_cutout_flip_scale_rotate"
) -> torch.Tensor:
    """DSA evaluation augmentation: one family drawn per mini-batch, per-image random parameters.

    Args:
        x: normalised batch [B, C, H, W].
        gen: the random source.
        strategy: family names joined by "_" (from ``color, crop, cutout, flip, scale, rotate``); "" or "none" = off.
    """
    _check_batch(x)
    if strategy in ("", "none"):
        return x
    names = strategy.split("_")
    unknown = [n for n in names if n not in DSA_FAMILIES]
    if unknown:
        raise UserError(f"unknown DSA family {unknown}", f"use names from {', '.join(DSA_FAMILIES)} joined by '_'")
    k = int(torch.randint(0, len(names), (1,), generator=gen, device=gen.device).item())
    return DSA_FAMILIES[names[k]](x, gen)


# ----------------------------------------------------------------------------------------------------------------------
# IDC family (torchvision RandomResizedCrop / flip + IDC ColorJitter + Lighting, batched)


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    size: int | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Batched torchvision ``RandomResizedCrop``: per-image box by the same 10-try rejection rule, resized bilinearly.

    The box (area fraction ~ U(scale), log aspect ~ U(log ratio)) and its position are drawn per image; images with no
    valid box in ``attempts`` tries fall back to torchvision's central crop. The resize is one ``grid_sample``
    (bilinear, align_corners=False, border padding), equivalent to interpolating the cropped region.
    """
    _check_batch(x)
    b, _, h, w = x.shape
    out_h, out_w = (size, size) if size is not None else (h, w)
    dev = gen.device
    area = float(h * w)
    s = torch.rand(b, attempts, generator=gen, device=dev, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    ar = torch.exp(torch.rand(b, attempts, generator=gen, device=dev, dtype=torch.float64) * (hi - lo) + lo)
    cw = torch.round(torch.sqrt(area * s * ar))
    chh = torch.round(torch.sqrt(area * s / ar))
    valid = (cw > 0) & (cw <= w) & (chh > 0) & (chh <= h)
    first = torch.argmax(valid.to(torch.int8), dim=1)
    any_valid = valid.any(dim=1)
    cw = cw.gather(1, first.view(b, 1)).squeeze(1)
    chh = chh.gather(1, first.view(b, 1)).squeeze(1)
    # torchvision fallback: central crop with the aspect clamped into the ratio range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(h * ratio[1])), h
    else:
        fw, fh = w, h
    cw = torch.where(any_valid, cw, torch.full_like(cw, fw))
    chh = torch.where(any_valid, chh, torch.full_like(chh, fh))
    ui = torch.rand(b, generator=gen, device=dev, dtype=torch.float64)
    uj = torch.rand(b, generator=gen, device=dev, dtype=torch.float64)
    top = torch.where(any_valid, torch.floor(ui * (h - chh + 1)), torch.full_like(chh, (h - fh) // 2))
    left = torch.where(any_valid, torch.floor(uj * (w - cw + 1)), torch.full_like(cw, (w - fw) // 2))
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=dev)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = chh / h
    theta[:, 1, 2] = (2 * top + chh) / h - 1
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [b, x.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Per-image horizontal flip with probability ``p`` (torchvision ``RandomHorizontalFlip``)."""
    return dsa_flip(x, gen, p)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), [B, 1, H, W]; a grey image is its own luma."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def color_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> torch.Tensor:
    """IDC's ColorJitter (PyramidNet style): brightness, contrast and saturation in a random order per image.

    Each op is ``img.lerp(target, a)`` with a ~ U(-v, v) per image; targets: 0 (brightness), the mean luma of the
    image (contrast), the per-pixel luma (saturation).
    """
    _check_batch(x)
    b = x.shape[0]
    strengths = (brightness, contrast, saturation)
    alphas = [(_rand(gen, b, x) * 2 - 1).view(b, 1, 1, 1) * v for v in strengths]
    order = torch.argsort(torch.rand(b, 3, generator=gen, device=gen.device), dim=1).to(x.device)  # per-image perm
    for step in range(3):
        op = order[:, step].view(b, 1, 1, 1)
        out_b = x * (1 - alphas[0])
        gray = _grayscale(x)
        out_c = torch.lerp(x, gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), alphas[1])
        out_s = torch.lerp(x, gray.expand_as(x), alphas[2])
        x = torch.where(op == 0, out_b, torch.where(op == 1, out_c, out_s))
    return x


def lighting(x: torch.Tensor, gen: torch.Generator, alphastd: float = 0.1) -> torch.Tensor:
    """AlexNet PCA lighting noise with the ImageNet eigen-decomposition, alpha ~ N(0, alphastd) per image and
    component. Only defined for 3 channels: other inputs are returned unchanged."""
    _check_batch(x)
    if x.shape[1] != 3 or alphastd == 0:
        return x
    b = x.shape[0]
    alpha = _randn(gen, (b, 3), x) * alphastd
    eigval = torch.tensor(IMAGENET_PCA_EIGVAL, device=x.device, dtype=x.dtype)
    eigvec = torch.tensor(IMAGENET_PCA_EIGVEC, device=x.device, dtype=x.dtype)
    rgb = (alpha * eigval) @ eigvec.T  # [B, 3]: sum_j eigvec[c, j] * alpha_j * eigval_j
    return x + rgb.view(b, 3, 1, 1)


def idc_augment(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    jitter: tuple[float, float, float] = (0.4, 0.4, 0.4),
    lighting_std: float = 0.1,
) -> torch.Tensor:
    """IDC's train transform on a [0, 1] batch: RandomResizedCrop -> flip -> ColorJitter -> Lighting.

    Normalisation (and CutMix) come after this, as in ``transform_imagenet(augment=True)`` + ``train_epoch``.
    """
    x = random_resized_crop(x, gen, scale=scale)
    x = random_flip(x, gen)
    x = color_jitter(x, gen, *jitter)
    return lighting(x, gen, lighting_std)


# ----------------------------------------------------------------------------------------------------------------------
# CutMix


@dataclass
class CutMix:
    """A CutMix'ed batch: loss = weight_a * CE(out, y_a) + (1 - weight_a) * CE(out, y_b)."""

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    weight_a: float
    box: tuple[int, int, int, int]

    @property
    def weight_b(self) -> float:
        """Label weight of the pasted partner = box area / image area."""
        return 1.0 - self.weight_a

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """Mixed one-hot targets [B, num_classes]; every row sums to 1."""
        ya = F.one_hot(self.y_a, num_classes).to(self.x.dtype)
        yb = F.one_hot(self.y_b, num_classes).to(self.x.dtype)
        return ya * self.weight_a + yb * self.weight_b

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """IDC's mixed cross-entropy."""
        return F.cross_entropy(logits, self.y_a) * self.weight_a + F.cross_entropy(logits, self.y_b) * self.weight_b


def cutmix(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> CutMix:
    """IDC ``train_epoch`` CutMix: lambda ~ Beta(1, 1) = U(0, 1), partner = a random permutation of the batch,
    one box per batch (``rand_bbox``: side sqrt(1 - lambda) of each dimension, centre uniform, clipped), pasted from
    the partner; the label weight of ``y_a`` is 1 - box area / image area. ``x`` is not modified in place.
    """
    _check_batch(x)
    b, _, h, w = x.shape
    dev = gen.device
    lam = float(torch.rand(1, generator=gen, device=dev).item())
    perm = torch.randperm(b, generator=gen, device=dev).to(x.device)
    cut_rat = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut_rat), int(w * cut_rat)
    cx = int(torch.randint(0, h, (1,), generator=gen, device=dev).item())
    cy = int(torch.randint(0, w, (1,), generator=gen, device=dev).item())
    x1, x2 = min(max(cx - cut_h // 2, 0), h), min(max(cx + cut_h // 2, 0), h)
    y1, y2 = min(max(cy - cut_w // 2, 0), w), min(max(cy + cut_w // 2, 0), w)
    out = x.clone()
    out[:, :, x1:x2, y1:y2] = x[perm, :, x1:x2, y1:y2]
    weight_a = 1.0 - (x2 - x1) * (y2 - y1) / float(h * w)
    return CutMix(x=out, y_a=y, y_b=y[perm], weight_a=weight_a, box=(x1, y1, x2, y2))
