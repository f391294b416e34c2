"""Samplers as plain functions over one denoiser: 50-step respaced ancestral DDPM (spec 0.1) and DDIM (eta 0).

Classifier-free guidance follows DiT's ``forward_with_cfg``: the latent is evaluated with [y, null]; the guided eps
is ``eps_u + s (eps_c - eps_u)`` on the first ``cfg_channels`` channels (DiT-XL/2's quirk: 3 of 4), the conditional
eps elsewhere, and the conditional half's learned variance. ``cfg_interval`` limits guidance to a band of noise
levels (Kynkäänniemi et al., NeurIPS 2024, "Applying guidance in a limited interval"): outside it a step uses the
conditional prediction alone (scale 1, one model row per image instead of two). Every image draws its initial noise
and its per-step noise from its own generator seeded by :func:`image_seed`, so an image is a pure function of
(class, index, seed, settings), whatever batch it is generated in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raydistill.diffusion.gaussian import MeanVariance, mean_variance
from raydistill.diffusion.schedule import Schedule
from raydistill.errors import UserError
from raydistill.guidance.base import GuidanceTerm, StepContext


def image_seed(base_seed: int, class_label: int, index: int) -> int:
    """A stable 63-bit seed for image ``index`` of class ``class_label`` under run seed ``base_seed``."""
    state = np.random.SeedSequence([int(base_seed), int(class_label), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass(frozen=True)
class SamplerConfig:
    sampler: str = "ddpm"  # "ddpm" (ancestral, learned variance) or "ddim" (eta 0)
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_channels: int | None = None  # None: all eps channels; 3 reproduces DiT-XL/2's quirk
    cfg_interval: tuple[int, int] | None = None  # (lo, hi) model timesteps where CFG acts; None: every step

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {self.sampler!r}")
        if self.cfg_interval is not None and not 0 <= self.cfg_interval[0] <= self.cfg_interval[1]:
            raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi, got {self.cfg_interval!r}")

    def scale_at(self, t: int) -> float:
        """The CFG scale at model timestep ``t``: ``cfg_scale`` inside ``cfg_interval`` (lo <= t <= hi, ends
        included), 1 (the conditional prediction alone) outside it."""
        if self.cfg_interval is None or self.cfg_interval[0] <= t <= self.cfg_interval[1]:
            return self.cfg_scale
        return 1.0


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dit_denoiser(model, pad_to: int = 16) -> Denoiser:
    """``(x [B,C,h,w], t [B] model timesteps, y [B]) -> output [B, 2C, h, w]`` for a diffusers DiT.

    Rows are padded with zeros to a multiple of ``pad_to``: BLAS picks different kernels for small row counts
    (measured on CPU: with AVX2, 1 or 2 rows differ from a batch of 64 by ~1e-6 and 8 or more are bit-identical; with
    AVX-512, 1 and 8 rows differ by ~5e-7 and every multiple of 16 is bit-identical), so padding to 16 makes every
    image's output independent of its batch on both. ``pad_to=1`` turns padding off. The output has the latents'
    dtype (under bf16 autocast the model computes in bf16; the CFG combination and the step stay in float32, and a
    float64 check stays float64).
    """

    def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        extra = (-b) % pad_to
        if extra:
            x = torch.cat([x, x.new_zeros(extra, *x.shape[1:])])
            t = torch.cat([t, t.new_zeros(extra)])
            y = torch.cat([y, y.new_zeros(extra)])
        return model(x, timestep=t, class_labels=y).sample[:b].to(x.dtype)

    return run


def _cfg_outputs(denoiser: Denoiser, s: Schedule, x: torch.Tensor, i: int, y: torch.Tensor, null_label: int,
                 cfg: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(eps, v, eps_twin, v_twin)`` of one CFG evaluation of ``x``: the rows DiT's ``forward_with_cfg`` returns for
    the conditional half (guided eps, conditional variance output) and for the unconditional twin (the same guided
    channels, the unconditional eps on the other channels and the unconditional variance output). Without CFG
    (scale 1) the twin's are the conditional ones."""
    b, c = x.shape[:2]
    model_t = int(s.timestep_map[i])
    t = torch.full((b,), model_t, device=x.device, dtype=torch.long)
    scale = cfg.scale_at(model_t)
    if scale == 1.0:
        out = denoiser(x, t, y)
        eps, v = out[:, :c], out[:, c:]
        eps_twin, v_twin = eps, v
    else:
        out = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
        out_c, out_u = out[:b], out[b:]
        eps_c, eps_u, v, v_twin = out_c[:, :c], out_u[:, :c], out_c[:, c:], out_u[:, c:]
        k = c if cfg.cfg_channels is None else cfg.cfg_channels
        guided = eps_u[:, :k] + scale * (eps_c[:, :k] - eps_u[:, :k])
        eps = torch.cat([guided, eps_c[:, k:]], dim=1) if k < c else guided
        eps_twin = torch.cat([guided, eps_u[:, k:]], dim=1) if k < c else guided
    if v.shape[1] == 0:  # fixed-variance model: use the posterior variance (ADM "fixed small")
        v = v_twin = -torch.ones_like(eps)
    return eps, v, eps_twin, v_twin


def cfg_predict(denoiser: Denoiser, s: Schedule, x: torch.Tensor, i: int, y: torch.Tensor, null_label: int,
                cfg: SamplerConfig) -> MeanVariance:
    """One CFG-combined model evaluation at respaced index ``i``; returns eps, x0_hat, mean, log variance."""
    eps, v, _, _ = _cfg_outputs(denoiser, s, x, i, y, null_label, cfg)
    return mean_variance(s, x, i, eps, v)


