"""MGD3 mode discovery (spec 3.1, step 1): per-class clusters of VAE latents, and a file cache for them.

For one class, every training image is encoded with the VAE posterior **mean** times the latent scale (images scaled
to [-1, 1]), the latents are flattened and clustered into ``k = IPC`` groups; the modes are the k-means centroids
(sklearn ``KMeans(n_clusters=k, random_state=seed, n_init="auto")``, the official defaults: no PCA, no snapping), or
the means of a Gaussian mixture (spec Table 7's "GMM"), optionally snapped to the nearest real latent (Table 5/7's
"nearest sample").

Deviations from the official code (documented on purpose):

- The official loader applies ``RandomHorizontalFlip`` before encoding (an unseeded flip, so its modes are not
  reproducible). We encode the unflipped images, deterministically: the same images, VAE and seed give the same modes.
- The official preprocessing centre-crops to 256 px (ADM crop); here the dataset already yields images at the size
  the generator works at (``ClassDataset.image_size``), which the codec pads to the VAE's native size if smaller.
- ``method="gmm"`` uses a *diagonal* covariance (``covariance_type="diag"``): a full covariance in the 4096-d DiT
  latent space is singular for ~1300 images per class and needs k x 4096^2 floats. The official code's GMM settings
  are not public.
- Clustering runs in float64 (sklearn keeps float32 input in float32); modes are returned as float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from raydistill.errors import UserError
from raydistill.models.vae import encode_images

MODE_METHODS = ("kmeans", "gmm")


def _check(k, n: int, method: str) -> None:
    if method not in MODE_METHODS:
        raise UserError(f"unknown mode discovery method {method!r}", f"use one of {', '.join(MODE_METHODS)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"the number of modes must be a positive integer, got {k!r}", "pass IPC 1 or more")
    if k > n:
        raise UserError(f"cannot find {k} modes among {n} images", "lower IPC or give the class more images")


def cluster_latents(latents: torch.Tensor, k: int, seed: int = 0, method: str = "kmeans",
                    snap: bool = False) -> torch.Tensor:
    """Cluster latents [N, c, h, w] (flattened) into ``k`` modes [k, c, h, w] (float32, CPU)."""
    n = latents.shape[0]
    _check(k, n, method)
    feats = latents.reshape(n, -1).double().cpu().numpy()
    if method == "kmeans":
        from sklearn.cluster import KMeans

        centers = KMeans(n_clusters=int(k), random_state=int(seed), n_init="auto").fit(feats).cluster_centers_
    else:
        from sklearn.mixture import GaussianMixture

        centers = GaussianMixture(n_components=int(k), covariance_type="diag", random_state=int(seed)).fit(feats).means_
    if snap:  # each centre -> its nearest real latent (Euclidean)
        d2 = (feats ** 2).sum(1)[None, :] - 2.0 * centers @ feats.T + (centers ** 2).sum(1)[:, None]
        centers = feats[np.argmin(d2, axis=1)]
    return torch.from_numpy(np.ascontiguousarray(centers)).float().reshape(int(k), *latents.shape[1:])


def discover_modes(codec, images_uint8: torch.Tensor, k: int, seed: int = 0, method: str = "kmeans",
                   snap: bool = False, batch: int = 256) -> torch.Tensor:
    """The ``k`` modes [k, c, h, w] of one class's uint8 images [N, C, H, W] in the codec's latent space.

    Cheap argument errors (k > N, unknown method) are raised before any image is encoded.
    """
    _check(k, images_uint8.shape[0], method)
    return cluster_latents(encode_images(codec, images_uint8, batch), k, seed, method, snap)


def codec_identity(codec) -> str:
    """A short string that changes whenever the codec would encode differently: config, scale, size, weights."""
    h = hashlib.sha256()
    cfg = dict(getattr(codec.vae, "config", {}))
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(f"|scale={codec.scale}|native={codec.native}|size={codec.image_size}|".encode())
    for name, t in codec.vae.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "vae-" + h.hexdigest()[:20]


class ModeCache:
    """Modes on disk: one safetensors file per (dataset, class label, k, VAE identity, seed, method, snap).

    The file name is a sha256 of those fields; the fields are also stored in the file's metadata (one sorted JSON
    string, so the same modes give the same bytes in every process). Writes are atomic
    (temporary file in the same folder, then ``os.replace``), so concurrent workers computing the same modes are
    harmless: the last rename wins and every reader sees a complete file. ``computed`` counts the computations done
    by this instance (for tests and logs).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.computed = 0

    @staticmethod
    def fields(dataset: str, label: int, k: int, vae: str, seed: int = 0, method: str = "kmeans",
               snap: bool = False) -> dict[str, str]:
        return {"dataset": str(dataset), "label": str(int(label)), "k": str(int(k)), "vae": str(vae),
                "seed": str(int(seed)), "method": str(method), "snap": str(bool(snap))}

    @classmethod
    def _metadata(cls, *args) -> dict[str, str]:
        """The fields as one sorted JSON string: safetensors writes a metadata map in hash order, which differs
        from process to process, so several keys would make the same modes' file bytes irreproducible."""
        return {"fields": json.dumps(cls.fields(*args), sort_keys=True)}

    def path(self, dataset: str, label: int, k: int, vae: str, seed: int = 0, method: str = "kmeans",
             snap: bool = False) -> Path:
        f = self.fields(dataset, label, k, vae, seed, method, snap)
        key = hashlib.sha256(json.dumps(f, sort_keys=True).encode()).hexdigest()[:32]
        return self.root / f"modes-{key}.safetensors"

    def load(self, dataset: str, label: int, k: int, vae: str, seed: int = 0, method: str = "kmeans",
             snap: bool = False) -> torch.Tensor | None:
        """The cached modes, or None when absent or unreadable (a damaged file is recomputed)."""
        from safetensors import safe_open

        p = self.path(dataset, label, k, vae, seed, method, snap)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as fh:
                if fh.metadata() != self._metadata(dataset, label, k, vae, seed, method, snap):
                    return None
                modes = fh.get_tensor("modes")
        except Exception:  # noqa: BLE001 - a truncated/foreign file is a cache miss, not an error
            return None
        return modes if modes.dim() >= 1 and modes.shape[0] == int(k) else None

    def save(self, modes: torch.Tensor, dataset: str, label: int, k: int, vae: str, seed: int = 0,
             method: str = "kmeans", snap: bool = False) -> Path:
        from safetensors.torch import save_file

        p = self.path(dataset, label, k, vae, seed, method, snap)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=p.parent)
        os.close(fd)
        try:
            save_file({"modes": modes.detach().cpu().float().contiguous()}, tmp,
                      metadata=self._metadata(dataset, label, k, vae, seed, method, snap))
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    def get_or_compute(self, compute: Callable[[], torch.Tensor], dataset: str, label: int, k: int, vae: str,
                       seed: int = 0, method: str = "kmeans", snap: bool = False) -> torch.Tensor:
        """Cached modes if present, else ``compute()`` stored atomically and returned."""
        modes = self.load(dataset, label, k, vae, seed, method, snap)
        if modes is not None:
            return modes
        modes = compute().detach().cpu().float().contiguous()
        self.computed += 1
        self.save(modes, dataset, label, k, vae, seed, method, snap)
        return modes
