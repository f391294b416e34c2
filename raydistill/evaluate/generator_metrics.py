"""Generator-quality metrics of a set of images against real ones: FID and precision / recall / density / coverage.

All five are computed in the feature space of one network (:func:`feature_extractor`): for Fashion-MNIST and other
small datasets the :class:`~raydistill.evaluate.feature_net.FeatureNet` trained on the dataset, for ImageNet sets
Inception-v3's 2048-d pool features from a local torchvision weights file.

- FID (Heusel et al. 2017): ``|mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^{1/2})``, computed by torchmetrics'
  ``FrechetInceptionDistance`` over precomputed features (an identity feature module), so the features of a set are
  computed once for all five metrics.
- Precision, recall, density, coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics", Eqs. 1-4),
  with k-nearest-neighbour balls of radius ``NND_k``: precision = share of generated samples inside some real ball;
  recall = share of real samples inside some generated ball; density = (1/k) mean number of real balls holding a
  generated sample; coverage = share of real samples whose own ball holds a generated sample. The k-NN radii come
  from the ``prdc`` package (the authors' code); the four counts are written here, chunked over generated samples,
  because ``prdc.compute_prdc`` recomputes the reference's N x N distances on every call (10k test images: 10^8
  distances per set). ``tests/test_generator_metrics.py`` checks the values equal ``prdc.compute_prdc``.

A number has a scale only next to the **real-vs-real floor**: a random, class-balanced subset of the real training
images of the same size, scored against the same reference (:func:`real_floor`). FID in particular is biased
upwards for small sets (an IPC-10 set has 100 images), so compare sets of equal size only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from raydistill.errors import UserError

BUILTIN_FEATURE_NET = Path(__file__).resolve().parents[1] / "assets" / "fmnist" / "feature_net.safetensors"


@dataclass(frozen=True)
class GeneratorMetrics:
    fid: float
    precision: float
    recall: float
    density: float
    coverage: float
    n_generated: int
    n_reference: int
    k: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


class _Identity(torch.nn.Module):
    """Feature module for torchmetrics' FID when the inputs already are features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class InceptionFeatures(torch.nn.Module):
    """torchvision Inception-v3 pool features (2048-d) of uint8 images, resized to 299 px, ImageNet-normalised."""

    num_features = 2048

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        p = Path(weights)
        if not p.is_file():
            raise UserError(f"Inception-v3 weights not found: {p}",
                            "pass --inception a local torchvision inception_v3 state dict (.pth); nothing is "
                            "downloaded at run time")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        try:
            net.load_state_dict(torch.load(str(p), map_location="cpu", weights_only=True))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot load Inception-v3 weights from {p}: {first}",
                            "pass torchvision's inception_v3 state dict") from e
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def feature_extractor(dataset: str, path: str | Path | None = None, channels: int | None = None,
                      num_classes: int | None = None, device: str = "cpu"):
    """The network whose features the metrics compare: Inception for ImageNet sets, else a :class:`FeatureNet`
    (``path``, default the built-in Fashion-MNIST one)."""
    from raydistill.data.subsets import SUBSET_NAMES
    from raydistill.evaluate.feature_net import load_feature_net

    if dataset in SUBSET_NAMES:
        if path is None:
            raise UserError(f"generator metrics on {dataset} need Inception-v3 weights",
                            "pass --inception PATH (torchvision inception_v3 state dict)")
        return InceptionFeatures(path).to(device).eval()
    if path is None:
        if dataset != "fashion-mnist":
            raise UserError(f"no built-in feature network for {dataset}",
                            "train one with `python -m raydistill.evaluate.feature_net --dataset ... --out PATH`")
        path = BUILTIN_FEATURE_NET
    return load_feature_net(path, channels=channels, num_classes=num_classes, device=device)


