"""DiffFit scale factors on a diffusers DiT and Minimax's trainable set (spec 1.2), plus official Minimax checkpoints.

Spec 1.2 (MinimaxDiffusion ``models.py``): the first half of the blocks (14 of DiT-XL/2's 28) carry per-channel
scale factors initialised to 1:

* in the attention, ``gamma1`` (size 3D) scales the qkv projection's output and ``gamma2`` (size D) the output
  projection's;
* in the block, ``gamma1`` / ``gamma2`` (size D each) scale the attention and MLP residual branches, multiplying the
  adaLN gate: ``x + gamma1 * gate_msa * attn(...)``, ``x + gamma2 * gate_mlp * mlp(...)``.

They are added to a diffusers ``DiTTransformer2DModel`` in place, as parameters named ``gamma`` on the module whose
output they scale, applied by a forward hook (the hook reads the parameter from the module it is called on, so
``copy.deepcopy`` of the model -- the EMA -- scales with its own copy). The diffusers model stays an ordinary
``DiTTransformer2DModel`` that the sampler calls as before. Key mapping to the original layout::

    blocks.{i}.attn.gamma1[0:D], [D:2D], [2D:3D] -> transformer_blocks.{i}.attn1.to_q / to_k / to_v .gamma
    blocks.{i}.attn.gamma2                       -> transformer_blocks.{i}.attn1.to_out.0.gamma
    blocks.{i}.gamma1  (attention branch)        -> transformer_blocks.{i}.attn1.gamma
    blocks.{i}.gamma2  (MLP branch)              -> transformer_blocks.{i}.ff.gamma

With every gamma at 1 the hooks multiply by exactly 1.0, so outputs are bit-identical to the plain model.

Trainable set (``mark_difffit_trainable``): every parameter whose name contains ``bias``, ``gamma`` or is the
label-embedding table (``y_embed``; ``norm`` matches nothing in DiT). diffusers keeps one timestep/label embedder per
block where the original shares one; a model converted from an original checkpoint holds equal copies, and
:func:`apply_difffit` ties them (one module shared by every block) so the table and the timestep-MLP biases are
trained once, as in the original. A DiT trained in diffusers layout (the built-in Fashion-MNIST model) has different
per-block copies; they stay untied and every copy is trainable (deliberate: tying would change the model).

Deviation: the original hard-codes ``use_gamma = [True] * 14 + [False] * 14``, so a DiT shallower than 28 blocks gets
gammas in all of its first ``min(depth, 14)`` blocks; here the default is the first ``depth // 2`` (the spec's "first
half"), configurable, and official checkpoints load with whatever blocks their keys name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from raydistill.errors import UserError
from raydistill.models.dit import DIT_SIZES, DiTConfig

_ORIG_GAMMA = re.compile(r"^blocks\.(\d+)\.(attn\.gamma1|attn\.gamma2|gamma1|gamma2)$")


def _scale_output(module: nn.Module, args, output: Tensor) -> Tensor:
    """Forward hook: ``output * module.gamma`` (gamma [D] broadcasts over [B, T, D])."""
    return output * module.gamma


def _gamma_modules(block) -> dict[str, nn.Module]:
    """The modules of one diffusers block that carry a gamma, by short name."""
    return {"to_q": block.attn1.to_q, "to_k": block.attn1.to_k, "to_v": block.attn1.to_v,
            "proj": block.attn1.to_out[0], "attn": block.attn1, "mlp": block.ff}


def default_gamma_blocks(depth: int) -> list[int]:
    """The first half of the blocks (spec 1.2: 14 of 28)."""
    return list(range(depth // 2))


def gamma_blocks_of(model) -> list[int]:
    """Indices of the blocks that carry DiffFit gammas."""
    return [i for i, b in enumerate(model.transformer_blocks) if isinstance(getattr(b.ff, "gamma", None), nn.Parameter)]


def embedders_tied(model) -> bool:
    """Whether every block uses the same timestep/label embedder module (see :func:`tie_embedders`)."""
    first = model.transformer_blocks[0].norm1.emb
    return all(b.norm1.emb is first for b in model.transformer_blocks)


def tie_embedders(model, check: bool = True) -> bool:
    """Make every block use block 0's timestep/label embedder (the original DiT's single shared one).

    With ``check`` it only ties when every block's copy equals block 0's (true for models converted from original
    checkpoints); returns whether the embedders are tied afterwards. Tying equal copies does not change outputs.
    """
    blocks = model.transformer_blocks
    first = blocks[0].norm1.emb
    if check:
        ref = first.state_dict()
        for b in blocks[1:]:
            if b.norm1.emb is first:
                continue
            other = b.norm1.emb.state_dict()
            if any(v.is_meta for v in ref.values()) or not all(torch.equal(ref[k], other[k]) for k in ref):
                return False
    for b in blocks[1:]:
        b.norm1.emb = first
    return True


def apply_difffit(model, gamma_blocks: Sequence[int] | None = None, tie: bool | None = None):
    """Add DiffFit gammas (all 1) to ``model``'s ``gamma_blocks`` (default: the first half) and mark the trainable set.

    ``tie``: True ties the per-block embedders, False leaves them, None ties them when the copies are equal.
    Returns the model (changed in place); its ``requires_grad`` flags are Minimax's trainable set.
    """
    blocks = model.transformer_blocks
    if gamma_blocks_of(model):
        raise ValueError("this DiT already carries DiffFit gammas")
    idx = default_gamma_blocks(len(blocks)) if gamma_blocks is None else sorted(set(int(i) for i in gamma_blocks))
    if any(not 0 <= i < len(blocks) for i in idx):
        raise UserError(f"gamma blocks {idx} are out of range for a {len(blocks)}-block DiT",
                        "use block indices 0..depth-1")
    if tie is None:
        tie_embedders(model, check=True)
    elif tie:
        tie_embedders(model, check=False)
    for i in idx:
        for mod in _gamma_modules(blocks[i]).values():
            width = mod.out_features if isinstance(mod, nn.Linear) else blocks[i].ff.net[2].out_features
            ref = next(model.parameters())
            mod.register_parameter("gamma", nn.Parameter(torch.ones(width, device=ref.device, dtype=ref.dtype)))
            mod.register_forward_hook(_scale_output)
    mark_difffit_trainable(model)
    return model


def is_difffit_trainable(name: str) -> bool:
    """Spec 1.2's name rule in diffusers naming: ``bias``, ``gamma``, or the label table (original ``y_embed``)."""
    return "bias" in name or "gamma" in name or "class_embedder.embedding_table" in name


