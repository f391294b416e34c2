"""Is an ImageNet-layout tree ImageNet's own images? A cheap guard by file counts (issue 24, item 2).

The published subset results (methods spec section 0.3) train on the ImageNet-1K train images of the subset's
classes (732-1,300 per class; 1,300 for nearly every class) and test on ImageNet's val images (exactly 50 per class).
The fastai ImageNette / ImageWoof downloads (``imagenette2``, ``imagewoof2`` and their -160/-320 variants) use the
same ``train/<wnid>`` and ``val/<wnid>`` folder names but hold about 900 train and 390 val images per class, and give
lower accuracies (MinimaxDiffusion issue 4: use the ImageNet classes). The guard counts files (it decodes nothing)
and refuses any other tree unless the user passes ``--allow-other-split``, which the run records in MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence

from raydistill.errors import UserError

IMAGENET_TRAIN_RANGE = (732, 1300)  # fewest and most train images of an ImageNet-1K class
IMAGENET_VAL_PER_CLASS = 50
FASTAI_VAL_RANGE = (300, 500)  # imagenette2 / imagewoof2: about 390 val images per class


def _span(counts: Sequence[int]) -> str:
    lo, hi = min(counts), max(counts)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def check_imagenet_counts(subset: str, root: str, train: Sequence[int], val: Sequence[int] | None) -> None:
    """Raise one UserError unless every class has an ImageNet train count and exactly 50 val images.

    Args:
        subset: subset name (for the message).
        root: the data root (for the message).
        train: train images per selected class.
        val: val images per selected class, or None when the tree has no ``val/`` folder.
    """
    lo, hi = IMAGENET_TRAIN_RANGE
    ok_train = all(lo <= n <= hi for n in train)
    ok_val = val is not None and all(n == IMAGENET_VAL_PER_CLASS for n in val)
    if ok_train and ok_val:
        return
    n = len(train)
    found = f"{sum(train)} train ({_span(train)} per class)"
    found += " and no val/ folder" if val is None else f" and {sum(val)} val ({_span(val)} per class)"
    fastai = val is not None and FASTAI_VAL_RANGE[0] <= sorted(val)[len(val) // 2] <= FASTAI_VAL_RANGE[1]
    what = ("; this is the fastai imagenette2/imagewoof2 layout (about 900 train and 390 val per class), which gives "
            "lower accuracies than ImageNet's own images" if fastai else "")
    raise UserError(
        f"{subset} at {root} is not ImageNet's own images: {found} images in {n} classes, where ImageNet has "
        f"{lo}-{hi} train and exactly {IMAGENET_VAL_PER_CLASS} val per class{what}",
        "point --data-root at the ImageNet-1K folders (train/<wnid>/, val/<wnid>/ sorted by class), or pass "
        "--allow-other-split to proceed knowingly (recorded in MLflow)",
    )
