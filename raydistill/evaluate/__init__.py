"""Evaluation of synthetic sets: train fresh nets on them under a published protocol and test on real data.

Plain torch (no Ray, no MLflow). Presets (``dc``, ``dsa``, ``idc``, ``igd``) are data in :mod:`.presets`; batched
augmentation is in :mod:`.augment`; one net's schedule is :mod:`.fit`, the nets of a set :mod:`.train`. The other
measures of a set or a generator: mode coverage (:mod:`.coverage`) and class consistency (:mod:`.consistency`).
"""

from raydistill.evaluate.presets import EvalPreset, get_preset, ipc_epoch
from raydistill.evaluate.train import EvalResult, evaluate_synthetic

__all__ = [
    "EvalPreset",
    "EvalResult",
    "evaluate_synthetic",
    "get_preset",
    "ipc_epoch",
]
