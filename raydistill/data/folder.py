"""Image folders: a shared base for ImageNet-layout subsets, and ``ImageFolder`` for a user's own classes.

Layout: ``root/train/<class>/<image files>`` and ``root/test/<class>/...`` (``root/val/<class>/...`` is accepted
for the test split). Only regular, non-hidden files directly inside a class folder with an image extension count.
Natural order: class by class in subset-label order, files sorted by name (lexicographic).
Images are decoded with PIL, converted to RGB (or L) and transformed like torchvision ``Resize(S)`` +
``CenterCrop(S)`` (bilinear, shorter side to S), the test transform of IDC and IGD.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raydistill.data.base import ClassDataset, center_crop_box, check_image_size, check_split, safe_class_name
from raydistill.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})


def list_images(directory: Path) -> list[str]:
    """Sorted names of the image files directly inside ``directory`` (hidden files and sub-folders skipped)."""
    names = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                names.append(entry.name)
    names.sort()
    return names


def decode_image(path: str | os.PathLike[str], size: int, channels: int = 3) -> np.ndarray:
    """Decode one image file to uint8 [channels, size, size] (Resize(size) + CenterCrop(size)); UserError if bad."""
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(path) as img:
            img = img.convert(mode)  # forces a full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}", "delete or replace the corrupt file") from None
    if img.width < 1 or img.height < 1:
        raise UserError(f"image {path} is empty ({img.width}x{img.height})", "delete or replace the file")
    (new_w, new_h), box = center_crop_box(img.width, img.height, size)
    if (new_w, new_h) != (img.width, img.height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    arr = np.asarray(img.crop(box), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class FolderDatasetBase(ClassDataset):
    """Images stored as files in per-class folders; subclasses set the metadata and ``split_dirs``."""

    root: Path
    split_dirs: dict[str, Path | None]
    require_all_classes: bool = True
    workers: int = 1
    _missing_fix: str = "create the folder or choose other classes"

    def _init_cache(self) -> None:
        self._index_cache: dict[str, tuple[list[str], np.ndarray]] = {}

    def has_split(self, split: str) -> bool:
        return self.split_dirs.get(check_split(split)) is not None

    def _split_dir(self, split: str) -> Path:
        directory = self.split_dirs.get(check_split(split))
        if directory is None or not directory.is_dir():
            raise UserError(
                f"{self.name}: no {split} split under {self.root}",
                f"create {self.root / split}/<class>/<images>" + (" (or val/)" if split == "test" else ""),
            )
        return directory

    def _check_class_dirs(self, split: str) -> Path:
        """The split folder; UserError if classes lack a folder there and ``require_all_classes`` is set."""
        directory = self._split_dir(split)
        if self.require_all_classes:
            missing = [c for c in self.class_names if not (directory / c).is_dir()]
            if missing:
                raise UserError(
                    f"{len(missing)} of {self.num_classes} {self.name} classes have no folder under {directory} "
                    f"(first: {missing[0]})",
                    self._missing_fix,
                )
        return directory

    def _index(self, split: str) -> tuple[list[str], np.ndarray]:
        """(file paths, labels) of ``split`` in natural order, listed once and cached."""
        if split in self._index_cache:
            return self._index_cache[split]
        directory = self._check_class_dirs(split)
        paths: list[str] = []
        labels: list[np.ndarray] = []
        for label, cls in enumerate(self.class_names):
            class_dir = directory / cls
            names = list_images(class_dir) if class_dir.is_dir() else []
            if not names and split == "train":
                raise UserError(
                    f"{self.name}: class folder {class_dir} holds no images",
                    f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the class",
                )
            paths.extend(str(class_dir / n) for n in names)
            labels.append(np.full(len(names), label, dtype=np.int64))
        result = (paths, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))
        self._index_cache[split] = result
        return result

    def _labels(self, split: str) -> np.ndarray:
        return self._index(split)[1]

    def paths(self, split: str, label: int | None = None, limit: int | None = None) -> list[Path]:
        """File paths of the images ``load`` would return, in the same order."""
        idx = self.indices(split, label, limit)
        files = self._index(split)[0]
        return [Path(files[i]) for i in idx]

    def _read(self, split: str, indices: np.ndarray) -> torch.Tensor:
        files = self._index(split)[0]
        out = np.empty((len(indices), self.channels, self.image_size, self.image_size), dtype=np.uint8)

        def work(k: int) -> None:
            out[k] = decode_image(files[indices[k]], self.image_size, self.channels)

        if self.workers > 1 and len(indices) > 1:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                list(pool.map(work, range(len(indices))))
        else:
            for k in range(len(indices)):
                work(k)
        return torch.from_numpy(out)


def _check_root(root: str | os.PathLike[str] | None, what: str) -> Path:
    if root is None:
        raise UserError(f"{what} needs a data root", "pass --data-root <dir containing train/ and val/ or test/>")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(
            f"{what} data root {path} is not a directory", "pass --data-root pointing to an existing folder"
        )
    if not (path / "train").is_dir():
        raise UserError(
            f"{what} data root {path} has no train/ folder",
            f"arrange images as {path}/train/<class>/<image> and {path}/val/<class>/<image>",
        )
    return path


def _check_workers(workers: int) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers {workers!r} is not a positive integer", "pass workers >= 1")
    return workers


class ImageFolder(FolderDatasetBase):
    """A user's own classes: ``root/train/<class>/*`` and optionally ``root/test/<class>/*`` (or ``val``).

    Classes are the non-hidden sub-folders of ``root/train``, sorted by name and checked with ``safe_class_name``.
    A class may be absent from the test split (it then has no test images).
    """

    require_all_classes = False

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        image_size: int | None = None,
        channels: int = 3,
        workers: int = 1,
        name: str = "folder",
    ) -> None:
        self.root = _check_root(root, "folder dataset")
        if channels not in (1, 3):
            raise UserError(f"channels {channels!r} is not supported", "use channels=1 (grayscale) or 3 (RGB)")
        train = self.root / "train"
        classes = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise UserError(f"{train} holds no class folders", f"arrange images as {train}/<class>/<image>")
        for cls in classes:
            safe_class_name(cls)
        test = next((self.root / d for d in ("test", "val") if (self.root / d).is_dir()), None)
        if test is not None:
            extra = sorted(
                e.name for e in os.scandir(test) if e.is_dir() and not e.name.startswith(".") and e.name not in classes
            )
            if extra:
                raise UserError(
                    f"{test} has {len(extra)} class folder(s) missing from {train} (first: {extra[0]})",
                    "use the same class folder names in train and test",
                )
        self.name = name
        self.class_names = classes
        self.human_names = list(classes)
        self.dit_labels = list(range(len(classes)))
        self.channels = channels
        self.image_size = check_image_size(image_size, 256)
        self.split_dirs = {"train": train, "test": test}
        self.workers = _check_workers(workers)
        self._init_cache()
