"""Class consistency of a generator: the share of generated images that a classifier trained on real data assigns to
their conditioning class (the built-in model's quality bar: >= 85% of 100 images per class, CFG on)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from raydistill.config import BUILTIN_MODEL


@dataclass
class Consistency:
    overall: float  # percent
    per_class: list[float]
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor


def load_builtin_classifier(path: Path = BUILTIN_MODEL / "classifier.safetensors", device: str = "cpu"):
    """The ConvNet-3 that the pretraining job trained on the real Fashion-MNIST training set."""
    from safetensors.torch import load_file

    from raydistill.models.evalnets import build_eval_net

    net = build_eval_net("convnet3", 1, 10, 28)
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval()


@torch.no_grad()
def class_consistency(generator, classifier, num_classes: int, per_class: int, seed: int = 0,
                      batch_size: int = 100, progress=None) -> Consistency:
    from raydistill.pretrain import normalize_fmnist

    labels = [c for c in range(num_classes) for _ in range(per_class)]
    indices = [k for _ in range(num_classes) for k in range(per_class)]
    imgs = []
    for s in range(0, len(labels), batch_size):
        imgs.append(generator.generate(labels[s:s + batch_size], indices[s:s + batch_size], seed))
        if progress:
            progress(f"{s + len(imgs[-1])}/{len(labels)} images")
    x = torch.cat(imgs)
    y = torch.as_tensor(labels)
    dev = next(classifier.parameters()).device
    pred = torch.cat([classifier(normalize_fmnist(x[i:i + 500].float().div(255).to(dev))).argmax(1).cpu()
                      for i in range(0, len(x), 500)])
    hit = (pred == y).float()
    per = [100.0 * hit[y == c].mean().item() for c in range(num_classes)]
    return Consistency(100.0 * hit.mean().item(), per, x, y)
