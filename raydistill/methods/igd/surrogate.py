"""IGD's surrogate trajectory (spec 2.1, steps 1-3): train, snapshot, select checkpoints, cache real gradients.

- :func:`train_trajectory` trains a fresh evaluation net (ConvNet-6 at 256 px, ConvNet-3 on Fashion-MNIST; any
  :func:`~raydistill.models.evalnets.build_eval_net` name) on the whole training split with SGD (lr 0.01, momentum
  0.9, wd 5e-4, batch 64, no schedule, mean = std = 0.5) and writes the parameters at epoch 0 (the initialisation)
  and after every epoch as ``epoch_NNN.safetensors`` with ``trajectory.json`` beside them. Each epoch is committed
  atomically with the optimizer state, so an interrupted run resumes at the last finished epoch and ends with the
  same weights as an uninterrupted one (the shuffle of epoch e is seeded by (seed, e)).
- :func:`class_mean_gradient` is spec step 3: the mean over mini-batches of 50 of ``grad_theta CE(f_theta(x), y)``
  over the **first** ``grad_ipc`` (200) training images of the class in natural order, as one flat vector.
- :func:`select_by_similarity` is the paper's checkpoint selection (``grad_ckpt_select.py``): walk forward through
  the epochs; accept epoch e when the class-averaged cosine between its class-mean gradients and those of the last
  accepted epoch drops below 0.7; epoch 0 is always accepted.
- :class:`Trajectory` loads a trajectory (safetensors only) and caches the real gradients of (epochs, class) under
  ``<dir>/real_grads``.

Fashion-MNIST preset (a deviation for this CPU, see docs/METHODS.md): 10 "epochs" of 12,000 seeded images each (2
passes over the data in 11 snapshots) instead of 50 full epochs; train accuracy is at ~89% and flattening by then.

Deviation on purpose: the 256 px recipe's RandomResizedCrop / flip / jitter / lighting augmentation is used for RGB
data (``augment="idc"``); Fashion-MNIST's surrogate trains without augmentation (``augment="none"``), like its
evaluation protocol.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydistill.errors import UserError
from raydistill.models.evalnets import build_eval_net
from raydistill.outputs import atomic_write_text

SIMILARITY_THRESHOLD = 0.7  # spec 2.1 step 2

# Spec 2.1's hard-coded epoch lists (official ``rand_ckpts``), by (dataset, net). The 1K list's 52 is out of range
# for a 50-epoch run (51 snapshots); we use 50, as third parties did.
EPOCH_PRESETS: dict[tuple[str, str], tuple[int, ...]] = {
    ("imagewoof", "convnet6"): (0, 5, 16, 40),
    ("imagenette", "convnet6"): (0, 2, 11, 40),
    ("imagenet-1k", "convnet6"): (0, 5, 18, 50),
    ("imagewoof", "resnet_ap10"): (0, 6, 16, 39),
    ("imagenette", "resnet_ap10"): (0, 6, 16, 39),
}


# Per-dataset defaults of `raydistill surrogate` (flags override them).
SURROGATE_DEFAULTS: dict[str, dict] = {"fashion-mnist": {"epochs": 10, "images_per_epoch": 12000}}


@dataclass(frozen=True)
class SurrogateConfig:
    net: str = "convnet"  # depth from the image size: ConvNet-3 at 28/32 px, ConvNet-6 at 256 px
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    augment: str = "auto"  # "auto": "idc" for RGB data, "none" for grayscale
    seed: int = 0
    images_per_epoch: int | None = None  # None: the whole training split; else a seeded draw of this many per epoch

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("surrogate epochs and batch size must be positive", "fix the surrogate settings")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise UserError(f"surrogate lr must be a finite number > 0, got {self.lr!r}", "the recipe uses --lr 0.01")
        for name, high in (("momentum", 1.0), ("weight_decay", None)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (high is not None and v >= high):
                raise UserError(f"surrogate {name} must be a finite number >= 0" + (f" below {high}" if high else "")
                                + f", got {v!r}", "the recipe uses momentum 0.9, weight decay 5e-4")
        if self.augment not in ("auto", "idc", "none"):
            raise UserError(f"unknown surrogate augmentation {self.augment!r}", "use auto, idc or none")


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> [-1, 1] (mean = std = 0.5 per channel, IGD's surrogate normalisation)."""
    return images_uint8.float() / 127.5 - 1.0


