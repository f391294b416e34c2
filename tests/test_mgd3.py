"""MGD3 (spec 3): mode discovery, the mode cache, the guidance term (DDPM and DDIM) and the registered method."""

from __future__ import annotations

import os

import pytest
import torch

from raydistill.config import DistillConfig
from raydistill.diffusion.sampler import cfg_predict, dit_denoiser
from raydistill.errors import UserError
from raydistill.guidance.base import GuidanceTerm, StepContext
from raydistill.methods.mgd3.guidance import ModeGuidance
from raydistill.methods.mgd3.modes import ModeCache, cluster_latents, discover_modes
from raydistill.models.vae import encode_images
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist

LABELS, INDICES = [0, 1, 0, 1], [0, 0, 1, 1]  # a mixed batch: two images of each of classes 0 and 1
K = 2


def _generator(tiny_model, ds, sampler="ddpm", dit_labels=None):
    from raydistill.generator import load_generator

    dit, vae = tiny_model
    cfg = DistillConfig(model=str(dit), vae=str(vae), steps=50, sampler=sampler)
    return load_generator(cfg, dit_labels or ds.dit_labels, ds.image_size, "cpu")


@pytest.fixture(scope="module")
def class0_latents(gen, fmnist):
    images, _ = fmnist.load("train", label=0, limit=200)
    return encode_images(gen.codec, images)


@pytest.fixture(scope="module")
def real_modes(gen, fmnist):
    """K k-means modes of classes 0 and 1 from 200 training images each."""
    out = {}
    for c in (0, 1):
        images, _ = fmnist.load("train", label=c, limit=200)
        out[c] = discover_modes(gen.codec, images, K, seed=0)
    return out


def _targets(modes, labels=LABELS, indices=INDICES):
    return torch.stack([modes[c][k] for c, k in zip(labels, indices)])


def _dist(x, m):
    return (x - m).flatten(1).norm(dim=1)


# ---- (a), (b): no guidance -> plain DiT, bit for bit --------------------------------------------------------------

def test_scale_zero_and_late_t_stop_give_plain_dit_bit_for_bit(gen, real_modes):
    assert isinstance(ModeGuidance(real_modes), GuidanceTerm)
    plain = gen.sample_latents(LABELS, INDICES, seed=3, terms=[])
    zero = gen.sample_latents(LABELS, INDICES, seed=3, terms=[ModeGuidance(real_modes, scale=0.0)])
    assert torch.equal(plain, zero)  # the term runs (i > 25) but adds exact zeros
    for t_stop in (49, 100):
        late = gen.sample_latents(LABELS, INDICES, seed=3, terms=[ModeGuidance(real_modes, scale=0.1, t_stop=t_stop)])
        assert torch.equal(plain, late)
    term = ModeGuidance(real_modes)
    assert [i for i in range(50) if term.active(i)] == list(range(26, 50))  # spec: 24 of 50 steps, 49..26


# ---- (c): the step delta points to the mode, and sampling ends closer to the modes --------------------------------

def _context(gen, sampler, i=40, seed=0):
    s = gen.schedule
    x = torch.randn(len(LABELS), *gen.latent_shape, generator=torch.Generator().manual_seed(seed))
    y = torch.as_tensor([gen.dit_labels[c] for c in LABELS])
    with torch.no_grad():
        mv = cfg_predict(dit_denoiser(gen.dit), s, x, i, y, gen.null_label, gen.sampler)
    return StepContext(i=i, x_t=x, eps=mv.eps, x0_hat=mv.x0_hat, mean=mv.mean, log_variance=mv.log_variance,
                       alpha_bar=s.at("alphas_cumprod", i, x), dit_labels=y, class_labels=torch.as_tensor(LABELS),
                       image_indices=torch.as_tensor(INDICES), sampler=sampler,
                       alpha_bar_prev=s.at("alphas_cumprod_prev", i, x))