@torch.no_grad()
def features(extractor, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Features [N, D] (float64) of uint8 images [N, C, H, W]."""
    dev = next(extractor.buffers()).device
    out = [extractor.features(images[i:i + batch].to(dev)).double().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, extractor.num_features))


class Reference:
    """Features of the real reference images and their k-NN radii, computed once for any number of sets."""

    def __init__(self, feats: np.ndarray, k: int = 5) -> None:
        from prdc.prdc import compute_nearest_neighbour_distances

        if len(feats) <= k + 1:  # the k-th neighbour besides the point itself
            raise UserError(f"the reference holds {len(feats)} images, k-NN metrics need more than k+1={k + 1}",
                            "use a larger reference set")
        self.feats, self.k = feats, k
        self.radii = compute_nearest_neighbour_distances(feats, k)

    def score(self, gen: np.ndarray, chunk: int = 2048) -> GeneratorMetrics:
        """FID and Naeem et al.'s four metrics of generated features ``gen`` [M, D] against this reference."""
        from prdc.prdc import compute_nearest_neighbour_distances
        from sklearn.metrics import pairwise_distances

        if len(gen) <= self.k + 1:
            raise UserError(f"a set of {len(gen)} images is too small for k-NN metrics with k={self.k}",
                            f"score at least {self.k + 2} images")
        gen_radii = compute_nearest_neighbour_distances(gen, self.k)
        in_real = np.zeros(len(gen), dtype=bool)  # precision: generated j inside some real ball
        density = np.zeros(len(gen))
        recall_hit = np.zeros(len(self.feats), dtype=bool)  # recall: real i inside some generated ball
        nearest_gen = np.full(len(self.feats), np.inf)  # coverage: nearest generated sample of real i
        for s in range(0, len(gen), chunk):
            d = pairwise_distances(self.feats, gen[s:s + chunk], metric="euclidean")  # [N, m]
            inside = d < self.radii[:, None]
            in_real[s:s + chunk] = inside.any(0)
            density[s:s + chunk] = inside.sum(0)
            recall_hit |= (d < gen_radii[None, s:s + chunk]).any(1)
            nearest_gen = np.minimum(nearest_gen, d.min(1))
        return GeneratorMetrics(fid=fid(self.feats, gen), precision=float(in_real.mean()),
                                recall=float(recall_hit.mean()), density=float(density.mean() / self.k),
                                coverage=float((nearest_gen < self.radii).mean()), n_generated=len(gen),
                                n_reference=len(self.feats), k=self.k)


def fid(real: np.ndarray, gen: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (torchmetrics' implementation)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]), reset_real_features=False)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(gen), real=False)
    return float(metric.compute())


def class_balanced_subset(ds, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Real training images with the same per-class counts as ``labels`` (subset label space), seeded."""
    rng = np.random.default_rng([seed, 1729])
    parts = []
    for c in sorted(set(labels.tolist())):
        n = int((labels == c).sum())
        pool = ds.indices("train", int(c))
        parts.append(ds.read("train", np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))))
    return torch.cat(parts)


def real_floor(ds, extractor, reference: Reference, labels: torch.Tensor, seed: int = 0) -> GeneratorMetrics:
    """The metrics of a random real subset of the same size and class counts: the scale of a set's numbers."""
    return reference.score(features(extractor, class_balanced_subset(ds, labels, seed)))


def split_reference(ds, extractor, k: int = 5, limit: int | None = None,
                    classes: list[int] | None = None) -> Reference:
    """The dataset's test split (its first ``limit`` images per class; only ``classes`` when given) as the
    reference."""
    split = "test" if ds.has_split("test") else "train"
    if classes is None:
        x, _ = ds.load(split, limit=limit)
    else:
        x = torch.cat([ds.load(split, label=int(c), limit=limit)[0] for c in classes])
    return Reference(features(extractor, x), k=k)


def set_generator_metrics(ds, images: torch.Tensor, labels: torch.Tensor, feature_net: str | Path | None = None,
                          seed: int = 0) -> dict[str, float]:
    """A distilled set's metrics against the test split (``gen_*``) and those of a random real subset with the same
    class counts (``gen_floor_*``), as the main job logs them. ``labels`` are subset labels."""
    extractor = feature_extractor(ds.name, feature_net, channels=ds.channels, num_classes=ds.num_classes)
    reference = split_reference(ds, extractor, classes=sorted(set(labels.tolist())))
    k = min(reference.k, len(images) - 2)
    if k < 1:
        raise UserError(f"a set of {len(images)} images is too small for generator metrics", "make at least 3 images")
    if k != reference.k:
        reference = Reference(reference.feats, k=k)
    own = reference.score(features(extractor, images))
    floor = real_floor(ds, extractor, reference, labels, seed)
    return {**own.as_dict("gen_"), **floor.as_dict("gen_floor_")}
