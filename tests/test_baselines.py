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
