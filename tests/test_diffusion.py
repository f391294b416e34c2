"""The respaced learned-variance sampler against an independent float64 reference, batch invariance, the hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.diffusion.gaussian import mean_variance
from raydistill.diffusion.sampler import SamplerConfig, dit_denoiser, image_seed, sample
from raydistill.diffusion.schedule import Schedule
from raydistill.models.dit import DiTConfig, build_dit

SPEC_MAP = [0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224, 245, 265, 285, 306, 326, 347, 367, 387, 408, 428,
            449, 469, 489, 510, 530, 550, 571, 591, 612, 632, 652, 673, 693, 714, 734, 754, 775, 795, 816, 836, 856,
            877, 897, 917, 938, 958, 979, 999]


def ref_chain() -> dict[str, np.ndarray]:
    """Respaced chain written from the definitions, in float64, without the library."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar_full = np.cumprod(1 - betas)
    keep = [round(i * 999 / 49) for i in range(50)]
    abar = abar_full[keep]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    b = 1 - abar / abar_prev
    post_var = b * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    return {"keep": np.array(keep), "abar": abar, "abar_prev": abar_prev, "beta": b, "post_logvar": post_logvar}


def ref_step(r, i, x, eps, v):
    x0 = np.sqrt(1 / r["abar"][i]) * x - np.sqrt(1 / r["abar"][i] - 1) * eps
    c1 = r["beta"][i] * np.sqrt(r["abar_prev"][i]) / (1 - r["abar"][i])
    c2 = (1 - r["abar_prev"][i]) * np.sqrt(1 - r["beta"][i]) / (1 - r["abar"][i])
    frac = (v + 1) / 2
    logvar = frac * np.log(r["beta"][i]) + (1 - frac) * r["post_logvar"][i]
    return x0, c1 * x0 + c2 * x, logvar


def test_timestep_map_matches_spec():
    s = Schedule.linear(1000, 50)
    assert s.timestep_map.tolist() == SPEC_MAP == ref_chain()["keep"].tolist()


@pytest.mark.parametrize("i", [49, 45, 30, 25, 1, 0])
def test_step_equals_float64_reference(i):
    g = torch.Generator().manual_seed(i)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    v = torch.rand(3, 4, 8, 8, generator=g) * 2 - 1
    mv = mean_variance(Schedule.linear(1000, 50), x, i, eps, v)
    x0, mean, logvar = ref_step(ref_chain(), i, x.double().numpy(), eps.double().numpy(), v.double().numpy())
    np.testing.assert_allclose(mv.x0_hat.double().numpy(), x0, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(mv.mean.double().numpy(), mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(mv.log_variance.double().numpy(), logvar, rtol=2e-5, atol=2e-5)


def _linear_denoiser(w_eps: float, w_v: float, label_shift: float):
    """A deterministic stand-in model: eps = w_eps * x + label_shift * y (null label -> 0), v = tanh(w_v * x)."""

    def run(x, t, y):
        yy = torch.where(y == 10, torch.zeros_like(y), y).float().view(-1, 1, 1, 1)
        return torch.cat([w_eps * x + label_shift * yy, torch.tanh(w_v * x)], dim=1)

    return run


@pytest.mark.parametrize("cfg_scale,cfg_channels,interval", [(1.0, None, None), (4.0, None, None), (4.0, 3, None),
                                                              (4.0, None, (80, 580)), (2.0, 3, (300, 999))])
def test_full_chain_equals_float64_reference(cfg_scale, cfg_channels, interval):
    """50 ancestral steps with learned variance and CFG (over every step, or only for model timesteps inside
    ``interval``), against a float64 loop fed the same noise."""
    den = _linear_denoiser(0.3, 0.5, 0.1)
    labels, seeds = torch.tensor([1, 7]), [11, 12]
    schedule = Schedule.linear(1000, 50)
    out = sample(den, schedule, labels, seeds, (4, 4, 4), null_label=10,
                 cfg=SamplerConfig(cfg_scale=cfg_scale, cfg_channels=cfg_channels, cfg_interval=interval))
    r = ref_chain()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(4, 4, 4, generator=g) for g in gens]).double().numpy()
    yy = labels.double().numpy().reshape(-1, 1, 1, 1)
    for i in reversed(range(50)):
        eps_c, eps_u, v = 0.3 * x + 0.1 * yy, 0.3 * x, np.tanh(0.5 * x)
        guided = eps_u + cfg_scale * (eps_c - eps_u)
        eps = guided.copy()
        if cfg_channels is not None:
            eps[:, cfg_channels:] = eps_c[:, cfg_channels:]
        t = int(schedule.timestep_map[i])
        if cfg_scale == 1.0 or (interval is not None and not interval[0] <= t <= interval[1]):
            eps = eps_c
        _, mean, logvar = ref_step(r, i, x, eps, v)
        x = mean
        if i > 0:
            z = torch.stack([torch.randn(4, 4, 4, generator=g) for g in gens]).double().numpy()
            x = x + np.exp(0.5 * logvar) * z
    np.testing.assert_allclose(out.double().numpy(), x, rtol=1e-4, atol=1e-4)


