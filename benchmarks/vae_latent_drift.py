"""How far a fine-tuned VAE's latent space moved from the VAE it started from (docs/PRETRAINING.md, "How it was
made"): whether a DiT trained on the old latents can be warm-started on the new ones.

For the first ``--per-class`` training images per class, both VAEs encode the posterior mean as pretraining does
(32 px padded, times each VAE's latent scale); the script prints the RMS difference relative to the latents' standard
deviation, the mean per-image cosine, and the PSNR of old latents decoded by the new decoder next to each VAE's own
round trip.

    python benchmarks/vae_latent_drift.py --old candidates/vae-x2 --new candidates/vae-x2-ft2800
"""

from __future__ import annotations

import argparse
import math

import torch


@torch.no_grad()
def main() -> None:
    from diffusers import AutoencoderKL

    from raydistill.data import load_dataset
    from raydistill.pretrain import _pad32

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the VAE the DiT was trained on (diffusers folder)")
    ap.add_argument("--new", required=True, help="the VAE fine-tuned from it")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x = _pad32(load_dataset("fashion-mnist").load("train", limit=a.per_class)[0])
    old, new = (AutoencoderKL.from_pretrained(p, local_files_only=True).eval() for p in (a.old, a.new))
    z_old, z_new = (v.encode(x).latent_dist.mean * v.config.scaling_factor for v in (old, new))
    drift = (z_old - z_new).pow(2).mean().sqrt() / z_old.std()
    cosine = torch.nn.functional.cosine_similarity(z_old.flatten(1), z_new.flatten(1)).mean()
    print(f"{len(x)} training images; latent scale old {old.config.scaling_factor:.4f}, "
          f"new {new.config.scaling_factor:.4f}")
    print(f"RMS difference / std of the old latents: {drift:.3f}; mean cosine per image: {cosine:.4f}")
    for label, vae, z in (("old latents, new decoder", new, z_old), ("new latents, new decoder", new, z_new),
                          ("old latents, old decoder", old, z_old)):
        rec = vae.decode(z / vae.config.scaling_factor).sample
        print(f"{label}: PSNR {10 * math.log10(4.0 / (rec - x).pow(2).mean().item()):.2f} dB (32 px, [-1, 1])")


if __name__ == "__main__":
    main()
