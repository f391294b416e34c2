"""The one interface every dataset source implements: class metadata plus uint8 image loading.

Order guarantee (documented because IGD uses "the first 200 images of the class"): every dataset has a fixed
*natural order* per split. IDX/array datasets use record order in the file; folder datasets go class by class in
subset-label order and, inside a class, by file name sorted lexicographically (Python ``sorted`` on the name, so
``0.png, 1.png, 10.png, 11.png, ...``). ``load`` always returns a stable subsequence of that natural order, and
``limit`` keeps the first ``limit`` images of each class in it.
"""

from __future__ import annotations

import abc
import os
from pathlib import PureWindowsPath

import numpy as np
import torch

from raydistill.errors import UserError

SPLITS = ("train", "test")


def safe_class_name(name: str) -> str:
    """Return ``name`` if it is safe to use as one directory name; raise UserError otherwise.

    Rejected: non-strings, empty names, ``/``, ``\\``, ``..``, a leading ``.``, NUL or control characters, absolute
    paths or drive letters, and names longer than 255 bytes.
    """
    fix = "rename the class (directory) to a plain name such as 'cat' or 'n01440764'"
    if not isinstance(name, str):
        raise UserError(f"class name {name!r} is not a string", fix)
    if not name:
        raise UserError("empty class name", fix)
    if "\x00" in name or any(ord(ch) < 32 for ch in name):
        raise UserError(f"class name {name!r} contains a NUL or control character", fix)
    if "/" in name or "\\" in name:
        raise UserError(f"class name {name!r} contains a path separator", fix)
    if ".." in name:
        raise UserError(f"class name {name!r} contains '..'", fix)
    if name.startswith("."):
        raise UserError(f"class name {name!r} starts with '.' (hidden or relative name)", fix)
    if os.path.isabs(name) or PureWindowsPath(name).drive:
        raise UserError(f"class name {name!r} is an absolute path", fix)
    if len(name.encode("utf-8")) > 255:
        raise UserError(f"class name {name[:40]!r}... is longer than 255 bytes", fix)
    return name


def check_split(split: str) -> str:
    """Validate a split name ("train" or "test")."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    return split


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 [N,C,H,W] batch of square images to ``size`` x ``size`` (bilinear, antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if images.shape[0] == 0:
        return images.new_zeros((0, images.shape[1], size, size))
    out = torch.nn.functional.interpolate(
        images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


def check_image_size(image_size: int | None, default: int) -> int:
    """Validate an optional image size (a positive int), falling back to ``default``."""
    if image_size is None:
        return default
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image size {image_size!r} is not a positive integer", "pass e.g. --image-size 256")
    return image_size


class ClassDataset(abc.ABC):
    """A labelled image dataset with a train and a test split.

    Subclasses set the attributes in ``__init__`` and implement ``_labels`` and ``_read``.

    Attributes:
        name: dataset name (e.g. "fashion-mnist", "imagenette").
        class_names: one safe directory-name per subset label 0..C-1 (wnids for ImageNet subsets).
        dit_labels: the diffusion-model conditioning label per subset label (ImageNet-1K index for ImageNet
            subsets, identity otherwise).
        human_names: readable class names.
        channels: 1 (grayscale) or 3 (RGB).
        image_size: side length of the square images returned by ``load``.
    """

    name: str
    class_names: list[str]
    dit_labels: list[int]
    human_names: list[str]
    channels: int
    image_size: int

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    @abc.abstractmethod
    def _labels(self, split: str) -> np.ndarray:
        """Int64 subset label of every image of ``split`` in natural order."""

    @abc.abstractmethod
    def _read(self, split: str, indices: np.ndarray) -> torch.Tensor:
        """uint8 [len(indices), C, image_size, image_size] images at natural-order positions ``indices``."""

    def has_split(self, split: str) -> bool:
        """Whether ``split`` exists for this dataset (folders may lack a test split)."""
        check_split(split)
        return True

    def _check_label(self, label: int | None) -> None:
        if label is None:
            return
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_classes:
            raise UserError(
                f"class label {label!r} is out of range for {self.name} ({self.num_classes} classes)",
                f"use an integer in 0..{self.num_classes - 1}",
            )

    def indices(self, split: str, label: int | None = None, limit: int | None = None) -> np.ndarray:
        """Natural-order positions selected by ``label`` and ``limit`` (see ``load``)."""
        check_split(split)
        self._check_label(label)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
            raise UserError(f"limit {limit!r} is not a positive integer", "pass a per-class image count >= 1")
        labels = self._labels(split)
        if label is not None:
            idx = np.flatnonzero(labels == label)
            return idx[:limit] if limit is not None else idx
        if limit is None:
            return np.arange(len(labels), dtype=np.int64)
        # rank of every image inside its class, in natural order
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=self.num_classes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(len(labels), dtype=np.int64)
        rank[order] = np.arange(len(labels)) - starts[labels[order]]
        return np.flatnonzero(rank < limit)

    def num_images(self, split: str, label: int | None = None) -> int:
        """Number of images in ``split`` ("train" or "test"), optionally of one class."""
        check_split(split)
        self._check_label(label)
        labels = self._labels(split)
        return int(len(labels) if label is None else np.count_nonzero(labels == label))

    def load(self, split: str, label: int | None = None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Load images and labels of ``split``.

        Args:
            split: "train" or "test".
            label: keep only this subset label.
            limit: keep the first ``limit`` images of each class, in the dataset's natural order (module docstring).

        Returns:
            uint8 images [N, channels, image_size, image_size] and int64 subset labels [N], in natural order.
        """
        idx = self.indices(split, label, limit)
        labels = torch.from_numpy(self._labels(split)[idx].astype(np.int64))
        images = self._read(split, idx)
        return images, labels

    def read(self, split: str, positions: np.ndarray) -> torch.Tensor:
        """uint8 images at natural-order ``positions`` of ``split`` (as returned by :meth:`indices`)."""
        check_split(split)
        return self._read(split, np.asarray(positions, dtype=np.int64))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, channels={self.channels}, "
            f"image_size={self.image_size})"
        )


class ArrayDataset(ClassDataset):
    """A dataset held as in-memory uint8 arrays [N,H,W] or [N,C,H,W] per split, resized on load if needed."""

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of ``split``; subclasses override."""
        raise NotImplementedError

    def _labels(self, split: str) -> np.ndarray:
        return self._arrays(check_split(split))[1]

    def _read(self, split: str, indices: np.ndarray) -> torch.Tensor:
        images = self._arrays(split)[0][indices]  # fancy indexing copies (cached arrays stay read-only)
        if images.ndim == 3:
            images = images[:, None]
        out = torch.from_numpy(np.ascontiguousarray(images))
        if out.shape[-1] == self.image_size:
            return out
        # resize in chunks to bound the float32 memory
        chunk = max(1, int(2**26 // max(1, out.shape[1] * self.image_size**2 * 4)))
        parts = [resize_uint8(out[i : i + chunk], self.image_size) for i in range(0, len(out), chunk)]
        return torch.cat(parts) if parts else resize_uint8(out, self.image_size)


def center_crop_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """torchvision Resize(size) + CenterCrop(size) geometry: (resized (w, h), crop box (l, t, r, b))."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return (new_w, new_h), (left, top, left + size, top + size)


__all__ = [
    "SPLITS",
    "ArrayDataset",
    "ClassDataset",
    "center_crop_box",
    "check_image_size",
    "check_split",
    "resize_uint8",
    "safe_class_name",
]