def mark_difffit_trainable(model) -> int:
    """Set ``requires_grad`` to Minimax's trainable set; returns the trainable parameter count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_difffit_trainable(name))
        n += p.numel() if p.requires_grad else 0
    return n


def trainable_state(model) -> dict[str, Tensor]:
    """The trainable parameters by (deduplicated) name: the only tensors a fine-tune changes."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, Tensor], source: str = "the fine-tune") -> None:
    """Copy ``tensors`` (from :func:`trainable_state`) into ``model`` in place; the names must be exactly the trainable
    set (by the name rule, whatever ``requires_grad`` says now) and the shapes must match."""
    params = dict(model.named_parameters())
    want = {n for n in params if is_difffit_trainable(n)}
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise UserError(f"{source} does not fit this DiT (missing {missing[:3]}, unexpected {extra[:3]})",
                        "fine-tune again from this base model")
    with torch.no_grad():
        for n, v in tensors.items():
            if tuple(v.shape) != tuple(params[n].shape):
                raise UserError(f"{source}: {n} has shape {tuple(v.shape)}, the DiT expects {tuple(params[n].shape)}",
                                "fine-tune again from this base model")
            params[n].copy_(v)


def difffit_trainable_count(cfg: DiTConfig, gamma_blocks: int | None = None) -> dict[str, int]:
    """Spec 1.2's trainable count from the configuration alone (original layout: one shared embedder).

    Returns ``{"label_table", "biases", "gammas", "total"}``. DiT-XL/2, 1000 classes: 1,153,152 + 489,632 + 96,768
    = 1,739,552 (spec: ~1.7 M = 1.15 M + 0.49 M + 0.10 M).
    """
    sz = DIT_SIZES[cfg.size]
    d, p = sz.hidden, sz.patch
    out_ch = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    g = sz.depth // 2 if gamma_blocks is None else gamma_blocks
    label = (cfg.num_classes + 1) * d
    per_block = 3 * d + d + 4 * d + d + 6 * d  # qkv, proj, fc1, fc2, adaLN biases
    biases = d + 2 * d + sz.depth * per_block + 2 * d + p * p * out_ch  # patch embed, t-MLP, blocks, final layer
    gammas = g * (3 * d + d + d + d)
    return {"label_table": label, "biases": biases, "gammas": gammas, "total": label + biases + gammas}


