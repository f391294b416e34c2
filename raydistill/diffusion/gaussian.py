"""Gaussian diffusion maths of ADM/DiT with the learned-range variance (Nichol & Dhariwal 2021, eq. 15).

A model output has ``2C`` channels: ``eps`` (C) and ``v`` (C). The variance interpolates in log space between the
posterior variance and beta: ``log var = frac * log(beta_t) + (1 - frac) * log(beta~_t)``, ``frac = (v + 1) / 2``.
``x0_hat = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps`` and the mean is the posterior mean ``q(x_{t-1} | x_t, x0_hat)``.
Training uses DiT's loss: MSE on eps plus the variational bound with the mean frozen (ADM ``training_losses``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raydistill.diffusion.schedule import Schedule


@dataclass
class MeanVariance:
    """One step's prediction, all [B, C, H, W]."""

    eps: torch.Tensor
    x0_hat: torch.Tensor
    mean: torch.Tensor
    log_variance: torch.Tensor

    @property
    def sigma(self) -> torch.Tensor:
        """Element-wise ``exp(0.5 * log_variance)`` (spec notation sigma_t)."""
        return torch.exp(0.5 * self.log_variance)


def q_sample(s: Schedule, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    abar = s.at("alphas_cumprod", i, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def predict_x0(s: Schedule, x_t: torch.Tensor, i: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    abar = s.at("alphas_cumprod", i, x_t)
    return (1.0 / abar).sqrt() * x_t - (1.0 / abar - 1.0).sqrt() * eps


def posterior_mean(s: Schedule, x0: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor | int) -> torch.Tensor:
    return s.at("posterior_mean_coef1", i, x_t) * x0 + s.at("posterior_mean_coef2", i, x_t) * x_t


def learned_log_variance(s: Schedule, v: torch.Tensor, i: torch.Tensor | int) -> torch.Tensor:
    """Learned-range log variance; ``v`` in [-1, 1] is the model's second half of channels."""
    min_log = s.at("posterior_log_variance_clipped", i, v)
    max_log = torch.log(s.at("betas", i, v))
    frac = (v + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def mean_variance(s: Schedule, x_t: torch.Tensor, i: torch.Tensor | int, eps: torch.Tensor,
                  v: torch.Tensor) -> MeanVariance:
    """``p_mean_variance`` of ADM for a learned-range model, with ``clip_denoised=False`` (spec 0.1)."""
    x0 = predict_x0(s, x_t, i, eps)
    return MeanVariance(eps=eps, x0_hat=x0, mean=posterior_mean(s, x0, x_t, i),
                        log_variance=learned_log_variance(s, v, i))


# ---- training loss (DiT: loss = MSE(eps) + VB with frozen mean) -------------------------------------------------

def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """ADM's decoder likelihood for data in [-1, 1] with 255 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def training_losses(s: Schedule, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                    i: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample DiT losses: ``mse`` on eps, ``vb`` (bits/dim, mean frozen) and their sum ``loss``; also ``x0_hat``."""
    c = x0.shape[1]
    eps, v = model_output[:, :c], model_output[:, c:]
    frozen = mean_variance(s, x_t, i, eps.detach(), v)
    true_mean = posterior_mean(s, x0, x_t, i)
    true_logvar = s.at("posterior_log_variance_clipped", i, x_t)
    kl = _normal_kl(true_mean, true_logvar, frozen.mean, frozen.log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, frozen.mean, 0.5 * frozen.log_variance)
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(i.to(x0.device) == 0, nll, kl)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    return {"mse": mse, "vb": vb, "loss": mse + vb, "x0_hat": predict_x0(s, x_t, i, eps)}
