"""Dataset sources behind one interface (``ClassDataset``): Fashion-MNIST, digits, ImageNet subsets, image folders."""

from __future__ import annotations

import numbers
import os

from raydistill.data.base import ClassDataset, safe_class_name
from raydistill.data.digits import Digits
from raydistill.data.fashion_mnist import FashionMNIST
from raydistill.data.folder import ImageFolder
from raydistill.data.imagenet import ImageNetSubset
from raydistill.data.subsets import SUBSET_NAMES, subset_classes
from raydistill.errors import UserError

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "digits", *SUBSET_NAMES, "folder")
ALIASES: dict[str, str] = {"fmnist": "fashion-mnist"}


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    nclass: int | None = None,
    phase: int = 0,
    channels: int = 3,
    allow_other_split: bool = False,
) -> ClassDataset:
    """Open a dataset by name (see ``DATASET_NAMES``; alias "fmnist").

    Args:
        name: dataset name.
        root: data directory (Fashion-MNIST: IDX files, default /usr/share/datasets/fashion-mnist; ImageNet subsets
            and "folder": required, holding train/ and val/ or test/).
        image_size: output side length (default: native 28 / 8 for Fashion-MNIST / digits, 256 for folders).
        nclass, phase: ImageNet subsets only: take lines [nclass*phase, nclass*(phase+1)) of the class list.
        channels: "folder" only: 1 (grayscale) or 3 (RGB).
        allow_other_split: ImageNet subsets only: accept a tree that is not ImageNet's own images (counts checked
            by ``split_guard.check_imagenet_counts``), e.g. the fastai ImageWoof download.
    """
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in DATASET_NAMES:
        raise UserError(f"unknown dataset {name!r}", f"use one of {', '.join(DATASET_NAMES)} (alias: fmnist)")
    if key not in SUBSET_NAMES and (nclass is not None or phase != 0):
        raise UserError(
            f"nclass/phase apply only to ImageNet subsets, not {key}", "drop --nclass/--phase or use --classes"
        )
    if key != "folder" and channels != 3:
        raise UserError(f"channels can only be chosen for the folder dataset, not {key}", "drop --channels")
    if key == "fashion-mnist":
        return FashionMNIST(root, image_size=image_size)
    if key == "digits":
        if root is not None:
            raise UserError("the digits dataset ships with scikit-learn and takes no data root", "drop --data-root")
        return Digits(image_size=image_size)
    if key == "folder":
        return ImageFolder(root, image_size=image_size, channels=channels)
    return ImageNetSubset(root, key, image_size=image_size, nclass=nclass, phase=phase,
                          allow_other_split=allow_other_split)


def resolve_classes(ds: ClassDataset, classes: list[str | int] | None) -> list[int]:
    """Map user-given classes to subset labels, in the given order; None means all classes. A class named twice (also
    by name and label) is an error: the set would silently hold fewer classes than asked for.

    Each entry may be a subset label (int or digit string, 0..C-1), a class name (e.g. a wnid or 'ankle_boot'),
    or a human name (case-insensitive, e.g. 'Ankle boot'). Class names take precedence over digit strings.
    """
    if classes is None:
        return list(range(ds.num_classes))
    if isinstance(classes, (str, numbers.Integral)):
        classes = [classes]
    by_name = {n: i for i, n in enumerate(ds.class_names)}
    by_lower: dict[str, int] = {}
    for names in (ds.human_names, ds.class_names):
        for i, n in enumerate(names):
            by_lower.setdefault(n.lower(), i)
    examples = ", ".join(ds.class_names[:5]) + (", ..." if ds.num_classes > 5 else "")
    fix = f"use a label 0..{ds.num_classes - 1} or a class name of {ds.name} ({examples})"
    out: list[int] = []
    for c in classes:
        if isinstance(c, bool):
            raise UserError(f"class {c!r} is not a class name or label", fix)
        if isinstance(c, numbers.Integral):
            label = int(c)
        elif isinstance(c, str) and c in by_name:
            label = by_name[c]
        elif isinstance(c, str) and c.strip().isdigit():
            label = int(c.strip())
        elif isinstance(c, str) and c.strip().lower() in by_lower:
            label = by_lower[c.strip().lower()]
        else:
            raise UserError(f"unknown class {c!r} for {ds.name}", fix)
        if not 0 <= label < ds.num_classes:
            raise UserError(f"class label {label} is out of range for {ds.name} ({ds.num_classes} classes)", fix)
        if label in out:
            raise UserError(f"class {c!r} ({ds.class_names[label]}) is selected twice", "name every class once")
        out.append(label)
    if not out:
        raise UserError("no classes selected", fix)
    return out


__all__ = [
    "ALIASES",
    "DATASET_NAMES",
    "ClassDataset",
    "Digits",
    "FashionMNIST",
    "ImageFolder",
    "ImageNetSubset",
    "load_dataset",
    "resolve_classes",
    "safe_class_name",
    "subset_classes",
]