def test_cfg_interval_guides_only_inside_it_and_runs_one_row_outside():
    """Inside the interval each image costs two model rows (conditional and null), outside one; the whole range is
    bit-identical to no interval, and an interval that holds no step of the chain is bit-identical to CFG 1."""
    den = _linear_denoiser(0.3, 0.5, 0.1)
    schedule, labels, seeds = Schedule.linear(1000, 50), torch.tensor([1, 7]), [11, 12]
    rows: list[tuple[int, int]] = []

    def counting(x, t, y):
        rows.append((int(t[0]), x.shape[0]))
        return den(x, t, y)

    def run(**kw):
        return sample(counting, schedule, labels, seeds, (4, 4, 4), null_label=10, cfg=SamplerConfig(**kw))

    inside = run(cfg_scale=4.0, cfg_interval=(82, 571))
    assert rows == [(int(t), 4 if 82 <= t <= 571 else 2) for t in reversed(schedule.timestep_map)]
    assert sum(n == 4 for _, n in rows) == 25  # timesteps 82, 102, ..., 571 of the 50-step map
    assert torch.equal(run(cfg_scale=4.0, cfg_interval=(0, 999)), run(cfg_scale=4.0))
    assert torch.equal(run(cfg_scale=4.0, cfg_interval=(985, 995)), run(cfg_scale=1.0))  # 979 and 999 fall outside
    assert not torch.allclose(inside, run(cfg_scale=4.0)) and not torch.allclose(inside, run(cfg_scale=1.0))


def test_cfg_quirk_leaves_fourth_channel_conditional():
    den = _linear_denoiser(0.0, 0.0, 1.0)  # eps_c = y, eps_u = 0
    from raydistill.diffusion.sampler import cfg_predict

    x = torch.zeros(1, 4, 2, 2)
    mv = cfg_predict(den, Schedule.linear(1000, 50), x, 10, torch.tensor([2]), 10, SamplerConfig(cfg_channels=3))
    assert torch.allclose(mv.eps[:, :3], torch.full((1, 3, 2, 2), 8.0))  # 0 + 4 * (2 - 0)
    assert torch.allclose(mv.eps[:, 3:], torch.full((1, 1, 2, 2), 2.0))  # conditional, unguided


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    m = build_dit(DiTConfig(size="test", input_size=8, in_channels=4, num_classes=10))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_image_is_the_same_at_batch_1_and_16(tiny_dit, sampler):
    s = Schedule.linear(1000, 50)
    labels = torch.arange(16) % 10
    seeds = [image_seed(0, int(c), k) for k, c in enumerate(labels)]
    cfg = SamplerConfig(sampler=sampler)
    batched = sample(dit_denoiser(tiny_dit), s, labels, seeds, (4, 8, 8), 10, cfg)
    single = torch.cat([sample(dit_denoiser(tiny_dit), s, labels[k:k + 1], seeds[k:k + 1], (4, 8, 8), 10, cfg)
                        for k in (0, 5, 15)])
    assert torch.equal(batched[[0, 5, 15]], single)


def test_image_seed_is_stable_and_distinct():
    # pinned: a change of the derivation would silently change every image of every set
    assert (image_seed(0, 3, 5), image_seed(1, 3, 5), image_seed(0, 4, 5)) == (
        6390908452621712697, 9003702337938959265, 3140329274114343411)
    assert len({image_seed(s, c, k) for s in range(3) for c in range(10) for k in range(20)}) == 600


class _Recorder:
    """A guidance term that records where it acts and adds a constant to the mean."""

    name = "recorder"

    def __init__(self, lo: int, hi: int, value: float) -> None:
        self.lo, self.hi, self.value, self.seen, self.done = lo, hi, value, [], None

    def active(self, i):
        return self.lo <= i <= self.hi

    def needs_grad(self, i):
        return False

    def delta(self, ctx):
        self.seen.append(ctx.i)
        return torch.full_like(ctx.mean, self.value)

    def on_images_done(self, latents, class_labels, image_indices):
        self.done = (latents.clone(), class_labels.clone(), image_indices.clone())