def flat_names(net: nn.Module) -> list[str]:
    return [n for n, _ in net.named_parameters()]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------------------------------------------------
# training


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise UserError(f"cannot read {path}: {e}", "delete the file and rerun to recreate it") from e


def dataset_identity(ds) -> dict:
    return {"dataset": ds.name, "classes": list(ds.class_names), "image_size": int(ds.image_size),
            "channels": int(ds.channels), "train_images": int(ds.num_images("train"))}


def train_trajectory(ds, out: str | Path, cfg: SurrogateConfig = SurrogateConfig(), device: str | None = None,
                     progress: Callable[[str], None] | None = None, max_epochs_this_run: int | None = None) -> Path:
    """Train the surrogate on ``ds``'s training split and write its trajectory to ``out`` (resumable)."""
    from raydistill.evaluate.augment import idc_augment

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta_path = out / "trajectory.json"
    meta = {"config": asdict(cfg), "data": dataset_identity(ds), "epochs_done": -1, "log": []}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old["config"] != meta["config"] or old["data"] != meta["data"]:
            raise UserError(f"{out} holds a surrogate trajectory with other settings",
                            "pass another --out folder or delete the old trajectory")
        meta = old
    augment = cfg.augment if cfg.augment != "auto" else ("idc" if ds.channels == 3 else "none")
    torch.manual_seed(cfg.seed)
    net = build_eval_net(cfg.net, ds.channels, ds.num_classes, ds.image_size).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    done = int(meta["epochs_done"])
    if done >= 0:  # resume: weights of the last finished epoch + the optimizer's momentum
        net.load_state_dict({k: v.to(dev) for k, v in _load_safetensors(out / f"epoch_{done:03d}.safetensors").items()})
        if done > 0:
            mom = _load_safetensors(out / f"optimizer_{done:03d}.safetensors")
            for name, p in net.named_parameters():
                opt.state[p]["momentum_buffer"] = mom[name].to(dev)
    else:
        _write_safetensors(out / "epoch_000.safetensors", dict(net.state_dict()))
        meta["epochs_done"] = done = 0
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    labels_all = torch.from_numpy(ds._labels("train").astype(np.int64))
    n = len(labels_all)
    ran = 0
    for epoch in range(done + 1, cfg.epochs + 1):
        if max_epochs_this_run is not None and ran >= max_epochs_this_run:
            break
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(n, generator=gen).numpy()[:cfg.images_per_epoch or n]
        net.train()
        correct, seen, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), cfg.batch_size):
            pos = np.sort(order[start:start + cfg.batch_size])
            x = ds.read("train", pos).to(dev).float() / 255.0
            y = labels_all[pos].to(dev)
            if augment == "idc":
                x = idc_augment(x, gen)
            x = (x - 0.5) / 0.5
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(pos)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(pos)
        # commit order: momentum, weights, then trajectory.json; a resume reads the epoch trajectory.json names
        _write_safetensors(out / f"optimizer_{epoch:03d}.safetensors",
                           {name: opt.state[p]["momentum_buffer"] for name, p in net.named_parameters()})
        _write_safetensors(out / f"epoch_{epoch:03d}.safetensors", dict(net.state_dict()))
        line = (f"epoch {epoch}/{cfg.epochs}: loss {loss_sum / seen:.4f}, train acc {100 * correct / seen:.2f}%, "
                f"{time.time() - t0:.0f} s")
        meta["epochs_done"] = epoch
        meta["log"].append(line)
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
        (out / f"optimizer_{epoch - 1:03d}.safetensors").unlink(missing_ok=True)
        ran += 1
        if progress:
            progress(line)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# loading, real gradients, selection


