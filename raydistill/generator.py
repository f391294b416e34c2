"""The generator bundle: a DiT, its latent codec and the respaced schedule, loaded once and sampled many times.

``Generator.generate`` turns (subset labels, image indices, run seed, guidance terms) into uint8 images; each image is
a pure function of its class, index, seed and the settings (see :mod:`raydistill.diffusion.sampler`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from raydistill.config import BUILTIN_MODEL, DistillConfig
from raydistill.diffusion.sampler import SamplerConfig, dit_denoiser, image_seed, sample
from raydistill.diffusion.schedule import Schedule
from raydistill.errors import UserError
from raydistill.guidance.base import GuidanceTerm
from raydistill.methods import get_method
from raydistill.models.dit import dit_config_of
from raydistill.models.dit_convert import load_dit
from raydistill.models.vae import LatentCodec, load_vae
from raydistill.outputs import to_uint8
from raydistill.precision import maybe_compile, precision_scope


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Generator:
    dit: torch.nn.Module
    codec: LatentCodec
    schedule: Schedule
    sampler: SamplerConfig
    dit_labels: list[int]  # subset label -> model label
    device: torch.device
    router: object | None = None  # Minimax phases: a methods.minimax.router.PhaseRouter (one fine-tune per class chunk)
    precision: str = "auto"  # sampling, guidance and decoding (raydistill.precision)
    forward: torch.nn.Module | None = None  # what the denoiser calls: ``dit``, or ``torch.compile(dit)``

    @property
    def null_label(self) -> int:
        return int(self.dit.config.num_embeds_ada_norm)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.dit.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def seeds(self, labels: Sequence[int], indices: Sequence[int], seed: int) -> list[int]:
        return [image_seed(seed, int(c), int(k)) for c, k in zip(labels, indices)]

    def sample_latents(self, labels: Sequence[int], indices: Sequence[int], seed: int,
                       terms: Sequence[GuidanceTerm] = (), progress: Callable[[int], None] | None = None
                       ) -> torch.Tensor:
        """Latents [B, C, h, w] of images ``indices`` of subset classes ``labels``."""
        if self.router is not None:  # Minimax phases: each class is sampled by the model fine-tuned on it
            groups = self.router.groups([self.dit_labels[int(c)] for c in labels])
            if len(groups) > 1:  # per-image seeds make each image independent of its batch
                parts = [(rows, self._sample_phase(phase, [labels[r] for r in rows], [indices[r] for r in rows],
                                                   seed, terms, progress)) for phase, rows in groups]
                out = torch.empty(len(labels), *self.latent_shape, device=parts[0][1].device)
                for rows, z in parts:
                    out[rows] = z
                return out
            self.router.activate(groups[0][0])
        return self._sample(labels, indices, seed, terms, progress)

    def _sample_phase(self, phase, labels, indices, seed, terms, progress) -> torch.Tensor:
        self.router.activate(phase)
        return self._sample(labels, indices, seed, terms, progress)

    def _sample(self, labels: Sequence[int], indices: Sequence[int], seed: int, terms: Sequence[GuidanceTerm],
                progress: Callable[[int], None] | None) -> torch.Tensor:
        cls = torch.as_tensor(list(labels), dtype=torch.long)
        y = torch.as_tensor([self.dit_labels[int(c)] for c in labels], dtype=torch.long)
        with precision_scope(self.precision, self.device):  # the DiT, and the guidance terms' VAE and surrogate
            return sample(dit_denoiser(self.dit if self.forward is None else self.forward), self.schedule, y,
                          self.seeds(labels, indices, seed), self.latent_shape, self.null_label, self.sampler,
                          terms=terms, class_labels=cls, image_indices=torch.as_tensor(list(indices), dtype=torch.long),
                          device=self.device, progress=progress)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images [B, C, H, W]; a non-finite decode (a damaged VAE) is refused, never written black."""
        with precision_scope(self.precision, self.device):
            images = self.codec.decode(latents.to(self.device)).float()
        if not bool(torch.isfinite(images).all()):
            raise UserError("the VAE decoded non-finite pixels (NaN or inf) from finite latents; the shard is not "
                            "written", "check the VAE files (--vae), then rerun to resume")
        return to_uint8(images)

    def generate(self, labels: Sequence[int], indices: Sequence[int], seed: int,
                 terms: Sequence[GuidanceTerm] = ()) -> torch.Tensor:
        return self.decode(self.sample_latents(labels, indices, seed, terms))


def resolve_model_paths(cfg: DistillConfig) -> tuple[Path, Path]:
    """(DiT path, VAE path): the built-in model unless ``--model``/``--vae`` are given."""
    if cfg.model is None:
        if cfg.dataset not in ("fashion-mnist", "fmnist"):
            raise UserError(f"no built-in model for dataset {cfg.dataset!r}",
                            "pass --model (a DiT folder or .pt) and --vae (an AutoencoderKL folder)")
        if not (BUILTIN_MODEL / "dit" / "config.json").exists():
            raise UserError(f"the built-in model is missing from {BUILTIN_MODEL}",
                            "run `raydistill pretrain` to create it")
        return BUILTIN_MODEL / "dit", BUILTIN_MODEL / "vae"
    if cfg.vae is None:
        raise UserError("--model is given without --vae", "pass --vae, the AutoencoderKL the DiT was trained with")
    return Path(cfg.model), Path(cfg.vae)


def load_generator(cfg: DistillConfig, dit_labels: list[int], image_size: int,
                   device: str | torch.device | None = None) -> Generator:
    """Load DiT + VAE for ``cfg`` and check that every class label fits the model."""
    device = torch.device(device) if device is not None else default_device()
    dit_path, vae_path = resolve_model_paths(cfg)
    router = None
    model = get_method(cfg.method).model
    if model is not None:  # a model part (Minimax: the DiffFit fine-tune's EMA, routed per class phase)
        dit, router = model.load_model(cfg, dit_path, device)
    else:
        dit = load_dit(dit_path, size=cfg.model_size, device=device)
    num_classes = int(dit.config.num_embeds_ada_norm)
    bad = [y for y in dit_labels if not 0 <= y < num_classes]
    if bad:
        raise UserError(f"the DiT at {dit_path} knows {num_classes} classes but class label {bad[0]} was asked for",
                        "use a model trained on this dataset")
    codec = load_vae(vae_path, image_size=image_size, device=device)
    if int(codec.vae.config.latent_channels) != int(dit.config.in_channels):
        raise UserError(f"VAE latent channels {codec.vae.config.latent_channels} != DiT input channels "
                        f"{dit.config.in_channels}", "pass the VAE the DiT was trained with")
    cfg_channels = cfg.cfg_channels
    if cfg_channels is None and dit_config_of(dit).size == "XL/2":
        cfg_channels = 3  # DiT-XL/2's forward_with_cfg quirk (spec 0.1), needed to reproduce published numbers
    sampler = SamplerConfig(sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, cfg_channels=cfg_channels,
                            cfg_interval=cfg.cfg_interval)
    return Generator(dit=dit, codec=codec, schedule=Schedule.linear(1000, cfg.steps), sampler=sampler,
                     dit_labels=list(dit_labels), device=device, router=router, precision=cfg.precision,
                     forward=maybe_compile(dit, cfg.compile))
