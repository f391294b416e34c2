"""MGD3's mode guidance (spec 3.2): pull the predicted clean latent toward its image's mode while ``i > t_stop``.

Image ``k`` of subset class ``c`` is pulled toward ``modes[c][k]`` (one mode per image, keyed by the *subset* class
label ``ctx.class_labels``, never by the model's label: a mis-keyed mode table is the known failure of
re-implementations, spec 3.1).

- DDPM (the author's ``p_sample_with_mode_guidance``): the step mean gets ``scale * sigma_t * (m - x0_hat)``, with the
  element-wise learned sigma of the step. This follows the code and Algorithm 1, not the opposite-signed Eq. 6 of the
  paper (spec 4, trap 7).
- DDIM (Algorithm 1): ``eps' = eps - sqrt(1 - abar_t) * scale * (m - x0_hat)`` and the ordinary DDIM update with
  ``eps'``. Both ``x0'`` and the DDIM mean are linear in eps, so the returned mean delta is computed in closed form:
  ``mean(eps') - mean(eps) = scale * (m - x0_hat) * sqrt(1 - abar) *
  (sqrt(abar_prev) * sqrt(1 - abar) / sqrt(abar) - sqrt(1 - abar_prev))`` (a positive factor, so the step moves
  toward the mode). Algebraically it equals differencing the two updates, and it is exactly zero for ``scale = 0``
  (differencing would leave rounding noise from the two x0 formulas).

No gradient is needed: the term is closed-form in ``x0_hat``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from raydistill.errors import UserError
from raydistill.guidance.base import StatelessTerm, StepContext


class LazyClassModes(Mapping):
    """A read-only ``{class label: modes [k, c, h, w]}`` that computes (or loads) a class's modes on first access.

    Lets a worker that serves shards of a few classes discover only those classes' modes.
    """

    def __init__(self, labels: list[int], loader: Callable[[int], torch.Tensor]) -> None:
        self._labels = [int(c) for c in labels]
        self._loader = loader
        self._done: dict[int, torch.Tensor] = {}

    def __getitem__(self, label: int) -> torch.Tensor:
        label = int(label)
        if label not in self._labels:
            raise KeyError(label)
        if label not in self._done:
            self._done[label] = self._loader(label)
        return self._done[label]

    def __iter__(self) -> Iterator[int]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)


class ModeGuidance(StatelessTerm):
    """MGD3's guidance term: ``ModeGuidance(modes, scale=0.1, t_stop=25)``; active at respaced ``i > t_stop``.

    ``modes`` maps a subset class label to that class's modes [k, c, h, w] (k = IPC; image index k uses mode k).
    """

    name = "mgd3"

    def __init__(self, modes: Mapping[int, torch.Tensor], scale: float = 0.1, t_stop: int = 25) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise UserError(f"mode_scale must be a finite number >= 0, got {scale!r}", "the paper uses 0.1")
        if isinstance(t_stop, bool) or not isinstance(t_stop, int):
            raise UserError(f"t_stop must be an integer respaced index, got {t_stop!r}",
                            "the paper uses 25 (guidance on for i = 49..26); -1 guides every step")
        self.modes = modes
        self.scale = float(scale)
        self.t_stop = int(t_stop)
        self._on_device: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}

    def active(self, i: int) -> bool:
        return i > self.t_stop

    def _class_modes(self, label: int, like: torch.Tensor) -> torch.Tensor:
        key = (label, str(like.device), like.dtype)
        if key not in self._on_device:
            try:
                m = self.modes[label]
            except KeyError:
                raise UserError(f"no MGD3 modes for class label {label}",
                                "discover modes for every class that is generated") from None
            m = torch.as_tensor(m)
            if m.dim() != like.dim() or tuple(m.shape[1:]) != tuple(like.shape[1:]):
                raise UserError(f"MGD3 modes of class {label} have shape {tuple(m.shape)}, but latents are "
                                f"{tuple(like.shape[1:])}", "discover the modes with the generator's VAE")
            self._on_device[key] = m.to(device=like.device, dtype=like.dtype)
        return self._on_device[key]

    def target(self, ctx: StepContext) -> torch.Tensor:
        """The mode of every batch element, [B, c, h, w]: ``modes[class_labels[b]][image_indices[b]]``."""
        like = ctx.x0_hat
        rows = []
        for c, k in zip(ctx.class_labels.tolist(), ctx.image_indices.tolist()):
            m = self._class_modes(int(c), like)
            if not 0 <= int(k) < m.shape[0]:
                raise UserError(f"image index {k} of class {c} has no mode: only {m.shape[0]} modes were found",
                                "discover k = IPC modes per class")
            rows.append(m[int(k)])
        return torch.stack(rows)

    def delta(self, ctx: StepContext) -> torch.Tensor:
        g = self.target(ctx) - ctx.x0_hat.detach()
        if ctx.sampler == "ddpm":
            return self.scale * ctx.sigma.detach() * g
        if ctx.sampler == "ddim":
            if ctx.alpha_bar_prev is None:
                raise ValueError("the DDIM mode guidance needs ctx.alpha_bar_prev")
            ab, ab_prev = ctx.alpha_bar, ctx.alpha_bar_prev
            coef = (1 - ab).sqrt() * (ab_prev.sqrt() * (1 - ab).sqrt() / ab.sqrt() - (1 - ab_prev).sqrt())
            return self.scale * coef * g
        raise ValueError(f"unknown sampler {ctx.sampler!r}")


def _extra(cfg, key: str, default, ok: Callable[[object], bool], what: str):
    value = cfg.extra.get(key, default)
    if not ok(value):
        raise UserError(f"extra.{key} must be {what}, got {value!r}", f"fix extra.{key} in the config")
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def mode_settings(cfg) -> dict:
    """MGD3's parameters from ``cfg.extra`` (validated): mode_scale, t_stop, mode_method, mode_snap."""
    from raydistill.modes import MODE_METHODS

    return {"scale": float(_extra(cfg, "mode_scale", 0.1, _is_number, "a number >= 0 (the paper uses 0.1)")),
            "t_stop": _extra(cfg, "t_stop", 25, _is_int, "an integer respaced index (the paper uses 25)"),
            "method": _extra(cfg, "mode_method", "kmeans", lambda v: v in MODE_METHODS,
                             f"one of {', '.join(MODE_METHODS)}"),
            "snap": _extra(cfg, "mode_snap", False, lambda v: isinstance(v, bool), "true or false")}


