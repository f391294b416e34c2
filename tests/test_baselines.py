"""Real-image baselines: seeded random subset and the herding coreset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.config import DistillConfig
from raydistill.distill import distill_local, load_distilled
from raydistill.errors import UserError
from raydistill.methods.baselines import herding_indices, random_real_indices
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist


def test_herding_picks_distinct_class_images_whose_mean_tracks_the_class_mean(tiny_model):
    from raydistill.data import load_dataset
    from raydistill.models.vae import encode_images, load_vae

    ds = load_dataset("fashion-mnist")
    codec = load_vae(tiny_model[1], image_size=28)
    chosen = herding_indices(ds, 4, 5, codec, max_pool=300)
    assert len(set(chosen.tolist())) == 5 and set(chosen.tolist()) <= set(ds.indices("train", 4)[:300].tolist())
    assert np.array_equal(chosen, herding_indices(ds, 4, 5, codec, max_pool=300))  # deterministic
    pool = ds.indices("train", 4)[:300]
    feats = encode_images(codec, ds.read("train", pool)).flatten(1)
    mu = feats.mean(0)
    pos = {int(p): i for i, p in enumerate(pool)}
    gap = lambda idx: float((feats[[pos[int(i)] for i in idx]].mean(0) - mu).norm())  # noqa: E731
    rand = [gap(np.random.default_rng(s).choice(pool, 5, replace=False)) for s in range(20)]
    assert gap(chosen) < min(rand)  # greedy mean matching beats every one of 20 random subsets


def test_herding_method_writes_a_set(tiny_model, tmp_path):
    cfg = DistillConfig(method="herding", ipc=2, classes=("0", "1"), model=str(tiny_model[0]), vae=str(tiny_model[1]),
                        extra={"herding_pool": 50}, out=str(tmp_path / "h"))
    res = distill_local(cfg)
    assert len(res.rows) == 4 and all(r["method"] == "herding" for r in res.rows)
    from raydistill.data import load_dataset

    ds = load_dataset("fashion-mnist")
    x, y = load_distilled(tmp_path / "h", ds, [0, 1])
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [0, 0, 1, 1]
    assert not torch.equal(x[0], x[1])


def test_random_subset_is_seeded_and_within_the_class():
    from raydistill.data import load_dataset

    ds = load_dataset("fashion-mnist")
    a, b = random_real_indices(ds, 3, 10, 0), random_real_indices(ds, 3, 10, 1)
    assert np.array_equal(a, random_real_indices(ds, 3, 10, 0)) and not np.array_equal(a, b)
    assert set(a.tolist()) <= set(ds.indices("train", 3).tolist())
    with pytest.raises(UserError, match="fewer than IPC"):
        random_real_indices(ds, 3, 10**6, 0)


def test_recon_writes_the_random_subset_through_the_vae(tiny_model, tmp_path):
    """``recon`` = the random subset's images, each replaced by D(E(x).mean): the VAE bound of a generated set."""
    from raydistill.data import load_dataset
    from raydistill.models.vae import load_vae, reconstruct_images

    common = dict(ipc=3, classes=("0", "1"), model=str(tiny_model[0]), vae=str(tiny_model[1]))
    distill_local(DistillConfig(method="random", out=str(tmp_path / "r"), **common))
    res = distill_local(DistillConfig(method="recon", out=str(tmp_path / "v"), **common))
    ds = load_dataset("fashion-mnist")
    raw, y = load_distilled(tmp_path / "r", ds, [0, 1])
    recon, y2 = load_distilled(tmp_path / "v", ds, [0, 1])
    assert y.tolist() == y2.tolist() and [r["seed"] for r in res.rows] == [
        int(i) for c in (0, 1) for i in random_real_indices(ds, c, 3, 0)]  # the very images random picks
    codec = load_vae(tiny_model[1], image_size=28)
    expected = reconstruct_images(codec, ds.read("train", [r["seed"] for r in res.rows]))
    assert torch.equal(recon, expected)  # the round trip, nothing else
    assert not torch.equal(recon, raw)


def test_the_shipped_vae_round_trip_keeps_fashion_mnist_images_close():
    """The VAE bound is only meaningful if the round trip is faithful: PSNR of the shipped VAE >= 20 dB."""
    from raydistill.config import BUILTIN_MODEL
    from raydistill.data import load_dataset
    from raydistill.models.vae import load_vae, reconstruct_images

    ds = load_dataset("fashion-mnist")
    x = ds.read("train", np.concatenate([ds.indices("train", c)[:4] for c in range(10)]))
    r = reconstruct_images(load_vae(BUILTIN_MODEL / "vae", image_size=28), x)
    mse = ((r.float() - x.float()) / 255).pow(2).mean()
    assert r.shape == x.shape and r.dtype == torch.uint8
    assert 10 * torch.log10(1 / mse) > 20.0
