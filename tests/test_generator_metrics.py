"""Generator-quality metrics: FID and Naeem et al.'s precision / recall / density / coverage, the feature network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.errors import UserError
from raydistill.evaluate.feature_net import FeatureNet, load_feature_net, save_feature_net, train_feature_net
from raydistill.evaluate.generator_metrics import InceptionFeatures, Reference, class_balanced_subset, features, fid


def test_prdc_equals_the_authors_implementation():
    from prdc import compute_prdc

    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    gen = rng.normal(loc=0.3, scale=0.8, size=(170, 16))
    want = compute_prdc(real_features=real, fake_features=gen, nearest_k=5)
    got = Reference(real, k=5).score(gen, chunk=64)  # chunking must not change anything
    for name in ("precision", "recall", "density", "coverage"):
        assert getattr(got, name) == pytest.approx(want[name], abs=1e-12), name
    assert (got.n_generated, got.n_reference, got.k) == (170, 300, 5)


def test_fid_equals_the_frechet_formula_and_orders_sets():
    from scipy import linalg

    rng = np.random.default_rng(1)
    real = rng.normal(size=(500, 8))
    gen = rng.normal(loc=0.5, scale=1.5, size=(400, 8))
    mu1, mu2 = real.mean(0), gen.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid(real, gen) == pytest.approx(want, rel=1e-5)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-6)
    assert fid(real, real + 0.1) < fid(real, real + 1.0)


def test_identical_sets_score_perfectly_and_a_collapsed_set_loses_recall_and_coverage():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 8))
    same = Reference(real, k=3).score(real.copy())
    assert (same.precision, same.recall, same.coverage) == (1.0, 1.0, 1.0)
    collapsed = Reference(real, k=3).score(real[:1] + 1e-3 * rng.normal(size=(50, 8)))  # 50 copies of one point
    assert collapsed.precision == 1.0  # every generated image looks real ...
    assert collapsed.recall < 0.1 and collapsed.coverage < 0.1  # ... but they cover almost nothing


def test_too_small_sets_are_one_line_errors():
    real = np.random.default_rng(3).normal(size=(20, 4))
    with pytest.raises(UserError, match="too small"):
        Reference(real, k=5).score(real[:6])
    with pytest.raises(UserError, match="reference holds 6"):
        Reference(real[:6], k=5)


def test_feature_net_trains_saves_loads_and_rejects_bad_files(tmp_path):
    from raydistill.data import load_dataset

    ds = load_dataset("digits")  # 8x8, 10 classes, offline (scikit-learn)
    x, y = ds.load("train")
    net, lines = train_feature_net(x, y, ds.num_classes, epochs=3, batch=64, lr=3e-3, test=ds.load("test"),
                                   log=lambda s: None)
    acc = float(lines[-1].split("test accuracy ")[1].split("%")[0])
    assert acc > 50.0, lines  # chance is 10%
    path = tmp_path / "feat.safetensors"
    save_feature_net(net, path, {"test_accuracy": acc})
    back = load_feature_net(path, channels=1, num_classes=10)
    xt = ds.load("test")[0][:16]
    assert torch.equal(back.features(xt), net.features(xt))
    assert features(back, xt).shape == (16, FeatureNet.num_features)
    assert (tmp_path / "feat.json").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(UserError, match="num_classes=10, the dataset has 100"):
        load_feature_net(path, num_classes=100)
    with pytest.raises(UserError, match="not found"):
        load_feature_net(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot read the feature network"):
        load_feature_net(bad)


def test_real_floor_subset_has_the_set_s_class_counts():
    from raydistill.data import load_dataset

    ds = load_dataset("digits")
    labels = torch.tensor([0, 0, 0, 3, 3, 7])
    x = class_balanced_subset(ds, labels, seed=0)
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x, class_balanced_subset(ds, labels, seed=0))
    assert not torch.equal(x, class_balanced_subset(ds, labels, seed=1))


def test_inception_features_from_a_local_file(tmp_path):
    from torchvision.models import inception_v3

    with pytest.raises(UserError, match="Inception-v3 weights not found"):
        InceptionFeatures(tmp_path / "none.pth")
    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    net = InceptionFeatures(path).eval()
    f = features(net, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert f.shape == (2, 2048) and np.isfinite(f).all()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load Inception-v3"):
        InceptionFeatures(tmp_path / "junk.pth")


def test_set_metrics_score_a_set_and_its_real_floor(tmp_path):
    from raydistill.data import load_dataset
    from raydistill.evaluate.generator_metrics import set_generator_metrics

    ds = load_dataset("digits")
    x, y = ds.load("train")
    net, _ = train_feature_net(x, y, ds.num_classes, epochs=1, batch=64, log=lambda s: None)
    save_feature_net(net, tmp_path / "f.safetensors", {})
    real_x, real_y = ds.load("train", limit=3)  # a "set" of 3 real images per class
    m = set_generator_metrics(ds, real_x, real_y, feature_net=tmp_path / "f.safetensors")
    assert m["gen_n_generated"] == m["gen_floor_n_generated"] == 30
    assert m["gen_n_reference"] == ds.num_images("test")  # every class is in the set
    two = set_generator_metrics(ds, real_x[real_y < 2], real_y[real_y < 2], feature_net=tmp_path / "f.safetensors")
    assert two["gen_n_reference"] == ds.num_images("test", 0) + ds.num_images("test", 1)
    blank = set_generator_metrics(ds, torch.zeros_like(real_x), real_y, feature_net=tmp_path / "f.safetensors")
    assert blank["gen_fid"] > m["gen_fid"] and blank["gen_recall"] <= m["gen_recall"]
    with pytest.raises(UserError, match="no built-in feature network for digits"):
        set_generator_metrics(ds, real_x, real_y)
