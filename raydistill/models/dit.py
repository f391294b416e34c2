"""Class-conditional DiT through diffusers' ``DiTTransformer2DModel``: a size registry, building and loading.

Sizes follow DiT's ``DiT_models`` table (depth, hidden size, heads, patch); a tiny test size is one line.
The model's null (unconditional) label is ``num_classes`` (DiT-XL/2: 1000). Loading accepts a local diffusers
directory (``config.json`` + safetensors) or an original facebookresearch DiT ``.pt`` state dict (converted by
:mod:`raydistill.models.dit_convert`; a checkpoint dict with an ``ema`` entry uses the EMA weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from raydistill.errors import UserError


@dataclass(frozen=True)
class DiTSize:
    depth: int
    hidden: int
    heads: int
    patch: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


DIT_SIZES: dict[str, DiTSize] = {
    "XL/2": DiTSize(28, 1152, 16, 2),
    "XL/4": DiTSize(28, 1152, 16, 4),
    "L/2": DiTSize(24, 1024, 16, 2),
    "B/2": DiTSize(12, 768, 12, 2),
    "S/2": DiTSize(12, 384, 6, 2),
    "fmnist": DiTSize(4, 192, 4, 2),  # the built-in Fashion-MNIST model (8x8x4 latents, 16 tokens)
    "fmnist-m": DiTSize(6, 256, 4, 2),  # 2.6x the compute of "fmnist": the second size of the pretraining curve
    "test": DiTSize(2, 32, 2, 2),  # tiny random model for fast tests
}


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to build a DiT; stored next to weights as data."""

    size: str = "fmnist"
    input_size: int = 8  # latent height/width
    in_channels: int = 4
    num_classes: int = 10
    learn_sigma: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def build_dit(cfg: DiTConfig):
    """A freshly initialised ``DiTTransformer2DModel`` for ``cfg`` (eval mode)."""
    from diffusers import DiTTransformer2DModel

    if cfg.size not in DIT_SIZES:
        raise UserError(f"unknown DiT size {cfg.size!r}", f"use one of {', '.join(DIT_SIZES)}")
    sz = DIT_SIZES[cfg.size]
    model = DiTTransformer2DModel(
        num_attention_heads=sz.heads,
        attention_head_dim=sz.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels * (2 if cfg.learn_sigma else 1),
        num_layers=sz.depth,
        sample_size=cfg.input_size,
        patch_size=sz.patch,
        num_embeds_ada_norm=cfg.num_classes,
        norm_eps=1e-6,
    )
    return original_numerics(model).eval()


def original_numerics(model):
    """Make a diffusers DiT compute as facebookresearch/DiT does (timestep frequencies 10000**(-k/128), LayerNorm
    eps 1e-6; see :func:`raydistill.models.dit_convert.set_dit_numerics`). Not saved in diffusers' config, so it is
    applied after every build and load; every DiT in raydistill, trained or loaded, runs with these numerics."""
    from raydistill.models.dit_convert import set_dit_numerics

    return set_dit_numerics(model, original=True)


def dit_config_of(model) -> DiTConfig:
    """Recover the :class:`DiTConfig` of a diffusers DiT from its config."""
    c = model.config
    hidden = c.num_attention_heads * c.attention_head_dim
    size = next((k for k, s in DIT_SIZES.items()
                 if (s.depth, s.hidden, s.heads, s.patch) == (c.num_layers, hidden, c.num_attention_heads,
                                                              c.patch_size)), "custom")
    return DiTConfig(size=size, input_size=c.sample_size, in_channels=c.in_channels, num_classes=c.num_embeds_ada_norm,
                     learn_sigma=c.out_channels == 2 * c.in_channels)


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
        from raydistill.models.dit_convert import load_original_dit

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
