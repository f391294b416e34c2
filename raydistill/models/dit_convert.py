"""Convert between facebookresearch/DiT state dicts and diffusers ``DiTTransformer2DModel`` ones, and load a DiT from
either format (:func:`load_dit`: a diffusers directory or an original ``.pt``).

Key mapping (checked against diffusers 0.42 ``dit_transformer_2d.py``, ``attention.py``, ``normalization.py`` and
``embeddings.py``; original = DiT ``models.py``)::

    x_embedder.proj.*                 -> pos_embed.proj.*                  (Conv2d, same layout)
    pos_embed  (fixed sincos buffer)  -> dropped (diffusers recomputes it, non-persistent; same values)
    t_embedder.mlp.0.* / mlp.2.*      -> transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1.* / linear_2.*
    y_embedder.embedding_table.weight -> transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight
    blocks.{i}.adaLN_modulation.1.*   -> transformer_blocks.{i}.norm1.linear.*   (6 chunks in the same order:
                                         shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    blocks.{i}.attn.qkv.*             -> transformer_blocks.{i}.attn1.to_q / to_k / to_v  (rows split in 3, q k v)
    blocks.{i}.attn.proj.*            -> transformer_blocks.{i}.attn1.to_out.0.*
    blocks.{i}.mlp.fc1.* / fc2.*      -> transformer_blocks.{i}.ff.net.0.proj.* / ff.net.2.*
    final_layer.adaLN_modulation.1.*  -> proj_out_1.*   (2 chunks, shift then scale in both)
    final_layer.linear.*              -> proj_out_2.*

diffusers keeps a separate timestep/label embedder in *every* block (``norm1.emb``) and the final layer uses block 0's
copy; the original has one shared ``t_embedder``/``y_embedder``, so it is copied into every block (the copies share
storage in the returned dict). The inverse takes block 0's copy and refuses if the copies differ (a DiT trained in
diffusers layout unties them; that cannot be written as an original checkpoint).

Numerics: with the weights mapped exactly, diffusers' DiT still computes two things differently from the original:

* the sinusoidal timestep features: diffusers' ``CombinedTimestepLabelEmbeddings`` hard-codes
  ``downscale_freq_shift=1`` (frequencies ``10000**(-k/127)``) while DiT uses ``10000**(-k/128)``; the cos-then-sin
  order agrees (``flip_sin_to_cos=True``). The features differ by up to ~1.9 at t=999, so this is not negligible;
* the LayerNorm before the MLP (``norm3``) uses the config's ``norm_eps`` (default 1e-5) where DiT uses 1e-6.

:func:`raydistill.models.dit.set_dit_numerics` switches a built model to either behaviour (in place; the timestep
shift is not part of the diffusers config, so it must be reapplied after every ``from_pretrained``).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from raydistill.errors import UserError
from raydistill.models.dit import DIT_SIZES, DiTConfig, build_dit, dit_config_of, original_numerics

FREQ_DIM = 256  # DiT's frequency_embedding_size (diffusers: Timesteps(num_channels=256))
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------------
# sincos position embedding (DiT / MAE get_2d_sincos_pos_embed, numpy float64 like the original)

def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """DiT's fixed position embedding as a ``[1, grid_size**2, embed_dim]`` float32 tensor."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])  # w goes first
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------------------
# key conversion

def _depth(cfg: DiTConfig) -> int:
    if cfg.size not in DIT_SIZES:
        raise UserError(f"unknown DiT size {cfg.size!r}", f"use one of {', '.join(DIT_SIZES)}")
    return DIT_SIZES[cfg.size].depth


_EMB = "norm1.emb."
_SHARED = {  # original key -> diffusers key inside transformer_blocks.{i}.
    "t_embedder.mlp.0.weight": _EMB + "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": _EMB + "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": _EMB + "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": _EMB + "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": _EMB + "class_embedder.embedding_table.weight",
}
_PER_BLOCK = {  # blocks.{i}.<key> -> transformer_blocks.{i}.<value>  (qkv handled separately)
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
}
_TOP = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}


