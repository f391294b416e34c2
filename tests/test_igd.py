"""IGD (spec 2): surrogate trajectory, checkpoint selection, real gradients, influence and deviation guidance."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from raydistill.config import DistillConfig
from raydistill.diffusion.sampler import cfg_predict, dit_denoiser
from raydistill.errors import UserError
from raydistill.guidance.base import StepContext
from raydistill.methods.igd.guidance import DeviationGuidance, InfluenceGuidance, code_cosine, igd_preset
from raydistill.methods.igd.surrogate import (
    SurrogateConfig,
    Trajectory,
    flatten,
    resolve_epochs,
    select_by_similarity,
    train_trajectory,
)
from tests.conftest import make_fake_trajectory, needs_fmnist

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def traj(tmp_path_factory, fmnist):
    return make_fake_trajectory(tmp_path_factory.mktemp("traj"), fmnist)


def _influence(gen, traj, fmnist, epochs=(0, 2), impl="fast", scale=5.0, grad_ipc=50, window=(30, 45), refresh=1):
    real = {c: traj.real_gradients(fmnist, c, list(epochs), grad_ipc) for c in (0, 1)}
    return InfluenceGuidance(gen.codec.decode, traj.net, [traj.params(e) for e in epochs], real, scale=scale,
                             impl=impl, window=window, refresh=refresh)


def _ctx(gen, x, i, labels, indices=None):
    """A StepContext at respaced index i for latents x (which may require grad), as the sampler builds it."""
    y = torch.as_tensor([gen.dit_labels[c] for c in labels])
    mv = cfg_predict(dit_denoiser(gen.dit), gen.schedule, x, i, y, gen.null_label, gen.sampler)
    s = gen.schedule
    idx = torch.as_tensor(indices if indices is not None else [0] * len(labels))
    return StepContext(i=i, x_t=x, eps=mv.eps, x0_hat=mv.x0_hat, mean=mv.mean, log_variance=mv.log_variance,
                       alpha_bar=s.at("alphas_cumprod", i, x), dit_labels=y, class_labels=torch.as_tensor(labels),
                       image_indices=idx, sampler="ddpm", alpha_bar_prev=s.at("alphas_cumprod_prev", i, x))


# ---------------------------------------------------------------------------------------------------------------------
# surrogate trajectory


def test_trajectory_resume_gives_the_same_weights(tmp_path):
    from raydistill.data import load_dataset

    ds = load_dataset("digits")
    cfg = SurrogateConfig(epochs=3, batch_size=64, images_per_epoch=256)
    train_trajectory(ds, tmp_path / "full", cfg, device="cpu")
    train_trajectory(ds, tmp_path / "cut", cfg, device="cpu", max_epochs_this_run=1)  # "interrupted" after 1 epoch
    assert json.loads((tmp_path / "cut" / "trajectory.json").read_text())["epochs_done"] == 1
    train_trajectory(ds, tmp_path / "cut", cfg, device="cpu")  # resumes at epoch 2
    full, cut = Trajectory(tmp_path / "full"), Trajectory(tmp_path / "cut")
    assert full.epochs_done == cut.epochs_done == 3
    for e in range(4):
        for name in full.names:
            assert torch.equal(full.params(e)[name], cut.params(e)[name]), (e, name)
    assert not torch.equal(full.params(0)[full.names[0]], full.params(3)[full.names[0]])  # it did train
    with pytest.raises(UserError, match="other settings"):
        train_trajectory(ds, tmp_path / "full", SurrogateConfig(epochs=4), device="cpu")


def test_select_by_similarity_on_hand_made_gradients():
    base = torch.tensor([1.0, 0.0, 0.0])
    tilt = lambda deg: torch.tensor([torch.cos(torch.tensor(deg)).item(), torch.sin(torch.tensor(deg)).item(), 0.0])  # noqa: E731
    # cos to the last accepted: e1 0.98 (no), e2 0.6 (yes, < 0.7), e3 vs e2 0.99 (no), e4 vs e2 0.54 (yes)
    angles = [0.0, 0.2, 0.9273, 0.8, 1.9745]
    g = torch.stack([torch.stack([tilt(a), tilt(a)]) for a in angles])  # [5 epochs, 2 classes, 3]
    g[0] = base
    assert select_by_similarity(g) == [0, 2, 4]
    assert select_by_similarity(g, threshold=-0.5) == [0]  # cos(e4, e0) = -0.39


def test_real_gradient_is_the_mean_over_batches_of_50_of_the_first_200(traj, fmnist):
    from torch.func import functional_call

    g = traj.real_gradients(fmnist, 3, [1], grad_ipc=200)
    assert g.shape == (1, sum(p.numel() for p in traj.params(1).values()))
    images, _ = fmnist.load("train", label=3, limit=200)
    params = {k: v.clone().requires_grad_() for k, v in traj.params(1).items()}
    parts = []
    for s in range(0, 200, 50):
        x = images[s:s + 50].float() / 127.5 - 1
        loss = torch.nn.functional.cross_entropy(functional_call(traj.net, params, (x,)), torch.full((50,), 3))
        parts.append(flatten(torch.autograd.grad(loss, list(params.values()))))
    torch.testing.assert_close(g[0], torch.stack(parts).mean(0), rtol=1e-5, atol=1e-7)
    assert any(p.name.endswith(".safetensors") for p in (traj.path / "real_grads").rglob("*"))  # cached
    assert torch.equal(traj.real_gradients(fmnist, 3, [1], grad_ipc=200), g)


def test_epoch_specs(traj):
    assert resolve_epochs(traj, "fashion-mnist", [0, 3]) == [0, 3]
    with pytest.raises(UserError, match="outside the trajectory"):
        resolve_epochs(traj, "fashion-mnist", [0, 9])
    with pytest.raises(UserError, match="no checkpoint selection"):
        resolve_epochs(traj, "fashion-mnist", "similarity")
    with pytest.raises(UserError, match="no preset checkpoint list"):
        resolve_epochs(traj, "fashion-mnist", "preset")
    assert igd_preset("imagewoof", 10) == (5, 50) and igd_preset("imagenette", 50, "minimax") == (15, 10)
    assert igd_preset("imagenet-1k", 100) == (5, 120)
    # Fashion-MNIST: the ImageNette gamma rescaled to the latent's size (the paper's 4x32x32 latents = 4,096 values);
    # the shipped 4x16x16 latents get 12.5 / 30, the first model's 4x8x8 ones 3.125 / 7.5. The paper's own datasets
    # are not rescaled.
    assert igd_preset("fashion-mnist", 10, latent_numel=4 * 16 * 16) == (5, 12.5)
    assert igd_preset("fashion-mnist", 50, "minimax", latent_numel=4 * 16 * 16) == (5, 30.0)
    assert igd_preset("fashion-mnist", 10, latent_numel=4 * 8 * 8) == (5, 3.125)
    assert igd_preset("imagewoof", 10, latent_numel=4 * 8 * 8) == (5, 50)


# ---------------------------------------------------------------------------------------------------------------------
# influence guidance


def test_sets_made_with_the_old_constant_gamma_do_not_resume(tmp_path):
    """Fashion-MNIST's default gamma follows the latent size since 2026-12-06; the sets of the old constant (3.125 for
    every latent) were keyed with an empty extra and must be refused, not resumed, by a default IGD run."""
    from raydistill.outputs import DistilledSetWriter

    cfg = DistillConfig(method="igd", out=str(tmp_path / "igd"))
    assert cfg.generation_key()["extra"] == {"igd_gamma": "latent-scaled"}
    assert DistillConfig(method="mgd3+igd").generation_key()["extra"] == {"igd_gamma": "latent-scaled"}
    assert DistillConfig(method="igd", extra={"igd_gamma": 12.5}).generation_key()["extra"] == {"igd_gamma": 12.5}
    assert DistillConfig(method="mgd3").generation_key()["extra"] == {}  # no IGD part: key unchanged
    old_key = {**cfg.generation_key(), "extra": {}}
    old_fp = hashlib.sha256(json.dumps(old_key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    DistilledSetWriter(cfg.out, ["a"], old_fp, old_key)  # a set of the old default
    with pytest.raises(UserError, match="differs in: extra"):
        DistilledSetWriter(cfg.out, ["a"], cfg.fingerprint(), cfg.generation_key())


def test_influence_gradient_matches_finite_differences(gen, traj, fmnist):
    """<grad, v> == (L(x + h v) - L(x - h v)) / 2h in float64, through DiT, VAE decoder and second-order surrogate."""
    import copy

    g64 = copy.copy(gen)
    g64.dit, g64.codec = copy.deepcopy(gen.dit).double(), copy.deepcopy(gen.codec).double()
    net64 = copy.deepcopy(traj.net).double()
    ckpts = [{k: v.double() for k, v in traj.params(e).items()} for e in (0, 2)]
    real = {c: traj.real_gradients(fmnist, c, [0, 2], 50).double() for c in (0, 1)}
    term = InfluenceGuidance(g64.codec.decode, net64, ckpts, real)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def loss(z):
        ctx = _ctx(g64, z, 40, [0, 1])
        return term.checkpoint_losses(term.decode(ctx.x0_hat), ctx.class_labels).sum()

    grad = term.gradient(_ctx(g64, x.clone().requires_grad_(), 40, [0, 1]))
    v = torch.randn_like(x)
    h = 1e-6  # the surrogate is piecewise smooth (ReLU kinks within ~1e-5 here): stay inside one piece
    fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)  # (the surrogate's parameter gradient needs autograd on)
    assert float((grad * v).sum()) == pytest.approx(float(fd.detach()), rel=1e-5)
    assert float(grad.abs().max()) > 0


def test_fast_equals_reference_gradient(gen, traj, fmnist):
    fast, ref = _influence(gen, traj, fmnist, impl="fast"), _influence(gen, traj, fmnist, impl="reference")
    torch.manual_seed(1)
    x = torch.randn(1, 4, 8, 8)
    g_ref = ref.gradient(_ctx(gen, x.clone().requires_grad_(), 35, [1]))
    g_fast = fast.gradient(_ctx(gen, x.clone().requires_grad_(), 35, [1]))
    assert float((g_fast - g_ref).norm() / g_ref.norm()) < 1e-5
    # fast at batch 2 gives each image its own batch-1 gradient
    x2 = torch.cat([x, torch.randn(1, 4, 8, 8)])
    g2 = fast.gradient(_ctx(gen, x2.clone().requires_grad_(), 35, [1, 0]))
    assert float((g2[:1] - g_ref).norm() / g_ref.norm()) < 1e-5


def test_influence_step_size_is_rms_normalised(gen, traj, fmnist):
    term = _influence(gen, traj, fmnist, scale=5.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
    ctx = _ctx(gen, x, 30, [0, 1])
    d = term.delta(ctx)
    rms = lambda t: t.pow(2).flatten(1).mean(1).sqrt()  # noqa: E731
    expected = 5.0 * 0.0015 * rms(ctx.eps.detach()) * (1 - ctx.alpha_bar.flatten()).sqrt()
    torch.testing.assert_close(rms(d), expected, rtol=1e-5, atol=0)


def _sample(gen, terms, labels, indices, seed=0):
    return gen.sample_latents(labels, indices, seed, terms)


def test_zero_scales_give_plain_images_bit_for_bit(gen, traj, fmnist):
    plain = _sample(gen, [], [0, 0, 1], [0, 1, 0])
    dev = DeviationGuidance(gamma=0.0)
    dev.on_images_done(torch.randn(3, 4, 8, 8), torch.tensor([0, 0, 1]), torch.tensor([5, 6, 7]))  # non-empty memory
    guided = _sample(gen, [dev, _influence(gen, traj, fmnist, scale=0.0)], [0, 0, 1], [0, 1, 0])
    assert torch.equal(plain, guided)


def test_guidance_acts_exactly_at_respaced_steps_30_to_45(gen, traj, fmnist):
    calls: dict[str, list[int]] = {"inf": [], "dev": []}
    inf = _influence(gen, traj, fmnist)
    dev = DeviationGuidance(gamma=1.0)
    inf_delta, dev_delta = inf.delta, dev.delta
    inf.delta = lambda ctx: (calls["inf"].append(ctx.i), inf_delta(ctx))[1]
    dev.delta = lambda ctx: (calls["dev"].append(ctx.i), dev_delta(ctx))[1]
    _sample(gen, [dev, inf], [0], [0])
    assert calls["inf"] == calls["dev"] == list(range(45, 29, -1))
    plain = _sample(gen, [], [0], [0])
    guided = _sample(gen, [_influence(gen, traj, fmnist)], [0], [0])
    assert not torch.equal(plain, guided)


def test_refresh_computes_every_n_window_steps_and_reuses_the_unit_direction(gen, traj, fmnist):
    """igd_refresh 3: gradients (and the graph through the DiT) at 45, 42, ..., 30 of every chain; between them the
    step is the last direction g / RMS(g) times the current 0.0015 * RMS(eps) * sqrt(1 - abar), Eq. 7's size."""
    inf = _influence(gen, traj, fmnist, refresh=3)
    computed, seen = [], []
    gradient, delta = inf.gradient, inf.delta
    inf.gradient = lambda ctx: (computed.append(ctx.i), gradient(ctx))[1]

    def spy(ctx):
        d = delta(ctx)
        size = 5.0 * 0.0015 * ctx.eps.detach().pow(2).flatten(1).mean(1).sqrt() * (1 - ctx.alpha_bar.flatten()).sqrt()
        seen.append((ctx.i, ctx.x_t.requires_grad, d / size.view(-1, 1, 1, 1)))
        return d

    inf.delta = spy
    for _ in range(2):  # a second chain starts afresh at 45
        computed.clear()
        seen.clear()
        _sample(gen, [inf], [0, 1], [0, 0])
        assert computed == [45, 42, 39, 36, 33, 30]
        assert [i for i, with_graph, _ in seen if with_graph] == computed  # no DiT graph on the reuse steps
        units = {i: u for i, _, u in seen}
        for i in range(44, 29, -1):
            torch.testing.assert_close(units[i], units[45 - 3 * ((45 - i) // 3)], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(units[45], units[42])
    one = _influence(gen, traj, fmnist, refresh=1)  # the default: a gradient at every window step, nothing reused
    gradient_one, computed = one.gradient, []
    one.gradient = lambda ctx: (computed.append(ctx.i), gradient_one(ctx))[1]
    exact = _sample(gen, [one], [0, 1], [0, 0])
    assert computed == list(range(45, 29, -1)) and one._last is None
    reused = _sample(gen, [_influence(gen, traj, fmnist, refresh=3)], [0, 1], [0, 0])
    assert torch.isfinite(reused).all() and not torch.equal(exact, reused)
    inf2 = _influence(gen, traj, fmnist, refresh=2)
    x = torch.randn(2, 4, 8, 8).requires_grad_()
    inf2.delta(_ctx(gen, x, 45, [0, 1]))
    with pytest.raises(RuntimeError, match="another batch"):
        inf2.delta(_ctx(gen, x.detach(), 44, [1, 0]))


def test_fast_and_reference_sample_the_same_images_at_batch_1(gen, traj, fmnist):
    """Three images of a class, one at a time, with both terms: same uint8 images, latents equal to 1e-4.

    (The two differ only in float summation order: E backward passes summed vs one backward of the sum; 16 guided
    steps carry that ~1e-7 difference to ~1e-5 in the final latents.)"""
    out = {}
    for impl in ("reference", "fast"):
        terms = [DeviationGuidance(gamma=2.0, impl=impl), _influence(gen, traj, fmnist, impl=impl)]
        lat = torch.cat([_sample(gen, terms, [1], [k]) for k in range(3)])
        out[impl] = lat
    torch.testing.assert_close(out["fast"], out["reference"], rtol=1e-4, atol=1e-4)
    assert torch.equal(gen.decode(out["fast"]), gen.decode(out["reference"]))


# ---------------------------------------------------------------------------------------------------------------------
# deviation guidance


def test_deviation_repels_from_the_most_similar_memory_entry(gen):
    dev = DeviationGuidance(gamma=10.0)
    mem = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    dev.on_images_done(mem, torch.tensor([2, 2, 2]), torch.tensor([0, 1, 2]))
    x = (mem[1] + 0.1 * torch.randn(4, 8, 8))[None]  # closest to entry 1
    ctx = _ctx(gen, x, 40, [2], [3])
    d = dev.delta(ctx)
    leaf = x.flatten().clone().requires_grad_()
    expected = -10.0 * torch.autograd.grad(code_cosine(leaf, mem[1].flatten()), leaf)[0]
    torch.testing.assert_close(d.flatten(), expected)
    assert float(code_cosine((x + d).flatten(), mem[1].flatten())) < float(code_cosine(x.flatten(), mem[1].flatten()))


def test_batched_deviation_memory_uses_in_batch_predecessors(gen):
    dev = DeviationGuidance(gamma=1.0, memory_size=2)
    finals = torch.randn(2, 4, 8, 8)
    dev.on_images_done(finals, torch.tensor([0, 0]), torch.tensor([0, 1]))
    x = torch.randn(3, 4, 8, 8)
    ctx = _ctx(gen, x, 40, [0, 0, 1], [2, 3, 0])
    assert [m.data_ptr() for m in dev.memory(ctx, 0)] == [dev.finals[0][0].data_ptr(), dev.finals[0][1].data_ptr()]
    bank = dev.memory(ctx, 1)  # image 3: memory of 2 -> images 1 (final) and 2 (in this batch: its x0_hat)
    assert torch.equal(bank[0], finals[1]) and torch.equal(bank[1], ctx.x0_hat[0])
    assert dev.memory(ctx, 2) == []  # class 1 has no earlier images
    assert float(dev.delta(ctx)[2].abs().sum()) == 0


def test_igd_config_errors(gen, fmnist, traj):
    from raydistill.methods import MethodContext, get_method
    from raydistill.methods.igd.guidance import igd_terms

    base = dict(method="igd", extra={"surrogate": str(traj.path), "igd_epochs": [0, 1]})
    for bad, match in [({"igd_scale": -1}, "igd_scale"), ({"igd_window": [45, 30]}, "window"),
                       ({"igd_impl": "turbo"}, "igd_impl must be one of fast, reference"),
                       ({"igd_epochs": "best"}, "igd_epochs"), ({"igd_refresh": 0}, "igd_refresh"),
                       ({"igd_refresh": 1.5}, "igd_refresh"), ({"igd_gamma": float("nan")}, "igd_gamma")]:
        with pytest.raises(UserError, match=match):  # refused when the config is made, before anything runs
            DistillConfig(**{**base, "extra": {**base["extra"], **bad}})

    def terms(cfg):
        spec = get_method(cfg.method)
        ctx = MethodContext(cfg, fmnist, [0, 1], gen, gen.codec, spec.base)
        return igd_terms(ctx, spec.parse(cfg.extra, cfg)["igd"])

    with pytest.raises(UserError, match="no surrogate trajectory"):
        terms(DistillConfig(**{**base, "extra": {**base["extra"], "surrogate": "/nonexistent"}}))
    t = terms(DistillConfig(**base))
    assert [x.name for x in t] == ["igd-deviation", "igd-influence"]
    numel = math.prod(gen.latent_shape)  # the run's latent size sets the Fashion-MNIST gamma
    assert (t[1].scale, t[0].gamma) == igd_preset("fashion-mnist", 10, latent_numel=numel)
    assert t[0].gamma == 50 * numel / 4096
    m = terms(DistillConfig(**{**base, "method": "minimax-igd"}))  # the Minimax row of the presets (spec 2.3)
    assert (m[1].scale, m[0].gamma) == igd_preset("fashion-mnist", 10, "minimax", latent_numel=numel)


def test_distill_igd_end_to_end_and_window_outside_steps_is_refused(tiny_model, traj, tmp_path):
    from raydistill.distill import distill_local

    dit, vae = tiny_model
    cfg = DistillConfig(method="igd", ipc=2, classes=("0",), model=str(dit), vae=str(vae), steps=10, batch_size=2,
                        extra={"surrogate": str(traj.path), "igd_epochs": [0, 1], "igd_window": [3, 5],
                               "igd_grad_ipc": 20}, out=str(tmp_path / "igd"))
    res = distill_local(cfg)
    assert len(res.rows) == 2 and res.rows[0]["method"] == "igd"
    assert any((tmp_path / ".igd").rglob("c0000.safetensors"))  # real gradients cached beside the run
    with pytest.raises(UserError, match="outside the respaced steps"):  # refused when the config is made
        cfg.with_(extra={**cfg.extra, "igd_window": [30, 45]}, out=str(tmp_path / "igd2"))
    with pytest.raises(UserError, match="split classes"):
        from raydistill.distill import plan_shards

        plan_shards(cfg, [0], shard_size=1)
