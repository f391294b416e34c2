"""ImageNet-1K class list and the subsets used by Minimax, IGD and MGD^3 (methods spec §0.3, §0.3b).

``imagenet_synsets.txt`` (the 1000 ImageNet-1K wnids in sorted order; line index = DiT label) and
``imagenet_lemmas.txt`` (``wnid<TAB>lemma`` for those 1000 wnids, filtered from ``imagenet_synset_to_lemma.txt``)
come from timm 1.0.31 (``timm/data/_info/``), Copyright Ross Wightman, Apache License 2.0
(https://github.com/huggingface/pytorch-image-models). timm is not a dependency.
"""

from __future__ import annotations

import functools
from importlib import resources

from raydistill.errors import UserError

# misc/class_nette.txt, in file order.
IMAGENETTE_WNIDS: tuple[str, ...] = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)  # fmt: skip
# misc/class_woof.txt, in file order (not sorted: see the MGD^3 caveat in spec §0.3).
IMAGEWOOF_WNIDS: tuple[str, ...] = (
    "n02096294", "n02093754", "n02111889", "n02088364", "n02086240",
    "n02089973", "n02087394", "n02115641", "n02099601", "n02105641",
)  # fmt: skip
# misc/class100.txt (IDC's 100-class list) as ImageNet-1K indices, in file order.
IMAGENET100_INDICES: tuple[int, ...] = (
    452, 64, 374, 236, 993, 176, 882, 904, 503, 74, 57, 959, 953, 508, 872, 228, 122, 421, 599, 858,
    157, 449, 994, 608, 151, 209, 15, 876, 246, 766, 455, 857, 131, 119, 234, 90, 45, 936, 479, 272,
    665, 653, 659, 158, 960, 765, 908, 703, 407, 560, 317, 938, 724, 748, 331, 619, 120, 267, 155, 708,
    368, 772, 167, 494, 180, 431, 342, 854, 305, 54, 268, 667, 166, 277, 662, 798, 313, 498, 299, 222,
    682, 593, 775, 674, 592, 137, 758, 717, 606, 281, 796, 211, 620, 830, 544, 275, 242, 570, 99, 169,
)  # fmt: skip

SUBSET_NAMES: tuple[str, ...] = ("imagenette", "imagewoof", "imageidc", "imagenet-100", "imagenet-1k")


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1K wnids in sorted order; the position is the DiT class label."""
    text = resources.files("raydistill.data").joinpath("imagenet_synsets.txt").read_text(encoding="utf-8")
    wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise RuntimeError("raydistill/data/imagenet_synsets.txt is damaged: expected 1000 sorted wnids")
    return wnids


@functools.lru_cache(maxsize=1)
def imagenet_lemmas() -> dict[str, str]:
    """wnid -> WordNet lemma string (e.g. 'tench, Tinca tinca') for the 1000 ImageNet-1K classes."""
    text = resources.files("raydistill.data").joinpath("imagenet_lemmas.txt").read_text(encoding="utf-8")
    pairs = (line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    return {wnid.strip(): lemma.strip() for wnid, lemma in pairs}


@functools.lru_cache(maxsize=1)
def _wnid_to_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


def imagenet_index(wnid: str) -> int:
    """ImageNet-1K index (= DiT label) of ``wnid``."""
    try:
        return _wnid_to_index()[wnid]
    except KeyError:
        raise UserError(f"{wnid!r} is not an ImageNet-1K wnid", "use a wnid such as n01440764") from None


def human_name(wnid: str) -> str:
    """Short readable name of an ImageNet-1K class: the first lemma (e.g. 'tench')."""
    return imagenet_lemmas().get(wnid, wnid).split(",")[0].strip()


def subset_wnids(subset: str) -> list[str]:
    """All wnids of ``subset`` in the official list order (the order defines the subset labels)."""
    wnids = imagenet_wnids()
    if subset == "imagenette":
        return list(IMAGENETTE_WNIDS)
    if subset == "imagewoof":
        return list(IMAGEWOOF_WNIDS)
    if subset == "imagenet-100":
        return [wnids[i] for i in IMAGENET100_INDICES]
    if subset == "imageidc":
        return [wnids[i] for i in IMAGENET100_INDICES[:10]]
    if subset == "imagenet-1k":
        return list(wnids)
    raise UserError(f"unknown ImageNet subset {subset!r}", f"use one of {', '.join(SUBSET_NAMES)}")


def subset_classes(subset: str, nclass: int | None = None, phase: int = 0) -> list[str]:
    """wnids of lines [nclass*phase, nclass*(phase+1)) of the subset list (spec §0.3b); all lines if nclass is None.

    The last phase may be shorter than ``nclass`` when ``nclass`` does not divide the list length.
    """
    wnids = subset_wnids(subset)
    if isinstance(phase, bool) or not isinstance(phase, int) or phase < 0:
        raise UserError(f"phase {phase!r} is not a non-negative integer", "pass --phase 0, 1, 2, ...")
    if nclass is None:
        if phase != 0:
            raise UserError(f"phase {phase} given without nclass", "pass --nclass N together with --phase")
        return wnids
    if isinstance(nclass, bool) or not isinstance(nclass, int) or nclass < 1:
        raise UserError(f"nclass {nclass!r} is not a positive integer", f"pass --nclass 1..{len(wnids)}")
    start = nclass * phase
    if start >= len(wnids):
        last = (len(wnids) - 1) // nclass
        raise UserError(
            f"phase {phase} with nclass {nclass} starts at line {start}, past the {len(wnids)} classes of {subset}",
            f"use --phase 0..{last}",
        )
    return wnids[start : start + nclass]
