"""Minimax diffusion (spec 1): a DiffFit fine-tune of the DiT with the minimax criteria, registered as the model
part ``minimax``. :mod:`.difffit` adds DiffFit's scale factors to a diffusers DiT, :mod:`.losses` holds the criteria,
:mod:`.finetune` the resumable fine-tune and :mod:`.router` loads a fine-tune and routes each class to its phase.
Sampling is plain DiT sampling from the fine-tuned EMA; guidance parts combine with it (``minimax+mgd3``,
``minimax-igd``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raydistill.errors import UserError
from raydistill.methods.registry import Method, value


def _path(key: str, v: Any) -> Any:
    if v is not None and not isinstance(v, str):
        raise UserError(f"{key} must be a path, got {v!r}", f"pass --set {key}=PATH")
    return v


@dataclass(frozen=True)
class MinimaxParams:
    finetune: str | None = value(None, "fine-tune folder from `raydistill finetune`, or an official Minimax .pt "
                                 "(default: the built-in model's fine-tune)", _path)


def _check(cfg, p: MinimaxParams, ds) -> None:
    from raydistill.methods.minimax.router import finetune_source

    finetune_source(cfg)  # a missing or unfinished fine-tune fails here, not in a Ray actor


def _load_model(cfg, dit_path, device) -> tuple:
    from raydistill.methods.minimax.router import load_minimax_dit

    return load_minimax_dit(cfg, dit_path, device)


def _terms(ctx, p: MinimaxParams) -> list:
    """No guidance term; checks that the fine-tune covers every selected class (phases route each class)."""
    router = getattr(ctx.generator, "router", None)
    if router is not None:
        router.check_covers([ctx.ds.dit_labels[c] for c in ctx.labels])
    return []


MINIMAX = Method(
    name="minimax", kind="model", summary="sampling from a DiffFit fine-tune with the minimax criteria (spec 1)",
    params=MinimaxParams, terms=_terms, check=_check, load_model=_load_model)