def test_delta_pulls_x0_hat_toward_its_mode(gen, real_modes):
    m = _targets(real_modes)
    ctx = _context(gen, "ddpm")
    d = ModeGuidance(real_modes, scale=0.1).delta(ctx)
    assert torch.equal(d, 0.1 * ctx.sigma * (m - ctx.x0_hat))  # the author's code, spec 3.2 (not Eq. 6's sign)
    assert ((d * (m - ctx.x0_hat)).flatten(1).sum(1) > 0).all()

    # DDIM, Algorithm 1: the closed-form delta equals differencing the DDIM updates with eps' and eps
    ctx = _context(gen, "ddim")
    d = ModeGuidance(real_modes, scale=0.1).delta(ctx)
    ab, ab_prev = ctx.alpha_bar.double(), ctx.alpha_bar_prev.double()
    x_t, eps, x0 = ctx.x_t.double(), ctx.eps.double(), ctx.x0_hat.double()
    eps2 = eps - (1 - ab).sqrt() * 0.1 * (m.double() - x0)
    x02 = (x_t - (1 - ab).sqrt() * eps2) / ab.sqrt()
    x01 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    literal = (ab_prev.sqrt() * x02 + (1 - ab_prev).sqrt() * eps2) - (ab_prev.sqrt() * x01 + (1 - ab_prev).sqrt() * eps)
    torch.testing.assert_close(d.double(), literal, rtol=1e-4, atol=1e-4 * literal.abs().max().item())
    assert ((d * (m - ctx.x0_hat)).flatten(1).sum(1) > 0).all()


def test_guided_sampling_ends_closer_to_the_modes(gen, real_modes):
    m = _targets(real_modes)
    plain = gen.sample_latents(LABELS, INDICES, seed=1)
    guided = gen.sample_latents(LABELS, INDICES, seed=1, terms=[ModeGuidance(real_modes)])
    assert (_dist(guided, m) < _dist(plain, m)).all()


# ---- (d): class c's image k uses mode k of class c (subset labels, never DiT labels) ------------------------------

def test_modes_are_keyed_by_subset_class_and_image_index(tiny_model, fmnist):
    # DiT labels reversed: a term keyed by DiT label would look up classes 9 and 8 and fail
    gen = _generator(tiny_model, fmnist, dit_labels=list(range(9, -1, -1)))
    shape = gen.latent_shape
    plus, minus = torch.full(shape, 5.0), torch.full(shape, -5.0)
    modes = {0: torch.stack([plus, minus]), 1: torch.stack([minus, plus])}
    term = ModeGuidance(modes)
    plain = gen.sample_latents(LABELS, INDICES, seed=2)
    guided = gen.sample_latents(LABELS, INDICES, seed=2, terms=[term])
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])  # (class, index) = (0,0) +5, (1,0) -5, (0,1) -5, (1,1) +5
    assert (guided.flatten(1).mean(1) * sign > 0).all()  # toward +5 / -5 (the random DiT's plain drift is larger)
    own, other = _targets(modes), -_targets(modes)
    assert (_dist(guided, own) < _dist(plain, own)).all()
    assert (_dist(guided, own) < _dist(guided, other)).all()
    # swapping the modes' signs flips the direction each image moves, image by image
    flipped = gen.sample_latents(LABELS, INDICES, seed=2, terms=[ModeGuidance({c: -v for c, v in modes.items()})])
    assert ((guided - flipped).flatten(1).mean(1) * sign > 0).all()
    # the same images generated class by class are the same (the term acts per row)
    for c in (0, 1):
        alone = gen.sample_latents([c, c], [0, 1], seed=2, terms=[term])
        torch.testing.assert_close(alone, guided[[c, c + 2]], rtol=1e-5, atol=1e-4)

    with pytest.raises(UserError, match="image index 2"):
        gen.sample_latents([0], [2], seed=2, terms=[ModeGuidance(modes)])
    with pytest.raises(UserError, match="class label 3"):
        gen.sample_latents([3], [0], seed=2, terms=[ModeGuidance(modes)])
    with pytest.raises(UserError):
        ModeGuidance(modes, scale=-0.1)


# ---- (e): mode discovery ------------------------------------------------------------------------------------------

def test_kmeans_is_seeded_and_deterministic(gen, fmnist, class0_latents):
    z = class0_latents
    a, b, c = (cluster_latents(z, 8, seed=s) for s in (0, 0, 1))
    assert a.shape == (8, *gen.latent_shape) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    images, _ = fmnist.load("train", label=0, limit=200)
    assert torch.equal(discover_modes(gen.codec, images, 8, seed=0), a)  # posterior mean: deterministic encode

    gmm = cluster_latents(z, 3, seed=0, method="gmm")
    assert gmm.shape == (3, *gen.latent_shape) and torch.equal(gmm, cluster_latents(z, 3, seed=0, method="gmm"))
    snapped = cluster_latents(z, 3, seed=0, snap=True)  # each mode is a real latent
    flat = z.flatten(1)
    assert all(any(torch.equal(row, f) for f in flat) for row in snapped.flatten(1))

    with pytest.raises(UserError, match="cannot find 4 modes among 3 images"):
        discover_modes(gen.codec, images[:3], 4)
    with pytest.raises(UserError, match="unknown mode discovery method"):
        cluster_latents(z, 2, method="dbscan")


