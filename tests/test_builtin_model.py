"""The shipped built-in Fashion-MNIST model: it loads, samples recognisable classes, and meets the quality bar."""

from __future__ import annotations

import json

import pytest
import torch

from raydistill.config import BUILTIN_MODEL, DistillConfig
from tests.conftest import needs_fmnist

pytestmark = [needs_fmnist, pytest.mark.skipif(not (BUILTIN_MODEL / "dit" / "config.json").exists(),
                                               reason="built-in model not present")]


@pytest.fixture(scope="module")
def generator():
    from raydistill.data import load_dataset
    from raydistill.generator import load_generator

    ds = load_dataset("fashion-mnist")
    return load_generator(DistillConfig(), ds.dit_labels, ds.image_size, device="cpu")


def test_shipped_files_and_provenance():
    info = json.loads((BUILTIN_MODEL / "pretrain.json").read_text())
    assert info["command"].startswith("raydistill pretrain")
    assert info["log"]
    from raydistill.models.dit import DIT_SIZES

    size = DIT_SIZES[info["config"]["dit_size"]]  # the registry entry it was trained as is the shipped architecture
    dit = json.loads((BUILTIN_MODEL / "dit" / "config.json").read_text())
    assert (dit["num_layers"], dit["num_attention_heads"] * dit["attention_head_dim"], dit["patch_size"]) == (
        size.depth, size.hidden, size.patch)
    for f in ("dit/config.json", "dit/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "classifier.safetensors"):
        assert (BUILTIN_MODEL / f).exists(), f


def test_builtin_samples_are_class_consistent_small(generator):
    """20 images (2 per class): a fixed-seed regression check of the bar measured in docs/BENCHMARKS.md."""
    from raydistill.evaluate.consistency import class_consistency, load_builtin_classifier

    res = class_consistency(generator, load_builtin_classifier(), 10, per_class=2, seed=0)
    assert res.images.shape == (20, 1, 28, 28) and res.images.dtype == torch.uint8
    assert res.overall >= 80.0, res.per_class


@pytest.mark.slow
def test_builtin_model_meets_85_percent_bar(generator):
    from raydistill.evaluate.consistency import class_consistency, load_builtin_classifier

    res = class_consistency(generator, load_builtin_classifier(), 10, per_class=100, seed=0)
    assert res.overall >= 85.0, res.per_class
