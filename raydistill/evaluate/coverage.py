"""Mode coverage of a distilled set (MGD3's motivation, measured for any set): does it cover the modes of each class?

For one class with ``k`` distilled images, in the VAE latent space (posterior means, as MGD3's mode discovery):

1. the class's real training latents ``R`` [N, D] are clustered with k-means into ``k`` real modes (seeded);
   the radius of mode j is the median distance of its members to its centre;
2. every distilled image is encoded to ``G`` [k, D];
3. **coverage** = share of real modes whose nearest distilled latent lies within the mode's radius;
4. every real latent is assigned to its nearest distilled latent; **distance** = the median distance of that
   assignment divided by the median distance of the real latents to their own mode centre (about 1 when every real
   image has a distilled image as close as its mode centre; large when the distilled images pile up on few modes).
   ``max_share`` is the largest share of the class's real images assigned to one distilled image.

Both are averaged over classes. ``max_real`` caps the real images per class (a seeded subset) to bound the cost.
"""

from __future__ import annotations

import numpy as np
import torch

from raydistill.errors import UserError


def class_coverage(real: torch.Tensor, generated: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Coverage and assignment distance of ``generated`` [k, ...] over ``real`` [N, ...] latents of a class."""
    from sklearn.cluster import KMeans

    k = generated.shape[0]
    if k < 1 or real.shape[0] < k:
        raise UserError(f"coverage needs at least {k} real images and 1 generated image per class", "check the set")
    r = real.reshape(real.shape[0], -1).double().numpy()  # [N, D]
    g = generated.reshape(k, -1).double().numpy()  # [k, D]
    km = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(r)
    centres, members = km.cluster_centers_, km.labels_
    radius = np.array([np.median(np.linalg.norm(r[members == j] - centres[j], axis=1)) for j in range(k)])
    d_centre_gen = np.linalg.norm(centres[:, None, :] - g[None, :, :], axis=2)  # [k modes, k generated]
    covered = d_centre_gen.min(1) <= radius
    d2 = (r ** 2).sum(1)[:, None] - 2 * r @ g.T + (g ** 2).sum(1)[None, :]  # [N, k] squared distances
    nearest = d2.argmin(1)
    d_assign = np.sqrt(np.maximum(d2[np.arange(len(r)), nearest], 0.0))
    d_own = np.linalg.norm(r - centres[members], axis=1)
    share = np.bincount(nearest, minlength=k) / r.shape[0]
    return {"coverage": float(covered.mean()), "distance": float(np.median(d_assign) / np.median(d_own)),
            "max_share": float(share.max())}


def set_coverage(ds, codec, images: torch.Tensor, labels: torch.Tensor, max_real: int | None = 2000,
                 seed: int = 0) -> dict:
    """Mean coverage and assignment distance over the classes of a set (uint8 ``images``, subset ``labels``)."""
    from raydistill.models.vae import encode_images

    per_class = {}
    for c in sorted(set(labels.tolist())):
        pool = ds.indices("train", int(c))
        if max_real is not None and len(pool) > max_real:
            pool = np.sort(np.random.default_rng([seed, int(c)]).choice(pool, size=max_real, replace=False))
        real = encode_images(codec, ds.read("train", pool))
        gen = encode_images(codec, images[labels == c])
        per_class[ds.class_names[int(c)]] = class_coverage(real, gen, seed)
    vals = list(per_class.values())
    return {"mode_coverage": float(np.mean([v["coverage"] for v in vals])),
            "mode_distance": float(np.mean([v["distance"] for v in vals])), "per_class": per_class,
            "max_real": max_real}