# ---- (f): the cache -----------------------------------------------------------------------------------------------

def test_mode_cache_round_trip_without_recomputing(tmp_path, class0_latents):
    calls = []

    def compute():
        calls.append(1)
        return cluster_latents(class0_latents, 3, seed=0)

    key = dict(dataset="fashion-mnist|class=t-shirt_top", label=0, k=3, vae="vae-test", seed=0)
    first = ModeCache(tmp_path).get_or_compute(compute, **key)
    path = ModeCache(tmp_path).path(**key)
    mtime = os.stat(path).st_mtime_ns
    again = ModeCache(tmp_path).get_or_compute(compute, **key)  # a fresh instance reads the file
    assert torch.equal(first, again) and len(calls) == 1 and os.stat(path).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind

    ModeCache(tmp_path).get_or_compute(compute, **{**key, "seed": 1})  # any key field changes the entry
    ModeCache(tmp_path).get_or_compute(compute, **{**key, "vae": "vae-other"})
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3

    path.write_bytes(b"truncated")  # a damaged file is a miss, recomputed and replaced atomically
    assert torch.equal(ModeCache(tmp_path).get_or_compute(compute, **key), first) and len(calls) == 4


# ---- (g): DDIM ----------------------------------------------------------------------------------------------------

def test_ddim_mode_guidance(tiny_model, fmnist, real_modes):
    gen = _generator(tiny_model, fmnist, sampler="ddim")
    plain = gen.sample_latents(LABELS, INDICES, seed=4)
    zero = gen.sample_latents(LABELS, INDICES, seed=4, terms=[ModeGuidance(real_modes, scale=0.0)])
    assert torch.equal(plain, zero)
    guided = gen.sample_latents(LABELS, INDICES, seed=4, terms=[ModeGuidance(real_modes, scale=0.1)])
    m = _targets(real_modes)
    assert (_dist(guided, m) < _dist(plain, m)).all()


# ---- the registered method ----------------------------------------------------------------------------------------

def test_mgd3_method_runs_through_shard_runner_with_cache(tiny_model, tmp_path, monkeypatch):
    import raydistill.methods.mgd3.modes as modes_mod
    from raydistill.distill import ShardRunner, plan_shards
    from raydistill.methods import get_method

    assert get_method("mgd3").generative and get_method("mgd3").precompute == ("modes",)
    calls = []
    real = modes_mod.discover_modes

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(modes_mod, "discover_modes", counting)
    dit, vae = tiny_model
    # scikit-learn digits (~180 images a class) keeps the all-images-of-the-class encode cheap
    cfg = DistillConfig(dataset="digits", method="mgd3", ipc=2, classes=("0", "1"), model=str(dit), vae=str(vae),
                        out=str(tmp_path / "run"), extra={"mode_scale": 0.1})
    runner = ShardRunner(cfg, "cpu")
    assert len(runner.terms) == 1 and isinstance(runner.terms[0], ModeGuidance) and not calls  # lazy
    shard = plan_shards(cfg, [0, 1])[0]
    images, _ = runner.images(shard)
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 8, 8)
    assert len(calls) == 1 and len(list((tmp_path / ".modes").glob("*.safetensors"))) == 1  # class 0 only
    assert runner.terms[0].modes[0].shape == (2, 4, 8, 8)

    again = ShardRunner(cfg, "cpu")  # e.g. another actor: reads the cache
    assert torch.equal(again.images(shard)[0], images) and len(calls) == 1

    plain = ShardRunner(cfg.with_(method="dit"), "cpu").images(shard)[0]
    assert not torch.equal(plain, images)
    with pytest.raises(UserError, match="fewer than the IPC 500 modes"):
        ShardRunner(cfg.with_(ipc=500), "cpu")
    with pytest.raises(UserError, match="mode_method"):
        cfg.with_(extra={"mode_method": "spectral"})  # refused when the config is made
