"""The DiT/ADM Gaussian diffusion schedule and its respacing, as pure functions of the beta schedule.

Spec 0.1-0.2: linear betas 1e-4 -> 0.02 over 1000 steps, respaced to 50 steps with ``space_timesteps(1000, "50")``
(ADM's ``SpacedDiffusion``): the respaced chain keeps the original timesteps ``round(i * 999 / 49)`` and recomputes
its betas as ``1 - abar[t_i] / abar[t_{i-1}]``. Every threshold in IGD (window 30..45) and MGD3 (t_stop 25) is an
index ``i`` of this 0..49 chain. All arrays are float64 numpy, as in ADM, and are cast per use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DiT's "linear" schedule, scaled to 1000 steps (ADM ``get_named_beta_schedule``)."""
    scale = 1000 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """ADM's ``space_timesteps(num_timesteps, str(count))`` for one section: evenly strided, rounded."""
    if count < 1 or count > num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} steps to {count}")
    if count == 1:
        return [0]
    stride = (num_timesteps - 1) / (count - 1)
    taken, cur = [], 0.0
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class Schedule:
    """A (possibly respaced) diffusion chain; index ``i`` runs 0..len-1, ``timestep_map[i]`` is the model's t."""

    betas: np.ndarray
    timestep_map: np.ndarray
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        b = self.betas
        abar = np.cumprod(1.0 - b)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # ADM: the log is clipped because the posterior variance is 0 at the start of the chain.
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b)
        set_ = object.__setattr__
        set_(self, "alphas_cumprod", abar)
        set_(self, "alphas_cumprod_prev", abar_prev)
        set_(self, "posterior_variance", post_var)
        set_(self, "posterior_log_variance_clipped", post_log_var)
        set_(self, "posterior_mean_coef1", b * np.sqrt(abar_prev) / (1.0 - abar))
        set_(self, "posterior_mean_coef2", (1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar))

    def __len__(self) -> int:
        return len(self.betas)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, respace: int | None = 50) -> Schedule:
        """The linear schedule, respaced to ``respace`` steps (None keeps all ``num_timesteps``)."""
        betas = linear_betas(num_timesteps)
        if respace is None or respace == num_timesteps:
            return cls(betas, np.arange(num_timesteps))
        keep = space_timesteps(num_timesteps, respace)
        abar = np.cumprod(1.0 - betas)
        new_betas, last = [], 1.0
        for t in keep:
            new_betas.append(1.0 - abar[t] / last)
            last = abar[t]
        return cls(np.asarray(new_betas, dtype=np.float64), np.asarray(keep))

    def at(self, name: str, i: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``getattr(self, name)[i]`` as a tensor broadcastable against ``like`` ([B, C, H, W])."""
        arr = getattr(self, name)
        idx = torch.as_tensor(i, device="cpu").long().reshape(-1)
        vals = torch.from_numpy(arr)[idx].to(device=like.device, dtype=like.dtype)
        return vals.reshape(-1, *([1] * (like.dim() - 1)))
