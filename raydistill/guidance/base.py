"""The one interface through which guidance terms plug into every sampler step.

A term sees a :class:`StepContext` and returns a tensor added to the step's mean (DDPM: before the noise is added,
which is the same as adding it to ``x_{t-1}``; DDIM: to the deterministic update). Terms that need gradients
through the model (IGD's influence term) ask for them with ``needs_grad(i)``: the sampler then runs the denoiser
with ``x_t.requires_grad_()`` so ``ctx.x0_hat`` carries the graph from ``ctx.x_t``.
Stateful terms (IGD's deviation memory) learn about finished images through ``on_images_done``. A term with the
attribute ``uses_twin = True`` gets ``ctx.x0_hat_twin``, the x0_hat of each image's unconditional CFG twin (IGD as
released; :mod:`raydistill.diffusion.sampler`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class StepContext:
    """What a guidance term can see at respaced index ``i`` (49..0 for the 50-step chain). Tensors are [B, ...]."""

    i: int
    x_t: torch.Tensor  # [B, C, h, w] current latent (a leaf with grad when a term needs it)
    eps: torch.Tensor  # CFG-combined noise prediction
    x0_hat: torch.Tensor  # predicted clean latent from eps
    mean: torch.Tensor  # unguided posterior mean
    log_variance: torch.Tensor  # learned-range log variance (element-wise)
    alpha_bar: torch.Tensor  # [B, 1, 1, 1] respaced abar_i
    dit_labels: torch.Tensor  # [B] labels given to the model
    class_labels: torch.Tensor  # [B] subset labels 0..C-1 (keys of per-class state)
    image_indices: torch.Tensor  # [B] index k of each image within its class
    sampler: str  # "ddpm" or "ddim"
    alpha_bar_prev: torch.Tensor | None = None  # [B, 1, 1, 1] respaced abar_{i-1} (1 at i = 0); DDIM terms need it
    x0_hat_twin: torch.Tensor | None = None  # the unconditional twin's x0_hat, when a term ``uses_twin`` (sampler.py)

    @property
    def sigma(self) -> torch.Tensor:
        return torch.exp(0.5 * self.log_variance)


@runtime_checkable
class GuidanceTerm(Protocol):
    name: str

    def active(self, i: int) -> bool:
        """Whether the term acts at respaced index ``i``."""

    def needs_grad(self, i: int) -> bool:
        """Whether the term needs ``ctx.x0_hat`` differentiable w.r.t. ``ctx.x_t`` at index ``i``."""

    def delta(self, ctx: StepContext) -> torch.Tensor:
        """The term's addition to the step mean, [B, C, h, w]."""

    def on_images_done(self, latents: torch.Tensor, class_labels: torch.Tensor, image_indices: torch.Tensor) -> None:
        """Called with the final latents x_0 of a finished batch (for memories)."""


class StatelessTerm:
    """Convenience base: no gradient, no memory. Subclasses set ``name`` and implement ``active``/``delta``."""

    name = "term"

    def needs_grad(self, i: int) -> bool:
        return False

    def on_images_done(self, latents, class_labels, image_indices) -> None:
        return None


class LazyClassMap(Mapping):
    """A read-only ``{class label: tensor}`` that computes (or loads) a class's entry on first access: MGD3's modes,
    IGD's class-mean real gradients. Lets a worker that serves shards of a few classes compute only theirs."""

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