# ----------------------------------------------------------------------------------------------------------------------
# original layout (official Minimax checkpoints)

def gammas_to_diffusers(extras: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original ``blocks.{i}.{attn.gamma1, attn.gamma2, gamma1, gamma2}`` -> diffusers ``...gamma`` names."""
    out: dict[str, Tensor] = {}
    for k, v in extras.items():
        m = _ORIG_GAMMA.match(k)
        if m is None:
            raise UserError(f"unknown scale factor {k!r} in a Minimax checkpoint",
                            "expected blocks.N.attn.gamma1/gamma2 and blocks.N.gamma1/gamma2")
        pre, kind = f"transformer_blocks.{m.group(1)}.", m.group(2)
        if kind == "attn.gamma1":
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3)):
                out[f"{pre}attn1.{name}.gamma"] = part
        else:
            out[pre + {"attn.gamma2": "attn1.to_out.0.gamma", "gamma1": "attn1.gamma", "gamma2": "ff.gamma"}[kind]] = v
    return out


def gammas_to_original(model) -> dict[str, Tensor]:
    """The model's gammas in original-layout keys (inverse of :func:`gammas_to_diffusers`)."""
    out: dict[str, Tensor] = {}
    for i in gamma_blocks_of(model):
        mods = _gamma_modules(model.transformer_blocks[i])
        b = f"blocks.{i}."
        out[b + "attn.gamma1"] = torch.cat([mods[n].gamma.detach() for n in ("to_q", "to_k", "to_v")])
        out[b + "attn.gamma2"] = mods["proj"].gamma.detach().clone()
        out[b + "gamma1"] = mods["attn"].gamma.detach().clone()
        out[b + "gamma2"] = mods["mlp"].gamma.detach().clone()
    return out


def load_minimax_checkpoint(path: str | Path, size: str | None = None):
    """Load an official Minimax fine-tuned DiT (original ``.pt`` with ``ema`` and DiffFit gammas, e.g.
    ``checkpoints/0012000.pt``); returns an eval-mode diffusers DiT with its gammas (the EMA weights, spec 1.1).

    The file is read with ``weights_only=True``; the blocks that carry gammas are read off the keys, and every
    block's four gammas must be present with the right sizes.
    """
    from raydistill.models.dit_convert import load_original_dit

    p = Path(path)
    model, extras = load_original_dit(p, None, return_extras=True, size=size)
    if not extras:
        raise UserError(f"{p} has no DiffFit 'gamma' scale factors: it is a plain DiT, not a Minimax checkpoint",
                        "pass it as --model and fine-tune it with `raydistill finetune`")
    mapped = gammas_to_diffusers(extras)
    blocks = sorted({int(k.split(".")[1]) for k in mapped})
    if blocks[-1] >= len(model.transformer_blocks):
        raise UserError(f"{p} has gammas for block {blocks[-1]} but the DiT has {len(model.transformer_blocks)} "
                        "blocks", "pass a consistent Minimax checkpoint")
    apply_difffit(model, blocks, tie=True)  # converted from the original layout: the embedder copies are equal
    params = dict(model.named_parameters())
    want = {n for n in params if n.endswith(".gamma")}
    if set(mapped) != want:
        raise UserError(f"{p}: incomplete DiffFit gammas (missing {sorted(want - set(mapped))[:3]})",
                        "pass a complete Minimax checkpoint")
    with torch.no_grad():
        for n, v in mapped.items():
            if v.shape != params[n].shape:
                raise UserError(f"{p}: {n} has shape {tuple(v.shape)}, expected {tuple(params[n].shape)}",
                                "pass a checkpoint of this DiT size")
            params[n].copy_(v)
    return model.eval()
