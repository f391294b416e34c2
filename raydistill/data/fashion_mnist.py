"""Fashion-MNIST from the four IDX files (gzip or plain), parsed with numpy and cached in memory."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from raydistill.data.base import ArrayDataset, check_image_size, check_split
from raydistill.errors import UserError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
HUMAN_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_INSTALL_FIX = (
    "install it with `apt-get install dataset-fashion-mnist` or pass --data-root <dir with the four IDX files>"
)
# IDX magic: two zero bytes, a type byte (0x08 = uint8) and the number of dimensions.
_MAGIC = {1: 0x00000801, 3: 0x00000803}


def _find_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise UserError(f"Fashion-MNIST file {root / (stem + '.gz')} not found", _INSTALL_FIX)


def parse_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Parse one uint8 IDX file (``.gz`` or plain) with ``ndim`` dimensions; UserError naming the file if corrupt."""
    path = Path(path)
    fix = "the file is corrupt or truncated: reinstall dataset-fashion-mnist or pass --data-root"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read Fashion-MNIST file {path}: {exc}", fix) from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"Fashion-MNIST file {path} is too short for an IDX header ({len(raw)} bytes)", fix)
    magic = int.from_bytes(raw[:4], "big")
    if magic != _MAGIC[ndim]:
        raise UserError(f"Fashion-MNIST file {path} has IDX magic {magic:#010x}, expected {_MAGIC[ndim]:#010x}", fix)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise UserError(f"Fashion-MNIST file {path} has {len(raw)} bytes, expected {expected} for shape {dims}", fix)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_split_cached(images_path: str, labels_path: str, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images = parse_idx(images_path, 3)
    labels = parse_idx(labels_path, 1)
    fix = f"the Fashion-MNIST files are inconsistent; {_INSTALL_FIX}"
    if images.shape[1:] != (28, 28):
        raise UserError(f"Fashion-MNIST file {images_path} holds {images.shape[1:]} images, expected 28x28", fix)
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels", fix)
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise UserError(f"Fashion-MNIST file {labels_path} holds label {labels.max()}, expected 0..9", fix)
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_split_arrays(root: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only uint8 images [N,28,28] and int64 labels [N] of one split, cached by path, mtime and size."""
    check_split(split)
    root = Path(root)
    paths = [_find_file(root, stem) for stem in FILES[split]]
    stamp = tuple((st.st_mtime_ns, st.st_size) for st in (p.stat() for p in paths))
    return _load_split_cached(str(paths[0].resolve()), str(paths[1].resolve()), stamp)


class FashionMNIST(ArrayDataset):
    """Fashion-MNIST: 10 classes, 60000 train / 10000 test 28x28 grayscale images; natural order = IDX order."""

    def __init__(self, root: str | os.PathLike[str] | None = None, image_size: int | None = None) -> None:
        self.root = Path(root if root is not None else DEFAULT_ROOT)
        if not self.root.is_dir():
            raise UserError(f"Fashion-MNIST directory {self.root} not found", _INSTALL_FIX)
        for stems in FILES.values():
            for stem in stems:
                _find_file(self.root, stem)
        self.name = "fashion-mnist"
        self.class_names = list(CLASS_NAMES)
        self.human_names = list(HUMAN_NAMES)
        self.dit_labels = list(range(len(CLASS_NAMES)))
        self.channels = 1
        self.image_size = check_image_size(image_size, 28)

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return load_split_arrays(self.root, split)
