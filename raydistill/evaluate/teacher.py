"""The soft-label teacher (benchmarks.md section 4): train one on a dataset's full training split, or load one.

- :func:`train_teacher` trains a fresh evaluation net (ConvNet-3 for Fashion-MNIST: ``build_eval_net("convnet")`` at
  28 px) on every training image and writes ``<out>.safetensors`` atomically, with metadata: the architecture, the
  dataset and its classes, the normalisation the net expects, the recipe and the test accuracy on the full test
  split. Recipe (ours; RDED used the authors' checkpoints): SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256, cosine
  annealing to 0 over the epochs, translate +-12.5% (DSA crop) + horizontal flip, the soft presets' normalisation.
  Resumable per epoch (a rerun of the same command continues where it stopped).
- :func:`load_teacher` reads a raydistill teacher, another safetensors file or a ``.pt``/``.pth`` state dict
  (``torch.load(weights_only=True)``; a ``state_dict``/``model`` entry and DataParallel ``module.`` prefixes are
  unwrapped), e.g. torchvision's ResNet-18 ImageNet-1K weights (architecture ``torchvision-resnet18``). A missing,
  unreadable or mismatched checkpoint (input channels, class count, layer shapes, normalisation) is one
  :class:`UserError` line, raised before any training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.config import BUILTIN_MODEL
from raydistill.errors import UserError
from raydistill.evaluate.augment import dsa_crop, random_flip
from raydistill.models.evalnets import EVAL_NET_NAMES, build_eval_net, convnet_depth_for_size

__all__ = [
    "BUILTIN_TEACHER",
    "TORCHVISION_RESNET18",
    "Teacher",
    "build_teacher_net",
    "channel_stats",
    "file_sha256",
    "load_teacher",
    "require_checkpoint",
    "teacher_state_path",
    "train_teacher",
]

BUILTIN_TEACHER = BUILTIN_MODEL / "teacher.safetensors"
TORCHVISION_RESNET18 = "torchvision-resnet18"
FORMAT = "raydistill-teacher/1"
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_FMNIST = ((0.2861,), (0.3530,))


def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel normalisation: the given stats (one value is broadcast), or for empty ones ImageNet's mean/std on
    RGB and Fashion-MNIST's (0.2861, 0.3530) on grey (the soft presets' "by channels" rule)."""
    if not mean:
        if channels not in (1, 3):
            raise UserError(f"no default normalisation for {channels}-channel images", "set the preset's mean/std")
        mean, std = _IMAGENET if channels == 3 else _FMNIST
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise UserError(f"the preset normalises {len(mean)} channels but the images have {channels}",
                        "override mean/std for this kind of image")
    return [float(m) for m in mean], [float(s) for s in std]


def build_teacher_net(name: str, channels: int, num_classes: int, image_size: int) -> nn.Module:
    """An evaluation net by protocol name (:func:`build_eval_net`) or torchvision's ResNet-18 (BatchNorm, RGB)."""
    if name != TORCHVISION_RESNET18:
        return build_eval_net(name, channels, num_classes, image_size)
    if channels != 3:
        raise UserError(f"{TORCHVISION_RESNET18} takes RGB images, not {channels} channel(s)", "use an RGB dataset")
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Teacher:
    """A loaded, frozen teacher in eval mode. ``meta`` is the raydistill metadata ({} for foreign checkpoints)."""

    module: nn.Module
    path: str
    sha256: str
    net: str
    channels: int
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """What a tracked run records about its teacher (MLflow params)."""
        acc = self.meta.get("test_accuracy")
        return {"teacher": self.path, "teacher_sha256": self.sha256, "teacher_net": self.net,
                "teacher_recorded_test_acc": None if acc is None else float(acc)}


_CHECKPOINT_FIX = "train one with `raydistill teacher --out PATH` or pass an existing safetensors/.pt checkpoint"