def class_modes_loader(cfg, ds, codec, labels: list[int]) -> Callable[[int], torch.Tensor]:
    """``load(label) -> modes [IPC, c, h, w]`` for ``cfg``: from the cache when present, else computed and cached.

    Modes: k = ``cfg.ipc`` per class, from all of the class's training images of ``ds``, clustered with ``cfg.seed``;
    cached under ``cfg.extra["modes_cache"]`` (default ``<cfg.out>/../.modes``; no cache when neither is set). The
    same function runs in the Ray mode-discovery tasks (one per class) and, on a cache miss, in the samplers.
    """
    from pathlib import Path

    from raydistill.modes import ModeCache, codec_identity, discover_modes

    st = mode_settings(cfg)
    root = cfg.extra.get("modes_cache")
    if root is None and cfg.out is not None:
        root = Path(cfg.out).parent / ".modes"
    cache = ModeCache(root) if root is not None else None
    vae_id: list[str] = []  # computed once, on first need (hashes the VAE weights)

    counts = {int(c): ds.num_images("train", int(c)) for c in labels}  # checked now, before any sampling
    for c, n in counts.items():
        if cfg.ipc > n:
            raise UserError(f"class {ds.class_names[c]!r} has {n} training images, fewer than the IPC {cfg.ipc} "
                            "modes MGD3 needs", "lower --ipc")

    def load(label: int) -> torch.Tensor:
        n = counts[int(label)]

        def compute() -> torch.Tensor:
            images, _ = ds.load("train", label=label)
            return discover_modes(codec, images, cfg.ipc, seed=cfg.seed, method=st["method"], snap=st["snap"])

        if cache is None:
            return compute()
        if not vae_id:
            vae_id.append(codec_identity(codec))
        dataset = (f"{ds.name}|root={cfg.data_root}|size={ds.image_size}|nclass={cfg.nclass}|phase={cfg.phase}"
                   f"|class={ds.class_names[label]}|n={n}")
        return cache.get_or_compute(compute, dataset, label, cfg.ipc, vae_id[0], cfg.seed, st["method"], st["snap"])

    return load


def mode_guidance_from_config(cfg, ds, codec, labels: list[int]) -> ModeGuidance:
    """The MGD3 term for a distillation config (``raydistill.distill`` registers this as method "mgd3").

    Parameters from ``cfg.extra``: ``mode_scale`` (0.1), ``t_stop`` (25), ``mode_method`` ("kmeans" or "gmm"),
    ``mode_snap`` (False); modes per class from :func:`class_modes_loader`, computed lazily.
    """
    st = mode_settings(cfg)
    return ModeGuidance(LazyClassModes(labels, class_modes_loader(cfg, ds, codec, labels)), scale=st["scale"],
                        t_stop=st["t_stop"])
