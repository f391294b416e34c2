"""MGD3, mode-guided dataset distillation (spec 3): per-class mode discovery in the VAE latent space
(:mod:`.modes`, a file cache) and the mode-guidance term (:mod:`.guidance`), registered as the guidance part ``mgd3``.
Its modes are discovered before sampling (``precompute``: one Ray task per class)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raydistill.errors import UserError
from raydistill.methods.mgd3.modes import MODE_METHODS
from raydistill.methods.registry import Method, choice, flag, integer, number, value


def _path(key: str, v: Any) -> Any:
    if v is not None and not isinstance(v, str):
        raise UserError(f"{key} must be a path, got {v!r}", f"pass --set {key}=PATH")
    return v


@dataclass(frozen=True)
class Mgd3Params:
    mode_scale: float = number(0.1, "mode guidance weight (the paper: 0.1)")
    t_stop: int = integer(25, "guidance acts at respaced steps i > t_stop (the paper: 25; -1: every step)", low=-1)
    mode_method: str = choice("kmeans", "mode discovery: kmeans (the paper) or gmm (diagonal)", MODE_METHODS)
    mode_snap: bool = flag(False, "snap every mode to its nearest real latent")
    modes_cache: str | None = value(None, "mode cache folder (default <out>/../.modes)", _path)

    def validate(self, cfg) -> None:
        if self.t_stop > cfg.steps - 2:
            raise UserError(f"t_stop must be an integer in -1..{cfg.steps - 2} for {cfg.steps} steps (guidance acts "
                            f"while i > t_stop), got {self.t_stop}",
                            "the paper uses 25 of 50 steps; -1 guides every step")


def _check(cfg, p: Mgd3Params, ds) -> None:
    from raydistill.distill import selected_labels
    from raydistill.methods.mgd3.guidance import _check_counts

    _check_counts(cfg, ds, selected_labels(cfg, ds))


def _terms(ctx, p: Mgd3Params) -> list:
    from raydistill.methods.mgd3.guidance import mode_guidance

    return [mode_guidance(ctx, p)]


MGD3 = Method(
    name="mgd3", kind="guidance", summary="mode guidance toward per-class k-means modes of the VAE latents (spec 3)",
    params=Mgd3Params, terms=_terms, check=_check, precompute=("modes",))
