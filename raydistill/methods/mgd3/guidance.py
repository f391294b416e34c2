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
from collections.abc import Callable, Mapping

import torch

from raydistill.errors import UserError
from raydistill.guidance.base import LazyClassMap, StatelessTerm, StepContext


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


def _check_counts(cfg, ds, labels: list[int]) -> dict[int, int]:
    """Training images per selected class; one line when a class has fewer than the IPC modes MGD3 needs."""
    counts = {int(c): ds.num_images("train", int(c)) for c in labels}
    for c, n in counts.items():
        if cfg.ipc > n:
            raise UserError(f"class {ds.class_names[c]!r} has {n} training images, fewer than the IPC {cfg.ipc} "
                            "modes MGD3 needs", "lower --ipc")
    return counts


def class_modes_loader(cfg, ds, codec, labels: list[int], params=None) -> Callable[[int], torch.Tensor]:
    """``load(label) -> modes [IPC, c, h, w]`` for ``cfg``: from the cache when present, else computed and cached.

    Modes: k = ``cfg.ipc`` per class, from all of the class's training images of ``ds``, clustered with ``cfg.seed``;
    cached under ``modes_cache`` (default ``<cfg.out>/../.modes``; no cache when neither is set). The same function
    runs in the Ray mode-discovery tasks (one per class) and, on a cache miss, in the samplers. ``params``: the
    parsed :class:`raydistill.methods.mgd3.Mgd3Params` (default: parsed from ``cfg.extra``).
    """
    from pathlib import Path

    from raydistill.methods.mgd3 import Mgd3Params
    from raydistill.methods.mgd3.modes import ModeCache, codec_identity, discover_modes
    from raydistill.methods.registry import parse_params

    p = params if params is not None else parse_params(Mgd3Params, cfg.extra, cfg)
    root = p.modes_cache
    if root is None and cfg.out is not None:
        root = Path(cfg.out).parent / ".modes"
    cache = ModeCache(root) if root is not None else None
    vae_id: list[str] = []  # computed once, on first need (hashes the VAE weights)
    counts = _check_counts(cfg, ds, labels)  # checked now, before any sampling

    def load(label: int) -> torch.Tensor:
        n = counts[int(label)]

        def compute() -> torch.Tensor:
            images, _ = ds.load("train", label=label)
            return discover_modes(codec, images, cfg.ipc, seed=cfg.seed, method=p.mode_method, snap=p.mode_snap)

        if cache is None:
            return compute()
        if not vae_id:
            vae_id.append(codec_identity(codec))
        dataset = (f"{ds.name}|root={cfg.data_root}|size={ds.image_size}|nclass={cfg.nclass}|phase={cfg.phase}"
                   f"|class={ds.class_names[label]}|n={n}")
        return cache.get_or_compute(compute, dataset, label, cfg.ipc, vae_id[0], cfg.seed, p.mode_method,
                                    p.mode_snap)

    return load


def mode_guidance(ctx, p) -> ModeGuidance:
    """The MGD3 term of a run (method part ``mgd3``): modes per selected class from :func:`class_modes_loader`,
    computed lazily; ``p``: :class:`raydistill.methods.mgd3.Mgd3Params`."""
    return ModeGuidance(LazyClassMap(ctx.labels, class_modes_loader(ctx.cfg, ctx.ds, ctx.codec, ctx.labels, p)),
                        scale=float(p.mode_scale), t_stop=p.t_stop)
