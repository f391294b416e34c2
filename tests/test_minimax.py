"""Minimax diffusion (spec 1): the minimax criteria, DiffFit gammas and trainable set, official checkpoints, the
resumable fine-tune, phase routing at sampling, and the errors a user meets."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from raydistill.errors import UserError
from raydistill.methods.minimax.difffit import (
    apply_difffit,
    difffit_trainable_count,
    gamma_blocks_of,
    gammas_to_original,
    load_minimax_checkpoint,
)
from raydistill.methods.minimax.finetune import FinetuneConfig, finetune, phase_chunks
from raydistill.methods.minimax.losses import ClassMemory, cosine_matrix, minimax_class_terms, minimax_loss
from raydistill.models.dit import DiTConfig, build_dit
from raydistill.models.dit_convert import load_dit, original_to_diffusers
from tests.conftest import needs_fmnist
from tests.test_dit_loading import _modulate, _random_original, _ref_pos_embed, _ref_timestep_embedding

CFG = DiTConfig(size="test", input_size=8, in_channels=4, num_classes=10)


def _unit(*coords: float, d: int = 16) -> torch.Tensor:
    """A [1, 4, 2, 2] latent whose flattened first coordinates are ``coords``."""
    v = torch.zeros(d)
    v[:len(coords)] = torch.tensor(coords)
    return v.view(1, 4, 2, 2)


# ---------------------------------------------------------------------------------------------------------------------
# the minimax criteria on hand-made latents

def test_minimax_terms_pick_least_similar_real_and_most_similar_prediction():
    x0 = _unit(1, 0)  # the class's prediction in the batch
    real = torch.cat([_unit(1, 0), _unit(1, 1), _unit(1, 2)])  # cos 1, 0.707, 0.447: the least similar is the third
    pseudo = torch.cat([_unit(0, 1), _unit(1, 1), _unit(-1, 0)])  # cos 0, 0.707, -1: the most similar is the second
    l_r, l_d = minimax_class_terms(x0, real, pseudo)
    assert l_r.item() == pytest.approx(1 - 1 / math.sqrt(5), abs=1e-6)
    assert l_d.item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert torch.allclose(cosine_matrix(x0, real), torch.tensor([[1.0, 1 / math.sqrt(2), 1 / math.sqrt(5)]]))

    # signs: a gradient step on L_r moves x0_hat towards the least similar real (cos to it rises), one on L_d moves it
    # away from the most similar past prediction (cos to it falls)
    x = x0.clone().requires_grad_(True)
    (g_r,) = torch.autograd.grad(minimax_class_terms(x, real, pseudo)[0], x)
    (g_d,) = torch.autograd.grad(minimax_class_terms(x, real, pseudo)[1], x)
    step_r, step_d = x0 - 0.1 * g_r, x0 - 0.1 * g_d
    assert F.cosine_similarity(step_r.flatten(), real[2].flatten(), dim=0) > 1 / math.sqrt(5) + 1e-3
    assert F.cosine_similarity(step_d.flatten(), pseudo[1].flatten(), dim=0) < 1 / math.sqrt(2) - 1e-3
    # only the selected entries get gradient: moving towards r_3 = (1, 2) raises the 2nd coordinate
    assert g_r.flatten()[1] < 0 and g_d.flatten()[1] > 0


def test_minimax_loss_weights_classes_and_skips_unseen_ones():
    mem = ClassMemory(size=3)
    x0 = torch.cat([_unit(1, 0), _unit(0, 1)])  # class 0, class 1
    labels = torch.tensor([0, 1])
    total, pos, neg = minimax_loss(x0, labels, mem)
    assert total.item() == 0.0  # first time a class is seen: no term
    mem.push(0, torch.cat([_unit(1, 1), _unit(1, 2)]), _unit(1, 1))
    total, pos, neg = minimax_loss(x0, labels, mem, lambda_pos=0.002, lambda_neg=0.008)
    l_r, l_d = 1 - 1 / math.sqrt(5), 1 / math.sqrt(2)
    assert pos.item() == pytest.approx(0.002 * l_r / 2, rel=1e-5)  # divided by the 2 classes in the batch
    assert neg.item() == pytest.approx(0.008 * l_d / 2, rel=1e-5)
    assert total.item() == pytest.approx(pos.item() + neg.item())
    # FIFO: the oldest entries leave first
    for k in range(5):
        mem.push(1, _unit(k + 1.0), _unit(k + 1.0))
    assert mem.real[1].shape[0] == 3 and torch.equal(mem.real[1][:, 0, 0, 0], torch.tensor([3.0, 4.0, 5.0]))


def test_phases_split_only_above_twenty_classes():
    cfg = FinetuneConfig()
    assert phase_chunks(list(range(20)), cfg) == [list(range(20))]
    chunks = phase_chunks(list(range(100)), cfg)
    assert len(chunks) == 10 and chunks[3] == list(range(30, 40))


# ---------------------------------------------------------------------------------------------------------------------
# DiffFit trainable set and gammas

def test_trainable_count_xl2_matches_spec_without_building_weights():
    xl = DiTConfig(size="XL/2", input_size=32, num_classes=1000)
    n = difffit_trainable_count(xl)
    assert n == {"label_table": 1_153_152, "biases": 489_632, "gammas": 96_768, "total": 1_739_552}
    assert round(n["total"] / 1e6, 1) == 1.7  # spec 1.2: ~1.7 M = 1.15 M + 0.49 M + 0.10 M
    # the real marking on DiT-XL/2 built on the meta device (shapes only, no memory, no forward)
    with torch.device("meta"):
        model = build_dit(xl)
    apply_difffit(model, tie=True)  # a model converted from the original checkpoint holds tied embedders
    assert next(model.parameters()).is_meta
    assert gamma_blocks_of(model) == list(range(14))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n["total"]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert 670e6 < frozen + n["total"] < 680e6  # ~675 M in all, as the original


def test_gammas_at_one_reproduce_the_base_model_and_are_live(tiny_model):
    dit_path, _ = tiny_model
    base = load_dit(dit_path)
    ft = apply_difffit(load_dit(dit_path))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 4, 10])
    with torch.no_grad():
        want = base(x, timestep=t, class_labels=y).sample
        assert torch.equal(ft(x, timestep=t, class_labels=y).sample, want)
        ft.transformer_blocks[0].ff.gamma.fill_(0.5)
        assert not torch.allclose(ft(x, timestep=t, class_labels=y).sample, want)
    names = {n for n, p in ft.named_parameters() if p.requires_grad}
    assert "transformer_blocks.0.attn1.to_q.gamma" in names and "transformer_blocks.1.ff.gamma" not in names
    assert all("bias" in n or "gamma" in n or "embedding_table" in n for n in names)
    assert not any(p.requires_grad for n, p in ft.named_parameters() if n.endswith(".weight")
                   and "embedding_table" not in n)


# ---------------------------------------------------------------------------------------------------------------------
# official Minimax checkpoints (original layout with gammas, "ema" entry)

def _ref_minimax_forward(sd, x, t, y, heads=2, patch=2):
    """MinimaxDiffusion ``models.py`` forward on an original state dict with gammas (blocks without them: 1)."""
    def lin(h, k):
        return F.linear(h, sd[k + ".weight"], sd[k + ".bias"])

    hid = sd["x_embedder.proj.weight"].shape[0]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = h + _ref_pos_embed(hid, int(h.shape[1] ** 0.5))
    c = lin(F.silu(lin(_ref_timestep_embedding(t), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda z: F.layer_norm(z, (hid,), eps=1e-6)  # noqa: E731
    B, N, C = h.shape
    for i in range(depth):
        b = f"blocks.{i}."
        one = torch.ones(C)
        g_qkv, g_proj = sd.get(b + "attn.gamma1", torch.ones(3 * C)), sd.get(b + "attn.gamma2", one)
        g1, g2 = sd.get(b + "gamma1", one), sd.get(b + "gamma2", one)
        s_msa, sc_msa, gate_msa, s_mlp, sc_mlp, gate_mlp = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = _modulate(ln(h), s_msa, sc_msa)
        qkv = (g_qkv * lin(a, b + "attn.qkv")).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = g_proj * lin((attn @ v).transpose(1, 2).reshape(B, N, C), b + "attn.proj")
        h = h + g1 * gate_msa.unsqueeze(1) * a
        m = lin(F.gelu(lin(_modulate(ln(h), s_mlp, sc_mlp), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g2 * gate_mlp.unsqueeze(1) * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(_modulate(ln(h), shift, scale), "final_layer.linear")
    cout, g = h.shape[-1] // (patch * patch), int(N ** 0.5)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(B, g, g, patch, patch, cout))
    return h.reshape(B, cout, g * patch, g * patch)


def _with_gammas(sd: dict, blocks: list[int], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hid = sd["x_embedder.proj.weight"].shape[0]
    out = dict(sd)
    for i in blocks:
        for k, n in (("attn.gamma1", 3 * hid), ("attn.gamma2", hid), ("gamma1", hid), ("gamma2", hid)):
            out[f"blocks.{i}.{k}"] = 1.0 + 0.3 * torch.randn(n, generator=gen)
    return out


def test_official_minimax_checkpoint_loads_its_ema_with_gammas(tmp_path):
    ema = _with_gammas(_random_original(CFG, 0), [0], seed=1)  # "test" DiT: 2 blocks, gammas in the first
    raw = _with_gammas(_random_original(CFG, 2), [0], seed=3)
    torch.save({"model": raw, "ema": ema, "opt": {"lr": 1e-3}}, tmp_path / "0012000.pt")
    model = load_minimax_checkpoint(tmp_path / "0012000.pt", size="test")
    assert gamma_blocks_of(model) == [0]
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t, y = torch.tensor([0, 1, 500, 999]), torch.tensor([0, 3, 10, 9])
    with torch.no_grad():
        got = model(x, timestep=t, class_labels=y).sample
    want = _ref_minimax_forward(ema, x, t, y)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, _ref_minimax_forward(raw, x, t, y), atol=1e-3)  # the EMA, not "model"
    assert not torch.allclose(got, _ref_minimax_forward(_random_original(CFG, 0), x, t, y), atol=1e-3)  # gammas live
    back = gammas_to_original(model)
    assert set(back) == {k for k in ema if "gamma" in k} and all(torch.equal(back[k], ema[k]) for k in back)


def test_plain_or_broken_checkpoints_are_refused_as_user_errors(tmp_path):
    plain = _random_original(CFG, 0)
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="plain DiT, not a Minimax checkpoint"):
        load_minimax_checkpoint(tmp_path / "plain.pt", size="test")
    partial = _with_gammas(plain, [0], seed=1)
    del partial["blocks.0.gamma2"]
    torch.save({"ema": partial}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="incomplete DiffFit gammas"):
        load_minimax_checkpoint(tmp_path / "partial.pt", size="test")
    # the plain loader still refuses the gammas and points at the method
    torch.save({"ema": _with_gammas(plain, [0], seed=1)}, tmp_path / "mm.pt")
    from raydistill.models.dit_convert import load_original_dit

    with pytest.raises(UserError, match="--method minimax"):
        load_original_dit(tmp_path / "mm.pt", CFG)


def test_original_converted_model_ties_embedders_and_keeps_outputs():
    model = build_dit(CFG)
    model.load_state_dict(original_to_diffusers(_random_original(CFG, 0), CFG))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([3, 700]), torch.tensor([2, 7])
    with torch.no_grad():
        want = model(x, timestep=t, class_labels=y).sample
        apply_difffit(model)
        assert model.transformer_blocks[1].norm1.emb is model.transformer_blocks[0].norm1.emb
        assert torch.equal(model(x, timestep=t, class_labels=y).sample, want)
    tables = [n for n, p in model.named_parameters() if "embedding_table" in n and p.requires_grad]
    assert tables == ["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]  # trained once


# ---------------------------------------------------------------------------------------------------------------------
# the fine-tune: resumable, outputs, sampling

TINY_FT = dict(steps=6, ckpt_every=2, log_every=1, finetune_ipc=4, memory_size=4, ema_decay=0.9)


@needs_fmnist
def test_interrupted_finetune_resumes_to_the_same_weights(tiny_model, tmp_path, fmnist):
    dit, vae = tiny_model
    ds = fmnist
    cfg = FinetuneConfig(**TINY_FT)  # 2 classes x 4 images: 1 step per epoch, so 6 epochs and 6 permutations
    labels = [0, 1]
    finetune(ds, dit, vae, tmp_path / "a", cfg, labels=labels, device="cpu")

    class Stop(KeyboardInterrupt):
        pass

    def interrupt(msg: str) -> None:
        if "step 3/6" in msg:  # after step 3: the last checkpoint is step 2
            raise Stop

    with pytest.raises(Stop):
        finetune(ds, dit, vae, tmp_path / "b", cfg, labels=labels, device="cpu", progress=interrupt)
    assert not (tmp_path / "b" / "phase-00" / "ema.safetensors").exists()
    said: list[str] = []
    finetune(ds, dit, vae, tmp_path / "b", cfg, labels=labels, device="cpu", progress=said.append)
    assert any("resumed at step 2/6" in m for m in said)
    for name in ("ema.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "a" / "phase-00" / name), load_file(tmp_path / "b" / "phase-00" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    # training moved the weights, and the outputs are small: only the trainable tensors
    base = dict(apply_difffit(load_dit(dit)).named_parameters())
    raw = load_file(tmp_path / "a" / "phase-00" / "model.safetensors")
    assert any(not torch.equal(raw[k], base[k].detach()) for k in raw)
    assert sum(v.numel() for v in raw.values()) < 0.2 * sum(p.numel() for p in base.values())
    index = json.loads((tmp_path / "a" / "minimax.json").read_text())
    assert index["complete"] and index["base"]["sha256"] and len(index["phases"]) == 1
    info = json.loads((tmp_path / "a" / "phase-00" / "finetune.json").read_text())
    assert info["gamma_blocks"] == [0] and [r["step"] for r in info["log"]] == [1, 2, 3, 4, 5, 6]
    # a rerun with other settings into the same folder is refused
    with pytest.raises(UserError, match="another base model or other classes"):
        finetune(ds, dit, vae, tmp_path / "a", cfg, labels=[0, 2], device="cpu")


@needs_fmnist
def test_minimax_sampling_routes_each_class_to_its_phase(tiny_model, tmp_path, fmnist):
    from raydistill.config import DistillConfig
    from raydistill.generator import load_generator

    dit, vae = tiny_model
    ds = fmnist
    cfg = FinetuneConfig(**{**TINY_FT, "steps": 2, "max_classes": 2, "phase_size": 2, "finetune_ipc": 8})
    index = finetune(ds, dit, vae, tmp_path / "ft", cfg, labels=[0, 1, 2], device="cpu")
    assert [p["labels"] for p in index["phases"]] == [[0, 1], [2]]
    dcfg = DistillConfig(method="minimax", model=str(dit), vae=str(vae), steps=4, extra={"finetune": str(tmp_path /
                                                                                                        "ft")})
    gen = load_generator(dcfg, ds.dit_labels, ds.image_size, device="cpu")
    both = gen.sample_latents([0, 2], [0, 0], seed=0)  # one batch across two phases
    gen.router.activate(0)
    a = gen._sample([0], [0], 0, (), None)
    gen.router.activate(1)
    b = gen._sample([2], [0], 0, (), None)
    assert torch.equal(both[0], a[0]) and torch.equal(both[1], b[0])
    # the phases' weights differ from each other and from the base
    t0, t1 = gen.router.phase_tensors
    assert any(not torch.equal(t0[k], t1[k]) for k in t0)
    # a fine-tune of another base model is refused
    other = tmp_path / "other"
    from tests.conftest import make_tiny_model

    odit, _ = make_tiny_model(other, seed=1)
    with pytest.raises(UserError, match="made from another base model"):
        load_generator(dcfg.with_(model=str(odit)), ds.dit_labels, ds.image_size, device="cpu")


@needs_fmnist
def test_distill_minimax_writes_a_set_and_missing_finetunes_are_one_line_errors(tiny_model, tmp_path):
    from raydistill.cli import main
    from raydistill.config import BUILTIN_MODEL, DistillConfig
    from raydistill.distill import distill_local
    from raydistill.methods.minimax.router import finetune_source

    dit, vae = tiny_model
    rc = main(["finetune", "--local", "--model", str(dit), "--vae", str(vae), "--classes", "0,1", "--steps", "2",
               "--finetune-ipc", "4", "--out", str(tmp_path / "ft"), "--device", "cpu"])
    assert rc == 0 and (tmp_path / "ft" / "phase-00" / "ema.safetensors").exists()
    cfg = DistillConfig(method="minimax", model=str(dit), vae=str(vae), classes=("0", "1"), ipc=2, steps=3,
                        out=str(tmp_path / "set"), extra={"finetune": str(tmp_path / "ft")})
    res = distill_local(cfg, device="cpu")
    assert len(res.rows) == 4 and {r["method"] for r in res.rows} == {"minimax"}
    # a class the fine-tune does not cover
    with pytest.raises(UserError, match="does not cover model label 2"):
        distill_local(cfg.with_(classes=("0", "2"), out=str(tmp_path / "set2")), device="cpu")
    # no fine-tune for a user model, and a folder that is not one
    with pytest.raises(UserError, match="needs a Minimax fine-tune") as e:
        finetune_source(cfg.with_(extra={}))
    assert "raydistill finetune" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a Minimax fine-tune"):
        finetune_source(cfg.with_(extra={"finetune": str(tmp_path)}))
    # the built-in model without its fine-tune: the CLI prints one line telling the user to run `raydistill finetune`
    if (BUILTIN_MODEL / "minimax" / "minimax.json").exists():
        pytest.skip("the built-in model's fine-tune exists here")
    with pytest.raises(UserError) as e:
        finetune_source(DistillConfig(method="minimax"))
    assert "run `raydistill finetune`" in str(e.value) and "\n" not in str(e.value)