def require_checkpoint(path: str | Path) -> Path:
    """``path`` as a Path when it is a file; otherwise one :class:`UserError` line naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"teacher checkpoint not found: {p}", _CHECKPOINT_FIX)
    return p


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    fix = _CHECKPOINT_FIX
    require_checkpoint(path)
    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            if raw.get("format") == FORMAT:
                meta = json.loads(raw["meta"])
        elif path.suffix in (".pt", ".pth"):
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise UserError(f"teacher checkpoint {path} is neither .safetensors nor .pt/.pth", fix)
    except UserError:
        raise
    except Exception as e:  # safetensors / pickle raise many types for truncated or foreign files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read teacher checkpoint {path} (corrupt?): {msg}", fix) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"teacher checkpoint {path} holds no state dict of tensors", fix)
    return {k.removeprefix("module."): v for k, v in sd.items()}, meta


def load_teacher(path: str | Path, channels: int, image_size: int, net: str | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 device: str | torch.device = "cpu") -> Teacher:
    """Load a teacher checkpoint for ``channels``-channel ``image_size`` px images (see the module docstring).

    Args:
        path: ``.safetensors`` (raydistill's own carries its architecture) or ``.pt``/``.pth`` state dict.
        channels, image_size: what the student is trained on; the teacher sees exactly those batches.
        net: architecture of a checkpoint without raydistill metadata (an eval-net name or "torchvision-resnet18").
        mean, std: the student's per-channel normalisation; a raydistill teacher trained with other stats is refused.

    The class count is read from the checkpoint's classifier; the caller checks it against its classes.
    """
    p = Path(path)
    sd, meta = _read_checkpoint(p)
    arch = meta.get("net") or net
    if arch is None:
        raise UserError(f"teacher checkpoint {p} does not say its architecture",
                        f"set the preset's teacher_net (one of {', '.join(EVAL_NET_NAMES)}, {TORCHVISION_RESNET18})")
    if meta and (meta.get("channels"), meta.get("image_size")) != (channels, image_size):
        raise UserError(f"teacher {p} was trained on {meta.get('channels')}-channel {meta.get('image_size')} px "
                        f"images but the student gets {channels}-channel {image_size} px ones",
                        "train a teacher on this data (`raydistill teacher`) or evaluate at the teacher's size")
    if meta and mean is not None and (meta.get("mean"), meta.get("std")) != (mean, std):
        raise UserError(f"teacher {p} expects normalisation mean {meta.get('mean')} std {meta.get('std')}, "
                        f"the preset uses {mean} {std}", "use the preset's mean/std the teacher was trained with")
    probe = build_teacher_net(arch, channels, 1, image_size).state_dict()
    first = next(k for k, v in probe.items() if v.dim() == 4)
    head = [k for k, v in probe.items() if v.dim() == 2][-1]
    for key in (first, head):
        if key not in sd:
            raise UserError(f"teacher checkpoint {p} is not a {arch} (no {key!r})", "set teacher_net to its net")
    if sd[first].shape[1] != channels:
        raise UserError(f"teacher {p} takes {sd[first].shape[1]}-channel images but the set has {channels}",
                        "use a teacher trained on this dataset")
    num_classes = int(sd[head].shape[0])
    module = build_teacher_net(arch, channels, num_classes, image_size)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"teacher checkpoint {p} does not fit a {arch} at {image_size} px: {detail}",
                        "set teacher_net / the image size the teacher was trained at") from None
    module.eval().requires_grad_(False)
    return Teacher(module.to(device), str(p), file_sha256(p), arch, channels, num_classes, meta)


def _save_teacher_state(path: Path, settings: dict, epoch: int, seconds: float, model: nn.Module,
                        opt: torch.optim.Optimizer, sched, gen: torch.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"settings": json.dumps(settings, sort_keys=True), "epoch": epoch, "seconds": seconds,
                "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state()}, tmp)
    tmp.replace(path)


def _resume_teacher(path: Path, settings: dict, model: nn.Module, opt: torch.optim.Optimizer, sched,
                    gen: torch.Generator) -> tuple[int, float]:
    """Load a per-epoch state written by :func:`_save_teacher_state` (``weights_only=True``); returns the next epoch
    and the seconds already spent."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(st["settings"])
    except Exception as e:  # noqa: BLE001 - a torn or foreign file is the user's to remove
        raise UserError(f"unreadable teacher training state {path} ({type(e).__name__})",
                        "delete it to train from the first epoch") from None
    if saved != json.loads(json.dumps(settings, sort_keys=True)):
        diff = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v)
        raise UserError(f"the unfinished teacher training in {path} used other settings ({diff})",
                        "rerun with its settings to resume, or delete the file to start again")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    gen.set_state(st["gen"])
    return int(st["epoch"]) + 1, float(st["seconds"])