def cfg_predict_twin(denoiser: Denoiser, s: Schedule, x: torch.Tensor, twin: torch.Tensor, i: int, y: torch.Tensor,
                     null_label: int, cfg: SamplerConfig) -> tuple[MeanVariance, MeanVariance]:
    """:func:`cfg_predict` of ``x`` and the prediction for its unconditional twin latent ``twin`` (IGD as released,
    spec 2.2): DiT runs on ``x`` only, the twin's x0_hat and mean use its own latent with the twin row of
    :func:`_cfg_outputs` (so its x0_hat is differentiable w.r.t. ``x`` through the model)."""
    eps, v, eps_twin, v_twin = _cfg_outputs(denoiser, s, x, i, y, null_label, cfg)
    return mean_variance(s, x, i, eps, v), mean_variance(s, twin, i, eps_twin, v_twin)


def twin_seed(seed: int) -> int:
    """The noise seed of an image's unconditional twin: derived from, and distinct from, the image's own seed."""
    state = np.random.SeedSequence([int(seed), 1]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _noise(gens: Sequence[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    # [B, C, h, w], one generator per image: independent of batch composition.
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device, dtype)


def _non_finite(step: int, n: int, i: int, mv: MeanVariance, finite: list[tuple[str, torch.Tensor]]) -> None:
    """One line naming where NaN/inf first entered the chain: a guidance term, else the model's prediction."""
    bad = [name for name, ok in finite if not bool(ok)]
    if bad:
        source = f"the guidance term {bad[0]!r}"
    elif not bool(torch.isfinite(mv.eps).all() and torch.isfinite(mv.log_variance).all()):
        source = "the model's noise prediction (a damaged checkpoint, or weights that overflow)"
    else:
        source = "the step update"
    raise UserError(f"the latents are not finite (NaN or inf) after sampling step {step}/{n} (respaced index {i}), "
                    f"first from {source}; the shard is not written", "check the model files and the guidance "
                    "weights (--set, --cfg-scale), then rerun to resume")


def sample(denoiser: Denoiser, schedule: Schedule, dit_labels: torch.Tensor, seeds: Sequence[int],
           latent_shape: tuple[int, int, int], null_label: int, cfg: SamplerConfig = SamplerConfig(),
           terms: Sequence[GuidanceTerm] = (), class_labels: torch.Tensor | None = None,
           image_indices: torch.Tensor | None = None, device: str | torch.device = "cpu",
           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sample latents [B, *latent_shape] for ``dit_labels`` with per-image ``seeds``, guided by ``terms``."""
    device = torch.device(device)
    y = dit_labels.to(device).long()
    cls = (class_labels if class_labels is not None else dit_labels).to(device).long()
    idx = (image_indices if image_indices is not None else torch.zeros_like(cls)).to(device).long()
    gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
    x = _noise(gens, latent_shape, device, torch.float32)
    twin = None  # the unconditional twin latent a term asked for (``uses_twin``); it starts as the image's x_T
    if any(getattr(term, "uses_twin", False) for term in terms):
        if cfg.sampler != "ddpm":
            raise ValueError("the unconditional twin is defined for the ancestral DDPM sampler only")
        twin, twin_gens = x.clone(), [torch.Generator().manual_seed(twin_seed(int(sd))) for sd in seeds]
    n = len(schedule)
    finite: list[tuple[str, torch.Tensor]] = []
    for i in reversed(range(n)):
        active = [term for term in terms if term.active(i)]
        grad = any(term.needs_grad(i) for term in active)
        with torch.enable_grad() if grad else torch.no_grad():
            x_in = x.detach().requires_grad_(grad)
            if twin is None:
                mv, mv_twin = cfg_predict(denoiser, schedule, x_in, i, y, null_label, cfg), None
            else:
                mv, mv_twin = cfg_predict_twin(denoiser, schedule, x_in, twin, i, y, null_label, cfg)
            if cfg.sampler == "ddpm":
                step_mean = mv.mean
            else:
                ab_prev = schedule.at("alphas_cumprod_prev", i, x_in)
                step_mean = ab_prev.sqrt() * mv.x0_hat + (1 - ab_prev).sqrt() * mv.eps
            if active:
                ctx = StepContext(i=i, x_t=x_in, eps=mv.eps, x0_hat=mv.x0_hat, mean=mv.mean,
                                  log_variance=mv.log_variance, alpha_bar=schedule.at("alphas_cumprod", i, x_in),
                                  dit_labels=y, class_labels=cls, image_indices=idx, sampler=cfg.sampler,
                                  alpha_bar_prev=schedule.at("alphas_cumprod_prev", i, x_in),
                                  x0_hat_twin=None if mv_twin is None else mv_twin.x0_hat)
                for term in active:
                    delta = term.delta(ctx).detach()
                    finite.append((term.name, torch.isfinite(delta).all()))  # read only if x is not finite
                    step_mean = step_mean + delta
        x = step_mean.detach()
        if cfg.sampler == "ddpm" and i > 0:
            x = x + mv.sigma.detach() * _noise(gens, latent_shape, device, x.dtype)
        if mv_twin is not None:  # unguided, with its own noise (the released code's row 1 of the CFG batch)
            twin = mv_twin.mean.detach()
            if i > 0:
                twin = twin + mv_twin.sigma.detach() * _noise(twin_gens, latent_shape, device, twin.dtype)
        if not bool(torch.isfinite(x).all()):
            _non_finite(n - i, n, i, mv, finite)
        finite = []
        if progress is not None:
            progress(n - i)
    for term in terms:
        term.on_images_done(x, cls, idx)
    return x
