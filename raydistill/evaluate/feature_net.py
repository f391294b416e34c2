"""The feature network of the generator-quality metrics on small datasets (Fashion-MNIST, digits, ImageFolder trees).

FID and precision / recall / density / coverage compare images in the feature space of a network trained on the
dataset itself: Inception-v3's ImageNet features say little about 28 px clothing. ``FeatureNet`` is a small ConvNet
(three stages of conv3x3-BN-ReLU and a 2x2 max-pool, widths 32/64/128, global average pool) whose 128-d penultimate
layer is the feature; trained as a classifier on the real training set (minutes an epoch on one core). The built-in
one is ``raydistill/assets/fmnist/feature_net.safetensors`` (its test accuracy is in ``feature_net.json``), made by

    python -m raydistill.evaluate.feature_net --out raydistill/assets/fmnist/feature_net.safetensors
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from raydistill.errors import UserError


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class FeatureNet(nn.Module):
    """uint8 images [N, C, H, W] -> ``features`` [N, 128] (``forward`` gives class logits for training)."""

    num_features = 128

    def __init__(self, channels: int = 1, num_classes: int = 10, mean: float = 0.2861, std: float = 0.3530) -> None:
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.body = nn.Sequential(_stage(channels, 32), _stage(32, 64), _stage(64, 128))
        self.embed = nn.Linear(128, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self._normalise(x)).mean(dim=(2, 3))
        return F.relu(self.embed(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_feature_net(net: FeatureNet, path: Path, info: dict) -> None:
    """safetensors weights + a JSON sidecar (shape, accuracy, provenance), each written to a temp name and renamed."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"channels": str(net.channels), "num_classes": str(net.num_classes)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    side = path.with_suffix(".json")
    side.with_name(side.name + ".tmp").write_text(json.dumps(info, indent=1))
    os.replace(side.with_name(side.name + ".tmp"), side)


def load_feature_net(path: str | Path, channels: int | None = None, num_classes: int | None = None,
                     device: str | torch.device = "cpu") -> FeatureNet:
    """A trained :class:`FeatureNet` from safetensors; a missing, corrupt or mismatched file is one line."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise UserError(f"feature network not found: {p}",
                        "train one with `python -m raydistill.evaluate.feature_net --out PATH`")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(p))
        net = FeatureNet(int(meta.get("channels", 1)), int(meta.get("num_classes", 10)))
        net.load_state_dict(state)
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read the feature network {p}: {first}", "retrain it or pass the right file") from e
    for name, want in (("channels", channels), ("num_classes", num_classes)):
        if want is not None and getattr(net, name) != want:
            raise UserError(f"feature network {p} has {name}={getattr(net, name)}, the dataset has {want}",
                            "use a feature network trained on this dataset")
    return net.to(device).eval()


@torch.no_grad()
def accuracy(net: FeatureNet, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    hits = sum((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * hits / len(x)


def train_feature_net(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 6, batch: int = 256,
                      lr: float = 2e-3, seed: int = 0, test: tuple[torch.Tensor, torch.Tensor] | None = None,
                      log=print) -> tuple[FeatureNet, list[str]]:
    """AdamW with one-cycle cosine decay, random 2-px shifts and horizontal flips; ``x`` uint8 [N, C, H, W]."""
    torch.manual_seed(seed)
    xf = x.float() / 255.0
    net = FeatureNet(x.shape[1], num_classes, mean=float(xf.mean()), std=float(xf.std()))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    lines = []
    for epoch in range(epochs):
        net.train()
        t0, perm = time.time(), torch.randperm(len(x))
        for i in range(0, len(x), batch):
            b = perm[i:i + batch]
            xb = F.pad(xf[b], (2, 2, 2, 2))
            dx, dy = torch.randint(0, 5, (2,)).tolist()
            xb = xb[..., dy:dy + x.shape[2], dx:dx + x.shape[3]]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = f", test accuracy {accuracy(net, *test):.2f}%" if test is not None else ""
        lines.append(f"feature net epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}{acc} ({time.time() - t0:.0f} s)")
        log(lines[-1])
    return net.eval(), lines


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from raydistill.data import load_dataset

    ap = argparse.ArgumentParser(prog="python -m raydistill.evaluate.feature_net", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", required=True, help="safetensors path; a .json sidecar is written beside it")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    ds = load_dataset(a.dataset, a.data_root)
    x, y = ds.load("train")
    test = ds.load("test")
    t0 = time.time()
    net, lines = train_feature_net(x, y, ds.num_classes, epochs=a.epochs, seed=a.seed, test=test,
                                   log=lambda s: print(s, flush=True))
    info = {"dataset": a.dataset, "train_images": len(x), "test_accuracy": round(accuracy(net, *test), 2),
            "epochs": a.epochs, "seed": a.seed, "seconds": round(time.time() - t0), "torch": torch.__version__,
            "command": " ".join(["python -m raydistill.evaluate.feature_net", *(argv or sys.argv[1:])]), "log": lines}
    save_feature_net(net, Path(a.out), info)
    print(f"feature network: test accuracy {info['test_accuracy']}% -> {a.out}")


if __name__ == "__main__":
    main()
