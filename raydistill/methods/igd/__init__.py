"""IGD, influence-guided diffusion (spec 2): a surrogate trajectory (:mod:`.surrogate`) and two guidance terms
(:mod:`.guidance`: influence and deviation), registered as the guidance part ``igd``.

Combined after a model part it is written ``<model>-igd`` (the paper's Minimax-IGD: ``minimax-igd``), and its
default weights then come from that model's row of the presets (spec 2.3). The deviation memory is per class and
sequential, so a class's images stay in one shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydistill.errors import UserError
from raydistill.methods.igd.guidance import DEFAULT_WINDOW, IMPLS, TWIN_MODES, check_window, twin_on
from raydistill.methods.registry import Method, choice, integer, number, value


def _epochs(key: str, v: Any) -> Any:
    if v in ("similarity", "preset") or (isinstance(v, (list, tuple)) and v and
                                         all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in v)):
        return list(v) if isinstance(v, (list, tuple)) else v
    raise UserError(f"{key} must be a list of epochs, 'similarity' or 'preset', got {v!r}",
                    "e.g. igd_epochs: [0, 2, 5]")


def _path(key: str, v: Any) -> Any:
    if v is not None and not isinstance(v, str):
        raise UserError(f"{key} must be a path, got {v!r}", f"pass --set {key}=PATH")
    return v


@dataclass(frozen=True)
class IgdParams:
    surrogate: str | None = value(None, "surrogate trajectory folder (`raydistill surrogate`); default: the built-in "
                                  "one, for Fashion-MNIST with the built-in model", _path)
    igd_epochs: Any = value("similarity", "surrogate checkpoints: a list of epochs, 'similarity' (the trajectory's "
                            "selection.json) or 'preset' (spec 2.1's lists)", _epochs)
    igd_scale: float | None = number(None, "influence weight k (default: the spec 2.3 preset of the dataset and IPC)")
    igd_gamma: float | None = number(None, "deviation weight gamma (default: the spec 2.3 preset)")
    igd_window: tuple[int, int] = value(DEFAULT_WINDOW, "respaced steps [low, high] where both terms act",
                                        lambda key, v: check_window(v))
    igd_grad_ipc: int = integer(200, "real images per class for the class-mean gradients", low=1)
    igd_memory: int = integer(64, "deviation memory: the class's last N final latents", low=1)
    igd_impl: str = choice("fast", "fast (batched, one backward per step) or reference (batch 1, as released)", IMPLS)
    igd_twin: str = choice("auto", "decode each image's unconditional CFG twin too, carried through the chain with "
                           "its own noise (as released, spec 2.2): auto = on with reference, off with fast; on; off",
                           TWIN_MODES)
    igd_refresh: int = integer(1, "compute the influence gradient every N window steps (1: exact; more: approximate, "
                               "cheaper)", low=1)
    igd_cache: str | None = value(None, "real-gradient cache folder (default <out>/../.igd)", _path)

    def validate(self, cfg) -> None:
        if self.igd_window[0] > cfg.steps - 1:
            raise UserError(f"IGD's window {list(self.igd_window)} lies outside the respaced steps 0..{cfg.steps - 1}",
                            "sample with 50 steps, or pass --set igd_window=[low,high] within the steps")
        if twin_on(self) and cfg.sampler != "ddpm":
            raise UserError(f"IGD's unconditional twin (igd_twin, on with igd_impl reference) needs the ddpm sampler, "
                            f"not {cfg.sampler}", "pass --sampler ddpm, or --set igd_twin=off")


def _check(cfg, p: IgdParams, ds) -> None:
    """Fail before Ray when the surrogate is missing or was trained on other data."""
    from raydistill.methods.igd.guidance import trajectory_path
    from raydistill.methods.igd.surrogate import Trajectory

    if p.surrogate is not None and not Path(p.surrogate).is_dir():
        raise UserError(f"surrogate trajectory not found: {p.surrogate}",
                        "train one with `raydistill surrogate --out PATH` and pass --set surrogate=PATH")
    Trajectory(trajectory_path(cfg, ds, p)).check_dataset(ds)


def _terms(ctx, p: IgdParams) -> list:
    from raydistill.methods.igd.guidance import igd_terms

    return igd_terms(ctx, p)


IGD = Method(
    name="igd", kind="guidance", summary="influence + deviation guidance from a surrogate trajectory (spec 2)",
    params=IgdParams, terms=_terms, check=_check, whole_class=True, joins="-",
    batch_limit=lambda p: 1 if p.igd_impl == "reference" else None)
