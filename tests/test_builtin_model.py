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


def test_retrained_builtin_weights_do_not_resume_an_old_set(tmp_path, monkeypatch):
    """A set's fingerprint names the built-in weights that made it: after `raydistill pretrain` replaces them, a
    rerun into the old folder is one clear error instead of keeping the old model's images."""
    import shutil

    import raydistill.config as config
    from raydistill.errors import UserError
    from raydistill.outputs import DistilledSetWriter

    root = tmp_path / "fmnist"
    for f in config.BUILTIN_WEIGHTS:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BUILTIN_MODEL / f, root / f)
    monkeypatch.setattr(config, "BUILTIN_MODEL", root)
    cfg = DistillConfig(out=str(tmp_path / "set"))
    before = cfg.generation_key()
    assert before["builtin_weights"] == config.builtin_weights_id(root)
    assert DistillConfig(model="/m/dit", vae="/m/vae").generation_key().get("builtin_weights") is None
    assert "builtin_weights" not in DistillConfig(method="random").generation_key()  # chosen without the model
    assert DistillConfig(method="herding").generation_key()["builtin_weights"] == before["builtin_weights"]  # VAE
    DistilledSetWriter(cfg.out, ["a"], cfg.fingerprint(), before)  # the old model's set is started
    DistilledSetWriter(cfg.out, ["a"], cfg.fingerprint(), before)  # the same weights resume it (no error)
    dit = root / config.BUILTIN_WEIGHTS[0]
    data = bytearray(dit.read_bytes())
    data[-1] ^= 1  # retrained weights
    dit.write_bytes(bytes(data))
    assert cfg.generation_key()["builtin_weights"] != before["builtin_weights"]
    with pytest.raises(UserError, match=r"made with other settings \(by an earlier version of the built-in model"):
        DistilledSetWriter(cfg.out, ["a"], cfg.fingerprint(), cfg.generation_key())
    with pytest.raises(UserError, match=r"other settings \(differs in: builtin_weights, ipc\)"):
        DistilledSetWriter(cfg.out, ["a"], cfg.with_(ipc=3).fingerprint(), cfg.with_(ipc=3).generation_key())