class Trajectory:
    """A trained surrogate trajectory: ``params(e)`` is the parameter dict after epoch e (0 = initialisation)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        meta_path = self.path / "trajectory.json"
        if not meta_path.is_file():
            raise UserError(f"no surrogate trajectory at {self.path} (no trajectory.json)",
                            "run `raydistill surrogate --out PATH` first, or pass the folder it wrote")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.config = SurrogateConfig(**self.meta["config"])
            data = self.meta["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta_path} is not a raydistill trajectory file ({e})", "recreate the trajectory") from e
        self.epochs_done = int(self.meta["epochs_done"])
        self.channels, self.image_size = int(data["channels"]), int(data["image_size"])
        self.class_names = list(data["classes"])
        self.device = torch.device(device)
        self.net = build_eval_net(self.config.net, self.channels, len(self.class_names), self.image_size)
        self.net = self.net.to(self.device).eval()
        self.names = flat_names(self.net)
        self._params: dict[int, dict[str, torch.Tensor]] = {}

    def check_dataset(self, ds) -> None:
        data = self.meta["data"]
        if (data["dataset"], data["classes"], data["image_size"]) != (ds.name, list(ds.class_names), ds.image_size):
            raise UserError(f"the surrogate at {self.path} was trained on {data['dataset']} "
                            f"({len(data['classes'])} classes, {data['image_size']} px), not on this dataset",
                            "train a surrogate for this dataset with `raydistill surrogate`")

    def params(self, epoch: int) -> dict[str, torch.Tensor]:
        if not 0 <= epoch <= self.epochs_done:
            raise UserError(f"surrogate epoch {epoch} is not in the trajectory at {self.path} "
                            f"(epochs 0..{self.epochs_done})", "pick epochs that exist or train longer")
        if epoch not in self._params:
            state = _load_safetensors(self.path / f"epoch_{epoch:03d}.safetensors")
            missing = [n for n in self.names if n not in state]
            if missing:
                raise UserError(f"surrogate checkpoint epoch {epoch} lacks {missing[0]}", "recreate the trajectory")
            self._params[epoch] = {n: state[n].to(self.device) for n in self.names}
        return self._params[epoch]

    def class_mean_gradient(self, epoch: int, images_uint8: torch.Tensor, label: int, chunk: int = 50
                            ) -> torch.Tensor:
        """Spec 2.1 step 3: mean over mini-batches of ``chunk`` of grad_theta CE, flat [P] (float32, CPU)."""
        from torch.func import functional_call

        params = {n: p.detach().requires_grad_() for n, p in self.params(epoch).items()}
        acc, batches = None, 0
        for start in range(0, images_uint8.shape[0], chunk):
            x = normalise(images_uint8[start:start + chunk]).to(self.device)
            y = torch.full((x.shape[0],), int(label), dtype=torch.long, device=self.device)
            loss = F.cross_entropy(functional_call(self.net, params, (x,)), y)
            g = flatten(torch.autograd.grad(loss, list(params.values()))).detach()
            acc = g if acc is None else acc + g
            batches += 1
        return (acc / batches).float().cpu()

    def identity(self) -> str:
        """A short hash of ``trajectory.json`` (settings, data, epochs done): keys caches of this trajectory."""
        import hashlib

        return hashlib.sha256((self.path / "trajectory.json").read_bytes()).hexdigest()[:16]

    def real_gradients(self, ds, label: int, epochs: Sequence[int], grad_ipc: int = 200,
                       cache_dir: str | Path | None = None) -> torch.Tensor:
        """Class ``label``'s real gradients at ``epochs``: [len(epochs), P], cached under ``cache_dir`` (default
        ``<trajectory>/real_grads``; a read-only trajectory such as the shipped one gets a cache elsewhere)."""
        key = f"e{'-'.join(str(int(e)) for e in epochs)}_n{grad_ipc}"
        root = Path(cache_dir) / self.identity() if cache_dir is not None else self.path / "real_grads"
        path = root / key / f"c{int(label):04d}.safetensors"
        if path.exists():
            return _load_safetensors(path)["grads"]
        images, _ = ds.load("train", label=label, limit=grad_ipc)
        g = torch.stack([self.class_mean_gradient(int(e), images, label) for e in epochs])
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_safetensors(path, {"grads": g}, {"class": self.class_names[label], "epochs": key})
        return g


def select_by_similarity(class_grads: torch.Tensor, threshold: float = SIMILARITY_THRESHOLD) -> list[int]:
    """The paper's selection over class-mean gradients ``class_grads`` [E+1 epochs, C classes, P].

    Epoch 0 is accepted; walking forward, epoch e is accepted when mean_c cos(G[e, c], G[last, c]) < ``threshold``.
    """
    picked = [0]
    for e in range(1, class_grads.shape[0]):
        sim = F.cosine_similarity(class_grads[e], class_grads[picked[-1]], dim=-1).mean()
        if float(sim) < threshold:
            picked.append(e)
    return picked


def similarity_selection(traj: Trajectory, ds, grad_ipc: int = 200, threshold: float = SIMILARITY_THRESHOLD,
                         progress: Callable[[str], None] | None = None) -> dict:
    """Run :func:`select_by_similarity` on every epoch of ``traj``; writes and returns ``selection.json``."""
    images = [ds.load("train", label=c, limit=grad_ipc)[0] for c in range(ds.num_classes)]
    grads = []
    for e in range(traj.epochs_done + 1):
        grads.append(torch.stack([traj.class_mean_gradient(e, images[c], c) for c in range(ds.num_classes)]))
        if progress:
            progress(f"class-mean gradients of epoch {e}/{traj.epochs_done}")
    g = torch.stack(grads)  # [E+1, C, P]
    picked = select_by_similarity(g, threshold)
    sims = [float(F.cosine_similarity(g[e], g[e - 1], dim=-1).mean()) for e in range(1, g.shape[0])]
    result = {"threshold": threshold, "grad_ipc": grad_ipc, "selected": picked,
              "similarity_to_previous_epoch": [round(s, 4) for s in sims]}
    (traj.path / "selection.json").write_text(json.dumps(result, indent=1))
    return result


def resolve_epochs(traj: Trajectory, dataset: str, spec) -> list[int]:
    """Epoch list from ``spec``: a list of ints, "similarity" (read selection.json) or "preset" (spec 2.1 lists)."""
    if spec in (None, "similarity"):
        sel = traj.path / "selection.json"
        if not sel.exists():
            raise UserError(f"no checkpoint selection in {traj.path}",
                            "run `raydistill surrogate --select` or pass extra.igd_epochs as a list")
        return [int(e) for e in json.loads(sel.read_text())["selected"]]
    if spec == "preset":
        key = (dataset, traj.config.net if traj.config.net != "convnet" else "convnet6")
        if key not in EPOCH_PRESETS:
            raise UserError(f"no preset checkpoint list for {key}", "pass extra.igd_epochs as a list of epochs")
        return list(EPOCH_PRESETS[key])
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(e, int) and not isinstance(e, bool) for e in spec):
        for e in spec:
            if not 0 <= e <= traj.epochs_done:
                raise UserError(f"surrogate epoch {e} is outside the trajectory (0..{traj.epochs_done})",
                                "pick epochs that exist")
        return list(spec)
    raise UserError(f"extra.igd_epochs must be a list of epochs, 'similarity' or 'preset', got {spec!r}",
                    "e.g. igd_epochs: [0, 2, 5]")