def teacher_state_path(out: str | Path) -> Path:
    """Where :func:`train_teacher` keeps its per-epoch state while ``out`` is being trained."""
    out = Path(out)
    return out.with_name(f".{out.name}.state.pt")


def train_teacher(ds, out: str | Path, net: str = "convnet", epochs: int = 20, batch_size: int = 256,
                  lr: float = 0.01, seed: int = 0, device: str | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a teacher on all of ``ds``'s training split (recipe in the module docstring); returns its metadata.

    Resumable per epoch: after every epoch the model, optimiser, schedule and augmentation RNG are written (temporary
    file + rename) to :func:`teacher_state_path`, and a rerun of the same command continues from the last finished
    epoch; the resumed weights equal an uninterrupted run's bit for bit. A state from other settings is one clear
    error. ``out`` is written once at the end via a temporary file and a rename (an existing file is replaced whole),
    and the state is then removed.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UserError("teacher epochs, batch size and lr must be positive", "fix --epochs/--batch-size/--lr")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"teacher output {out} must end in .safetensors", "pass --out PATH.safetensors")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size, ch = int(ds.image_size), int(ds.channels)
    key = str(net).strip().lower().replace("-", "_")
    arch = f"convnet{convnet_depth_for_size(size)}" if key == "convnet" else key
    mean, std = channel_stats((), (), ch)
    m = torch.tensor(mean, device=dev).view(1, ch, 1, 1)
    s = torch.tensor(std, device=dev).view(1, ch, 1, 1)
    x, y = ds.load("train")
    vx, vy = ds.load("test")
    torch.manual_seed(seed)
    model = build_teacher_net(arch, ch, ds.num_classes, size).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator(device=dev).manual_seed(seed)
    settings = {"net": arch, "dataset": ds.name, "train_images": len(x), "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "seed": seed}
    state_path = teacher_state_path(out)
    first, spent = 1, 0.0
    if state_path.exists():
        first, spent = _resume_teacher(state_path, settings, model, opt, sched, gen)
        if progress is not None:
            progress(f"teacher: resumed after epoch {first - 1}/{epochs} from {state_path}")
    t0 = time.time() - spent
    for epoch in range(first, epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1009 + epoch))
        loss_sum = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = random_flip(dsa_crop(x[idx].to(dev).float() / 255.0, gen), gen)
            loss = F.cross_entropy(model((xb - m) / s), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
        sched.step()
        _save_teacher_state(state_path, settings, epoch, time.time() - t0, model, opt, sched, gen)
        if progress is not None:
            progress(f"teacher epoch {epoch}/{epochs}: loss {loss_sum / len(x):.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(vx), 1024):
            xb = (vx[i:i + 1024].to(dev).float() / 255.0 - m) / s
            correct += int((model(xb).argmax(1).cpu() == vy[i:i + 1024]).sum())
    acc = 100.0 * correct / len(vx)
    meta = {"net": arch, "dataset": ds.name, "classes": list(ds.class_names), "channels": ch, "image_size": size,
            "mean": mean, "std": std, "test_accuracy": acc, "train_images": len(x), "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1),
            "recipe": "SGD 0.9/5e-4, cosine to 0, DSA crop + flip, cross-entropy on the full training split"}
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"format": FORMAT, "meta": json.dumps(meta)})
    tmp.replace(out)
    state_path.unlink(missing_ok=True)
    if progress is not None:
        progress(f"teacher {arch} on {ds.name}: test accuracy {acc:.2f}% -> {out}")
    return meta