def test_guidance_hook_window_zero_and_effect(tiny_dit):
    s, den = Schedule.linear(1000, 50), dit_denoiser(tiny_dit)
    labels, seeds = torch.tensor([1, 2]), [5, 6]
    plain = sample(den, s, labels, seeds, (4, 8, 8), 10)
    zero = _Recorder(30, 45, 0.0)
    same = sample(den, s, labels, seeds, (4, 8, 8), 10, terms=[zero], image_indices=torch.tensor([0, 1]))
    assert torch.equal(plain, same)
    assert zero.seen == list(range(45, 29, -1))
    assert torch.equal(zero.done[0], same) and zero.done[2].tolist() == [0, 1]
    pushed = sample(den, s, labels, seeds, (4, 8, 8), 10, terms=[_Recorder(30, 45, 0.05)])
    assert not torch.allclose(plain, pushed)


def test_non_finite_latents_name_the_step_and_the_term(tiny_dit):
    """A NaN that appears mid-chain (issue 25.1) stops sampling with one line naming the step and its source."""
    import copy

    from raydistill.errors import UserError

    s, den = Schedule.linear(1000, 50), dit_denoiser(tiny_dit)
    labels, seeds = torch.tensor([1, 2]), [5, 6]
    with pytest.raises(UserError, match=r"after sampling step 11/50 \(respaced index 39\), first from the guidance "
                                         r"term 'recorder'"):
        sample(den, s, labels, seeds, (4, 8, 8), 10, terms=[_Recorder(30, 39, float("nan"))])
    broken = copy.deepcopy(tiny_dit)
    with torch.no_grad():
        broken.proj_out_2.bias[0] = float("inf")  # a damaged checkpoint
    with pytest.raises(UserError, match=r"after sampling step 1/50 .*first from the model's noise prediction"):
        sample(dit_denoiser(broken), s, labels, seeds, (4, 8, 8), 10)


def test_a_checkpoint_that_turns_nan_writes_no_shard(tmp_path):
    """A DiT whose weights overflow mid-chain: distilling stops with one line and commits nothing (issue 25.1)."""
    from safetensors.torch import load_file, save_file

    from raydistill.config import DistillConfig
    from raydistill.distill import distill_local
    from raydistill.errors import UserError
    from tests.conftest import make_tiny_model

    dit, vae = make_tiny_model(tmp_path / "m")
    w = dit / "diffusion_pytorch_model.safetensors"
    sd = load_file(w)
    sd["proj_out_2.bias"][0] = float("nan")
    save_file(sd, w)
    cfg = DistillConfig(dataset="digits", classes=("0",), ipc=1, steps=3, model=str(dit), vae=str(vae),
                        out=str(tmp_path / "set"))
    with pytest.raises(UserError, match=r"not finite .* after sampling step 1/3 .*the model's noise prediction"):
        distill_local(cfg, device="cpu")
    assert not list((tmp_path / "set").rglob("*.png")) and not (tmp_path / "set" / "manifest.parquet").exists()


def test_cfg_interval_is_config_data_and_part_of_the_set_key(tiny_model):
    """``cfg_interval`` round-trips through YAML as a pair, reaches the generator's sampler, keys the set (a set made
    without it keeps its fingerprint, one made with it gets another), and a bad value is refused at load time."""
    import yaml

    from raydistill.config import DistillConfig
    from raydistill.errors import UserError
    from raydistill.generator import load_generator

    dit, vae = tiny_model
    cfg = DistillConfig.from_dict(yaml.safe_load(f"model: {dit}\nvae: {vae}\ncfg_interval: [80, 580]\n"))
    assert cfg.cfg_interval == (80, 580)
    assert DistillConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    plain = cfg.with_(cfg_interval=None)
    assert "cfg_interval" in cfg.generation_key() and "cfg_interval" not in plain.generation_key()
    assert cfg.fingerprint() != plain.fingerprint()
    gen = load_generator(cfg, list(range(10)), 8, "cpu")
    assert gen.sampler.cfg_interval == (80, 580) and gen.sampler.scale_at(579) == 4.0 and gen.sampler.scale_at(600) == 1
    for bad in ([580, 80], [0, 1000], [-1, 5], [1.5, 3], [True, 5], [80]):
        with pytest.raises(UserError, match="cfg_interval must be two model timesteps"):
            DistillConfig(cfg_interval=bad)
