"""ImageNet subsets read from ImageNet-layout folders: ``root/train/<wnid>/*`` and ``root/val/<wnid>/*``.

Split "test" maps to ``val`` (50 images per class in ImageNet-1K). Subset labels follow the official list order
(``subsets.py``); ``dit_labels`` are the ImageNet-1K indices. Order and preprocessing: see ``folder.py``.
Opening a subset checks by file counts that the tree is ImageNet's own images (``split_guard.py``); pass
``allow_other_split=True`` for any other tree (a fastai download, a subsample).
"""

from __future__ import annotations

import os

from raydistill.data.base import check_image_size
from raydistill.data.folder import FolderDatasetBase, _check_root, _check_workers
from raydistill.data.split_guard import check_imagenet_counts
from raydistill.data.subsets import human_name, imagenet_index, subset_classes


class ImageNetSubset(FolderDatasetBase):
    """One ImageNet subset (imagenette, imagewoof, imageidc, imagenet-100, imagenet-1k), optionally one phase."""

    require_all_classes = True

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        subset: str = "imagenette",
        image_size: int | None = None,
        nclass: int | None = None,
        phase: int = 0,
        workers: int = 1,
        allow_other_split: bool = False,
    ) -> None:
        wnids = subset_classes(subset, nclass, phase)
        self.root = _check_root(root, subset)
        self.name = subset
        self.subset = subset
        self.nclass = nclass
        self.phase = phase
        self.class_names = wnids
        self.dit_labels = [imagenet_index(w) for w in wnids]
        self.human_names = [human_name(w) for w in wnids]
        self.channels = 3
        self.image_size = check_image_size(image_size, 256)
        self.workers = _check_workers(workers)
        val = self.root / "val"
        self.split_dirs = {"train": self.root / "train", "test": val if val.is_dir() else None}
        self._missing_fix = (
            f"use the original ImageNet-1K folders ({self.root}/train/<wnid>/ and {self.root}/val/<wnid>/; "
            "sort the flat val/ folder into per-wnid folders) or pass the right --data-root"
        )
        self._init_cache()
        self._check_class_dirs("train")  # fail early on missing class folders
        self.allow_other_split = allow_other_split
        if not allow_other_split:  # lists the files once (the index is cached for loading); decodes nothing
            train = [self.num_images("train", c) for c in range(self.num_classes)]
            val = [self.num_images("test", c) for c in range(self.num_classes)] if val.is_dir() else None
            check_imagenet_counts(subset, str(self.root), train, val)
