"""The latent autoencoder: diffusers ``AutoencoderKL`` from a local directory, with its latent scale factor.

``encode`` maps images in [-1, 1] to ``E(x) * scale`` (posterior sample or mean; spec: MGD3 uses the mean);
``decode`` maps latents back with ``D(z / scale)``. Images smaller than the VAE's native size (Fashion-MNIST's
28 px in the built-in 32 px VAE) are padded with the background value -1 and cropped back after decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from raydistill.errors import UserError

SD_SCALE = 0.18215  # Stable Diffusion VAE latent scale (spec 0.1)


class LatentCodec(torch.nn.Module):
    """Wraps an ``AutoencoderKL``: images [B, C, H, W] in [-1, 1] <-> latents [B, 4, h, w]."""

    def __init__(self, vae, image_size: int | None = None) -> None:
        super().__init__()
        self.vae = vae.eval()
        self.scale = float(getattr(vae.config, "scaling_factor", SD_SCALE))
        self.native = int(vae.config.sample_size)
        self.image_size = image_size or self.native

    @property
    def pad(self) -> int:
        return (self.native - self.image_size) // 2 if self.image_size < self.native else 0

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, value=-1.0)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return z * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(z / self.scale).sample
        if self.pad:
            p = self.pad
            img = img[..., p:p + self.image_size, p:p + self.image_size]
        return img


def build_small_vae(channels: int = 1, sample_size: int = 32, block_out: tuple[int, ...] = (16, 32, 32),
                    latent_channels: int = 4, scaling_factor: float = 1.0, layers_per_block: int = 1):
    """The built-in small ``AutoencoderKL``: ``len(block_out)`` blocks, downsampling x2 between consecutive ones
    (three blocks: x4, 8x8 latents of 32 px images; two blocks: x2, 16x16 latents)."""
    from diffusers import AutoencoderKL

    n = len(block_out)
    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out,
                         layers_per_block=layers_per_block,
                         latent_channels=latent_channels, norm_num_groups=min(16, block_out[0]),
                         sample_size=sample_size, scaling_factor=scaling_factor)


def load_vae(path: str | Path, image_size: int | None = None, device: str | torch.device = "cpu") -> LatentCodec:
    """Load an ``AutoencoderKL`` from a local diffusers directory (e.g. sd-vae-ft-mse) as a :class:`LatentCodec`."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    p = Path(path)
    if not (p / "config.json").exists():
        raise UserError(f"VAE not found at {p} (no config.json)", "pass --vae a local diffusers AutoencoderKL folder")
    try:
        vae = AutoencoderKL.from_pretrained(str(p), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the VAE in {p}: {first}", "check that config.json matches the weights") from e
    return LatentCodec(vae, image_size=image_size).to(device).eval()


@torch.no_grad()
def encode_images(codec, images_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> VAE posterior-mean latents ``E(x).mean * scale`` [N, c, h, w] (float32, CPU)."""
    if images_uint8.dim() != 4:
        raise UserError(f"images must be [N, C, H, W], got shape {tuple(images_uint8.shape)}", "pass a 4-d batch")
    device = next(codec.parameters()).device
    out = []
    for start in range(0, images_uint8.shape[0], batch):
        x = images_uint8[start:start + batch].to(device=device, dtype=torch.float32) / 127.5 - 1.0
        out.append(codec.encode(x, sample=False).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct_images(codec, images_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> ``D(E(x).mean)`` as uint8 (the VAE's round trip, quantised as sets are stored).

    What a perfect generator of these very images could write at best: the VAE bound of a generated set."""
    from raydistill.outputs import to_uint8

    device = next(codec.parameters()).device
    out = []
    for start in range(0, images_uint8.shape[0], batch):
        z = encode_images(codec, images_uint8[start:start + batch], batch=batch).to(device)
        out.append(to_uint8(codec.decode(z)))
    return torch.cat(out) if out else images_uint8.clone()


def psnr_db(a_uint8: torch.Tensor, b_uint8: torch.Tensor) -> float:
    """PSNR in dB between two uint8 image batches (peak 255)."""
    mse = ((a_uint8.float() - b_uint8.float()) / 255.0).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))
