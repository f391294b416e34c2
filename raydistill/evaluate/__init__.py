"""Evaluation of synthetic sets: train fresh nets on them under a published protocol and test on real data.

Plain torch (no Ray, no MLflow). Presets (``dc``, ``dsa``, ``idc``, ``igd``, ``rded``) are data in :mod:`.presets`;
batched augmentation is in :mod:`.augment`; the hard-label training loop is in :mod:`.train`, the soft-label (RDED)
one in :mod:`.soft_label` with its teacher in :mod:`.teacher`; DD-Ranking's scores are in :mod:`.scores`.
"""

from raydistill.evaluate.presets import EvalPreset, get_preset, ipc_epoch
from raydistill.evaluate.train import EvalResult, evaluate_synthetic, evaluate_synthetic_dataloader

__all__ = [
    "EvalPreset",
    "EvalResult",
    "evaluate_synthetic",
    "evaluate_synthetic_dataloader",
    "get_preset",
    "ipc_epoch",
]