def original_to_diffusers(state_dict: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    """Convert a facebookresearch/DiT state dict to ``DiTTransformer2DModel`` keys (``pos_embed`` is dropped).

    Raises ``KeyError`` for a missing key and ``ValueError`` for keys it does not know (such as Difffit ``gamma``s):
    :func:`load_original_dit` validates user files first and reports problems as :class:`UserError`.
    """
    depth = _depth(cfg)
    sd = dict(state_dict)
    sd.pop("pos_embed", None)
    out: dict[str, Tensor] = {}
    for k, v in _TOP.items():
        out[v] = sd.pop(k)
    shared = {k: sd.pop(k) for k in _SHARED}
    for i in range(depth):
        pre, src = f"transformer_blocks.{i}.", f"blocks.{i}."
        for k, v in _SHARED.items():
            out[pre + v] = shared[k]
        for k, v in _PER_BLOCK.items():
            out[pre + v] = sd.pop(src + k)
        for kind in ("weight", "bias"):
            q, k_, v_ = sd.pop(f"{src}attn.qkv.{kind}").chunk(3, dim=0)
            out[f"{pre}attn1.to_q.{kind}"] = q
            out[f"{pre}attn1.to_k.{kind}"] = k_
            out[f"{pre}attn1.to_v.{kind}"] = v_
    if sd:
        raise ValueError(f"keys not part of a DiT-{cfg.size} state dict: {sorted(sd)[:8]}")
    return out


def diffusers_to_original(state_dict: dict[str, Tensor], cfg: DiTConfig) -> dict[str, Tensor]:
    """Inverse of :func:`original_to_diffusers`; recreates DiT's fixed ``pos_embed`` ([1, T, hidden] float32).

    Uses block 0's timestep/label embedder as the single shared one; raises :class:`UserError` if another block's
    copy differs (then the model has no original-layout equivalent).
    """
    depth = _depth(cfg)
    sd = dict(state_dict)
    out: dict[str, Tensor] = {}
    for k, v in _TOP.items():
        out[k] = sd.pop(v)
    for k, v in _SHARED.items():
        out[k] = sd.pop("transformer_blocks.0." + v)
        for i in range(1, depth):
            other = sd.pop(f"transformer_blocks.{i}.{v}")
            if not torch.equal(other, out[k]):
                raise UserError(f"block {i}'s copy of {k} differs from block 0's: this diffusers DiT has untied "
                                "per-block embedders, which the original DiT layout cannot hold",
                                "keep the model in diffusers format")
    for i in range(depth):
        pre, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for k, v in _PER_BLOCK.items():
            out[dst + k] = sd.pop(pre + v)
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([sd.pop(f"{pre}attn1.to_{n}.{kind}") for n in "qkv"], dim=0)
    if sd:
        raise ValueError(f"keys not part of a diffusers DiT-{cfg.size} state dict: {sorted(sd)[:8]}")
    hidden = out["x_embedder.proj.weight"].shape[0]
    out["pos_embed"] = get_2d_sincos_pos_embed(hidden, cfg.input_size // DIT_SIZES[cfg.size].patch)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# loading an original .pt

def original_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Expected original-layout parameter shapes for ``cfg`` (no model is built)."""
    depth = _depth(cfg)
    sz = DIT_SIZES[cfg.size]
    h, p, c = sz.hidden, sz.patch, cfg.in_channels
    out_ch = c * (2 if cfg.learn_sigma else 1)
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (h, c, p, p), "x_embedder.proj.bias": (h,),
        "pos_embed": (1, (cfg.input_size // p) ** 2, h),
        "t_embedder.mlp.0.weight": (h, FREQ_DIM), "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, h),
        "final_layer.linear.weight": (p * p * out_ch, h), "final_layer.linear.bias": (p * p * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,),
            b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
            b + "mlp.fc1.weight": (4 * h, h), b + "mlp.fc1.bias": (4 * h,),
            b + "mlp.fc2.weight": (h, 4 * h), b + "mlp.fc2.bias": (h,),
            b + "adaLN_modulation.1.weight": (6 * h, h), b + "adaLN_modulation.1.bias": (6 * h,),
        })
    return shapes


def _infer(sd: dict[str, Tensor]) -> dict:
    """What the checkpoint itself says: hidden, in_channels, patch, depth, num_classes, learn_sigma, input_size."""
    w = sd["x_embedder.proj.weight"]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    inferred = {"hidden": hidden, "in_channels": in_ch, "patch": patch, "depth": len(blocks)}
    if "y_embedder.embedding_table.weight" in sd:
        inferred["num_classes"] = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    if "final_layer.linear.weight" in sd and patch:
        inferred["learn_sigma"] = sd["final_layer.linear.weight"].shape[0] // (patch * patch) == 2 * in_ch
    if "pos_embed" in sd and sd["pos_embed"].ndim == 3:
        inferred["input_size"] = round(sd["pos_embed"].shape[1] ** 0.5) * patch
    return inferred


def _fix_hint(inf: dict, cfg: DiTConfig) -> str:
    """The settings that would match the checkpoint, e.g. 'choose --model-size XL/2; set num_classes=1000'."""
    parts = []
    sz = DIT_SIZES[cfg.size]
    if (inf["hidden"], inf["patch"], inf["depth"]) != (sz.hidden, sz.patch, sz.depth):
        names = [n for n, s in DIT_SIZES.items() if (s.hidden, s.patch, s.depth) == (inf["hidden"], inf["patch"],
                                                                                   inf["depth"])]
        parts.append(f"choose --model-size {' or '.join(names)}" if names else
                     f"no registered size matches (depth {inf['depth']}, hidden {inf['hidden']}, patch "
                     f"{inf['patch']}): add it to DIT_SIZES")
    for name in ("num_classes", "input_size", "in_channels", "learn_sigma"):
        if name in inf and inf[name] != getattr(cfg, name):
            parts.append(f"set {name}={inf[name]}")
    return "; ".join(parts) or "check that the checkpoint is a plain facebookresearch DiT state dict"


def _check(sd: dict[str, Tensor], cfg: DiTConfig, path: Path) -> None:
    """Raise UserError on the first key whose presence or shape disagrees with ``cfg``."""
    if "x_embedder.proj.weight" not in sd or sd["x_embedder.proj.weight"].ndim != 4:
        raise UserError(f"{path} is not a DiT checkpoint (no 4-d x_embedder.proj.weight among "
                        f"{len(sd)} keys, e.g. {sorted(sd)[:3]})", "pass an original facebookresearch DiT .pt file")
    inf = _infer(sd)
    want = original_shapes(cfg)
    head = f"DiT checkpoint {path} does not match DiT-{cfg.size}"
    k = "x_embedder.proj.weight"  # hidden size, input channels and patch: checked first, the most telling
    if tuple(sd[k].shape) != want[k]:
        what = (f" (hidden size {inf['hidden']}, expected {want[k][0]})" if inf["hidden"] != want[k][0] else "")
        raise UserError(f"{head}: {k} has shape {tuple(sd[k].shape)}, expected {want[k]}{what}", _fix_hint(inf, cfg))
    if inf["depth"] != DIT_SIZES[cfg.size].depth:
        raise UserError(f"{head}: it has {inf['depth']} blocks (blocks.N.*), expected {DIT_SIZES[cfg.size].depth}",
                        _fix_hint(inf, cfg))
    # the informative keys first, so the message names the key that tells the user what is wrong
    order = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight", "pos_embed"]
    for k in order + [k for k in want if k not in order]:
        if k not in sd:
            if k == "pos_embed":
                continue  # a fixed buffer: tolerate its absence
            raise UserError(f"{head}: key {k} is missing (expected shape {want[k]})", _fix_hint(inf, cfg))
        found = tuple(sd[k].shape)
        if found != want[k]:
            raise UserError(f"{head}: {k} has shape {found}, expected {want[k]}", _fix_hint(inf, cfg))
    unknown = sorted(k for k in sd if k not in want)
    if unknown:
        raise UserError(f"{head}: unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}",
                        "pass a plain facebookresearch DiT state dict")


def _read(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"DiT checkpoint not found: {path}", "pass --model a diffusers directory or a DiT .pt file")
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning would print before our one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).lower()  # an unsafe pickle names a global (class/function) that is not a tensor type
        if "weights only" in msg and any(w in msg for w in ("unsupported global", "allowed global",
                                                              "unsupported class")):
            raise UserError(f"{path} holds Python objects besides tensors and would need unsafe unpickling "
                            "(running code from the file), which raydistill refuses",
                            "re-save it as a plain state dict: torch.save(model.state_dict(), path)") from e
        raise UserError(f"cannot read {path} as a torch checkpoint ({type(e).__name__})",
                        "pass a file written by torch.save") from e
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
        raise UserError(f"cannot read {path} as a torch checkpoint ({type(e).__name__})",
                        "pass a file written by torch.save") from e
    if isinstance(obj, dict) and "ema" in obj:  # DiT's find_model: a training checkpoint uses its EMA weights
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} does not hold a state dict (found {type(obj).__name__})",
                        "pass an original DiT .pt (a state dict, or a training checkpoint with 'ema'/'model')")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{path} is not a state dict of tensors (entry {bad[0]!r})", "pass an original DiT .pt")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def config_from_checkpoint(sd: dict[str, Tensor], size: str | None = None) -> DiTConfig:
    """A :class:`DiTConfig` read off an original state dict; the size is the registry entry with its depth, hidden
    size and patch (heads are not visible in the weights) unless ``size`` is given."""
    if "x_embedder.proj.weight" not in sd:
        raise UserError("the checkpoint is not a DiT state dict (no x_embedder.proj.weight)",
                        "pass an original facebookresearch DiT .pt file")
    inf = _infer(sd)
    if size is None:
        names = [n for n, s in DIT_SIZES.items() if (s.hidden, s.patch, s.depth) == (inf["hidden"], inf["patch"],
                                                                                   inf["depth"])]
        if not names:
            raise UserError(f"no registered DiT size has depth {inf['depth']}, hidden {inf['hidden']}, patch "
                            f"{inf['patch']}", "add it to raydistill.models.dit.DIT_SIZES")
        size = names[0]
    return DiTConfig(size=size, input_size=inf.get("input_size", 32), in_channels=inf["in_channels"],
                     num_classes=inf.get("num_classes", 1000), learn_sigma=inf.get("learn_sigma", True))


def load_original_dit(path: str | Path, cfg: DiTConfig | None = None, return_extras: bool = False,
                      size: str | None = None):
    """Load a facebookresearch/DiT ``.pt`` into an eval-mode ``DiTTransformer2DModel`` built by ``build_dit(cfg)``.

    The file is read with ``weights_only=True`` (no code is ever unpickled). A dict with ``ema`` uses it, else
    ``model``, else the dict itself (DiT's ``find_model``). Shapes are checked against ``cfg`` before building; the
    number of heads is not visible in the weights and comes from the size registry. Keys containing ``gamma``
    (Minimax/Difffit scale factors) are not part of a plain DiT: with ``return_extras=True`` the result is
    ``(model, extras)`` with those tensors under their original keys; otherwise such a file is refused.
    The model keeps whatever numerics ``build_dit`` gives it (see :func:`set_dit_numerics`). With ``cfg=None`` the
    configuration is read off the checkpoint (:func:`config_from_checkpoint`, ``size`` forcing the registry size).
    """
    p = Path(path)
    sd = _read(p)
    extras = {k: v for k, v in sd.items() if "gamma" in k}
    if extras and not return_extras:
        raise UserError(f"{p} is a Difffit/Minimax fine-tuned DiT checkpoint ({len(extras)} extra 'gamma' scale "
                        f"factors, e.g. {sorted(extras)[0]}), not a plain DiT", "use --method minimax to load it")
    sd = {k: v for k, v in sd.items() if k not in extras}
    if cfg is None:
        cfg = config_from_checkpoint(sd, size)
    _check(sd, cfg, p)
    model = build_dit(cfg)
    model.load_state_dict(original_to_diffusers(sd, cfg), strict=True)
    model = model.eval()
    return (model, extras) if return_extras else model


def load_dit(path: str | Path, size: str | None = None, num_classes: int | None = None,
             input_size: int | None = None, device: str | torch.device = "cpu"):
    """Load a DiT from a local diffusers directory or an original DiT ``.pt`` file; returns an eval-mode model.

    ``size``/``num_classes``/``input_size`` are required for ``.pt`` files (they carry no config); for a diffusers
    directory they are checked against its config when given.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"DiT checkpoint not found: {p}", "pass --model a diffusers directory or a DiT .pt file")
    if p.is_dir():
        model = _load_diffusers_dir(p)
        got = dit_config_of(model)
        for name, want in (("size", size), ("num_classes", num_classes), ("input_size", input_size)):
            if want is not None and getattr(got, name) != want:
                raise UserError(f"DiT at {p} has {name}={getattr(got, name)}, expected {want}",
                                "pick the matching --model-size or checkpoint")
    else:
        if num_classes is None and input_size is None:
            model = load_original_dit(p, None, size=size)  # configuration read off the checkpoint
        else:
            model = load_original_dit(p, DiTConfig(size=size or "XL/2", num_classes=num_classes or 1000,
                                                   input_size=input_size or 32))
    return model.to(device).eval()


def _load_diffusers_dir(p: Path):
    from diffusers import DiTTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if not (p / "config.json").exists():
        raise UserError(f"{p} is not a diffusers model directory (no config.json)",
                        "point --model at the folder that holds config.json and the safetensors weights")
    try:
        model = DiTTransformer2DModel.from_pretrained(str(p), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the DiT in {p}: {first}", "check that config.json matches the weights") from e
    return original_numerics(model)
