"""Where a VAE's round trip loses: pixel error statistics of the random real subset through the VAE.

The ``recon`` baseline (benchmarks/quality.py) measures what the round trip costs in accuracy; this says where the
pixels differ. For the random subset of ``--ipc`` images per class (seed 0, the same images as ``recon``), each VAE
encodes the posterior mean and decodes, quantised to uint8 as sets are stored.

    python benchmarks/vae_roundtrip.py --ipc 50 --vae candidates/vae-x2-ft2800 raydistill/assets/fmnist/vae
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from raydistill.config import BUILTIN_MODEL
    from raydistill.data import load_dataset
    from raydistill.methods.baselines import random_real_indices
    from raydistill.models.vae import load_vae, psnr_db, reconstruct_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ipc", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae", nargs="+", default=[str(BUILTIN_MODEL / "vae")])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = load_dataset("fashion-mnist")
    x = torch.cat([ds.read("train", random_real_indices(ds, c, a.ipc, a.seed)) for c in range(ds.num_classes)])
    background = x == 0
    print(f"{len(x)} images (random real, IPC {a.ipc}, seed {a.seed}); errors in grey levels of 255")
    print(f"{'VAE':40s} {'PSNR dB':>8s} {'mean err':>9s} {'|err|':>6s} {'|err| garment':>14s} "
          f"{'background':>11s} {'max |err|':>10s}")
    for path in a.vae:
        r = reconstruct_images(load_vae(path, image_size=ds.image_size), x)
        d = r.float() - x.float()
        print(f"{path:40s} {psnr_db(r, x):8.2f} {d.mean().item():9.2f} {d.abs().mean().item():6.2f} "
              f"{d[~background].abs().mean().item():14.2f} {r[background].float().mean().item():11.2f} "
              f"{d.abs().max().item():10.0f}")


if __name__ == "__main__":
    main()
