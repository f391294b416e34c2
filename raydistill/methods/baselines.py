"""The baselines: ``random`` and ``herding`` (coresets of real training images), ``recon`` (the random subset passed
through the VAE: the VAE bound of a generated set) and ``dit`` (plain sampling from the DiT, no guidance). Real parts
pick ``IPC`` training positions per class; the images written are those real images (``recon``: their VAE round
trip)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raydistill.data import ClassDataset
from raydistill.errors import UserError
from raydistill.methods.registry import Method, integer
from raydistill.models.vae import reconstruct_images


def random_real_indices(ds: ClassDataset, label: int, ipc: int, seed: int) -> np.ndarray:
    """Seeded choice of ``ipc`` training images of class ``label`` (positions in the train split)."""
    pool = ds.indices("train", label)
    if len(pool) < ipc:
        raise UserError(f"class {ds.class_names[label]!r} has {len(pool)} training images, fewer than IPC {ipc}",
                        "lower --ipc")
    rng = np.random.default_rng([int(seed), int(label)])
    return pool[rng.choice(len(pool), size=ipc, replace=False)]


def herding_indices(ds: ClassDataset, label: int, ipc: int, codec, max_pool: int | None = None) -> np.ndarray:
    """Herding coreset (Welling 2009, as the DC benchmarks' "herding" baseline) of class ``label``: greedily add the
    training image whose VAE latent (posterior mean) brings the running mean of the chosen latents closest to the
    class mean. Deterministic; ``max_pool`` caps the candidates to the first images in natural order."""
    from raydistill.models.vae import encode_images

    pool = ds.indices("train", label)
    if max_pool is not None:
        pool = pool[:max_pool]
    if len(pool) < ipc:
        raise UserError(f"class {ds.class_names[label]!r} has {len(pool)} training images, fewer than IPC {ipc}",
                        "lower --ipc")
    feats = encode_images(codec, ds.read("train", pool)).flatten(1).double()  # [N, D]
    mu = feats.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(len(pool), dtype=torch.bool)
    for t in range(ipc):
        gap = ((mu - (total[None] + feats) / (t + 1)) ** 2).sum(1)  # [N]
        gap[~available] = float("inf")
        j = int(gap.argmin())
        chosen.append(j)
        available[j] = False
        total += feats[j]
    return pool[np.asarray(chosen)]


@dataclass(frozen=True)
class HerdingParams:
    herding_pool: int | None = integer(None, "candidates: the first N training images of a class (default: all)",
                                       low=1)


def _enough_images(cfg, ds, pool: int | None = None) -> None:
    """Before anything is allocated: every selected class holds IPC training images (among the first ``pool``)."""
    from raydistill.distill import selected_labels

    for c in selected_labels(cfg, ds):
        n = ds.num_images("train", c)
        n = n if pool is None else min(n, pool)
        if n < cfg.ipc:
            where = "" if pool is None else f" in the herding pool of {pool}"
            raise UserError(f"class {ds.class_names[c]!r} has {n} training images{where}, fewer than IPC {cfg.ipc}",
                            "lower --ipc" + ("" if pool is None else " or raise herding_pool"))


RANDOM = Method(
    name="random", kind="real", summary="seeded random real training images per class",
    select=lambda ctx, p, label: random_real_indices(ctx.ds, label, ctx.cfg.ipc, ctx.cfg.seed),
    check=lambda cfg, p, ds: _enough_images(cfg, ds))
HERDING = Method(
    name="herding", kind="real", summary="herding coreset of real images in the VAE latent space (Welling 2009)",
    params=HerdingParams, needs_codec=True,
    select=lambda ctx, p, label: herding_indices(ctx.ds, label, ctx.cfg.ipc, ctx.codec, p.herding_pool),
    check=lambda cfg, p, ds: _enough_images(cfg, ds, p.herding_pool))
RECON = Method(
    name="recon", kind="real", needs_codec=True,
    summary="the random subset's images through the VAE (posterior mean, decoded): the VAE bound of generated sets",
    select=lambda ctx, p, label: random_real_indices(ctx.ds, label, ctx.cfg.ipc, ctx.cfg.seed),
    transform=lambda ctx, p, images: reconstruct_images(ctx.codec, images),
    check=lambda cfg, p, ds: _enough_images(cfg, ds))
DIT = Method(name="dit", kind="base", summary="plain class-conditional DiT sampling with CFG (no guidance)")
