"""scikit-learn's offline ``load_digits``: 1797 8x8 grayscale digits, split deterministically."""

from __future__ import annotations

import functools

import numpy as np

from raydistill.data.base import ArrayDataset, check_image_size, check_split

NUM_TRAIN = 1500  # the first 1500 records are "train", the remaining 297 "test"


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # values are 0..16; map to 0..255
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class Digits(ArrayDataset):
    """8x8 handwritten digits (classes "0".."9"); train = records [0, 1500), test = [1500, 1797)."""

    def __init__(self, image_size: int | None = None) -> None:
        self.name = "digits"
        self.class_names = [str(i) for i in range(10)]
        self.human_names = list(self.class_names)
        self.dit_labels = list(range(10))
        self.channels = 1
        self.image_size = check_image_size(image_size, 8)

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = _digits_arrays()
        sl = slice(0, NUM_TRAIN) if check_split(split) == "train" else slice(NUM_TRAIN, None)
        return images[sl], labels[sl]
