"""Evaluation of synthetic sets: train fresh nets on them under a published protocol and test on real data.

Plain torch (no Ray, no MLflow). Presets (``dc``, ``dsa``, ``idc``, ``igd``, ``rded``) are data in :mod:`.presets`;
batched augmentation is in :mod:`.augment`; one net's schedule is :mod:`.fit`, the nets of a set :mod:`.train`; the
soft-label (RDED) loop is :mod:`.soft_label` with its teacher in :mod:`.teacher`; DD-Ranking's scores are in
:mod:`.scores`. The other measures of a set or a generator: mode coverage (:mod:`.coverage`), class consistency
(:mod:`.consistency`), FID / precision / recall / density / coverage in a feature space (:mod:`.generator_metrics`,
with the small datasets' :mod:`.feature_net`).
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
