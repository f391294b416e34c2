"""Class-conditional DiT through diffusers' ``DiTTransformer2DModel``: a size registry, building, numerics.

Sizes follow DiT's ``DiT_models`` table (depth, hidden size, heads, patch); a tiny test size is one line.
The model's null (unconditional) label is ``num_classes`` (DiT-XL/2: 1000). Loading (a local diffusers directory or
an original facebookresearch DiT ``.pt``) is :func:`raydistill.models.dit_convert.load_dit`, which imports this
module and never the other way round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    "fmnist": DiTSize(4, 192, 4, 2),  # the first built-in Fashion-MNIST model (8x8x4 latents, 16 tokens; until 12-02)
    "fmnist-m": DiTSize(6, 256, 4, 2),  # 2.6x the compute of "fmnist": the second size of the pretraining curve
    "fmnist/4": DiTSize(4, 192, 4, 4),  # the built-in model: "fmnist" with patch 4, 16 tokens of 16x16x4 latents
    "fmnist-m/4": DiTSize(6, 256, 4, 4),  # "fmnist-m" with patch 4: the second size of the curve on those latents
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
    eps 1e-6; see :func:`set_dit_numerics`). Not saved in diffusers' config, so it is
    applied after every build and load; every DiT in raydistill, trained or loaded, runs with these numerics."""
    return set_dit_numerics(model, original=True)


def set_dit_numerics(model, original: bool = True):
    """Make a diffusers DiT compute exactly like facebookresearch/DiT (``original=True``) or like stock diffusers.

    Sets every block's timestep ``downscale_freq_shift`` (0 original, 1 diffusers) and the pre-MLP LayerNorm eps
    (1e-6 original, ``config.norm_eps`` diffusers). Returns the model (changed in place).
    """
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0 if original else 1
        block.norm3.eps = 1e-6 if original else model.config.norm_eps
    return model


def dit_config_of(model) -> DiTConfig:
    """Recover the :class:`DiTConfig` of a diffusers DiT from its config."""
    c = model.config
    hidden = c.num_attention_heads * c.attention_head_dim
    size = next((k for k, s in DIT_SIZES.items()
                 if (s.depth, s.hidden, s.heads, s.patch) == (c.num_layers, hidden, c.num_attention_heads,
                                                              c.patch_size)), "custom")
    return DiTConfig(size=size, input_size=c.sample_size, in_channels=c.in_channels, num_classes=c.num_embeds_ada_norm,
                     learn_sigma=c.out_channels == 2 * c.in_channels)
