"""Minimax diffusion (spec 1): DiffFit fine-tuning of a DiT with the minimax criteria (:mod:`.losses`) and its
outputs; sampling from the fine-tune is :mod:`.router`.

Fine-tuning (spec 1.2-1.3), per step:

    z      = E(x).sample() * scale                       batch of B real images of the phase's classes, random flip
    t      ~ U{0..999};  z_t = q_sample(z, t, eps)
    L_diff = MSE(eps) + VB                               learned-variance DiT loss (diffusion.gaussian.training_losses)
    x0_hat = predict_x0(z_t, t, eps_theta)               the "pseudo embedding" (carries the graph)
    for each class c in the batch with a non-empty P_c:
        L_r(c) = 1 - min_{i in batch_c, j in R_c} cos(x0_hat_i, r_j)     representativeness
        L_d(c) =     max_{i in batch_c, j in P_c} cos(x0_hat_i, p_j)     diversity
    L = L_diff + sum_c [lambda_pos L_r(c) + lambda_neg L_d(c)] / (#classes in batch)
    then R_c <- FIFO(R_c + z_c), P_c <- FIFO(P_c + x0_hat_c.detach()), 64 entries each

AdamW (lr 1e-3, weight decay 0, constant) on the DiffFit trainable set (:mod:`raydistill.methods.minimax.difffit`);
the EMA (0.9999, initialised from the model, updated every step) is what sampling uses (spec 1.2 "Subtlety"). The model
stays in train mode (label dropout 0.1 keeps CFG usable). More than ``max_classes`` (20) classes are split into
phases of ``phase_size`` (10) classes with one fine-tune each (spec 1.5); sampling routes every class to its phase.

Outputs (``<out>``): ``minimax.json`` (the index: base model reference = path + sha256, phases and their classes)
and per phase ``phase-NN/ema.safetensors`` (the EMA values of the trainable parameters: the only tensors that differ
from the base, ~1.7 M for DiT-XL/2), ``phase-NN/model.safetensors`` (the raw fine-tuned values) and
``phase-NN/finetune.json``. Training state for resuming is ``phase-NN/state.pt`` (written atomically every
``ckpt_every`` steps, read with ``weights_only=True``).

Deviations (deliberate): only the trainable parameters are averaged into the EMA (the original also averages the
frozen ones, which only adds rounding noise, its own TODO notes this); the data order is a seeded permutation per
epoch and every step reseeds the global RNG from (seed, phase, step), so a resumed run is bit-identical to an
uninterrupted one; each step encodes its batch with the VAE (posterior sample) like the original.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from raydistill.errors import UserError
from raydistill.methods.minimax.losses import ClassMemory, minimax_loss
from raydistill.outputs import atomic_write_text

INDEX_FILE = "minimax.json"


# ----------------------------------------------------------------------------------------------------------------------
# configuration

@dataclass(frozen=True)
class FinetuneConfig:
    """Spec 1.1-1.3 defaults: 8 epochs of batch 8, AdamW 1e-3, EMA 0.9999, lambdas 0.002 / 0.008, memory 64."""

    epochs: int = 8
    steps: int | None = None  # None: epochs x (images // batch); else this many steps (data still in epochs)
    batch_size: int = 8
    lr: float = 1e-3
    ema_decay: float = 0.9999
    lambda_pos: float = 0.002
    lambda_neg: float = 0.008
    memory_size: int = 64
    finetune_ipc: int | None = None  # images per class to fine-tune on; None = all (the original's -1)
    flip: bool = True  # random horizontal flip (the original's transform)
    gamma_blocks: int | None = None  # gammas in the first N blocks; None = depth // 2 (spec: 14 of 28)
    phase_size: int = 10  # classes per fine-tuned model when there are more than max_classes (spec 1.5)
    max_classes: int = 20
    seed: int = 0
    ckpt_every: int = 250
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "memory_size", "phase_size", "max_classes", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"finetune {name} must be a positive integer, got {v!r}", f"fix --{name}")
        for name in ("steps", "finetune_ipc", "gamma_blocks"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "gamma_blocks"
                                                                                     else 1)):
                raise UserError(f"finetune {name} must be a positive integer, got {v!r}", f"fix --{name}")
        for name in ("lr", "lambda_pos", "lambda_neg"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"finetune {name} must be a finite number >= 0, got {v!r}", f"fix --{name}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}", "the spec uses 0.9999")

    def training_key(self) -> dict:
        """Fields that determine the trained weights (logging/checkpoint cadence excluded)."""
        return {k: v for k, v in asdict(self).items() if k not in ("ckpt_every", "log_every")}


# Fashion-MNIST preset for a 2-core CPU: 10,000 steps of batch 8 instead of 8 epochs of 60,000 images (60,000 steps).
# Measured for the built-in DiT (24,416 trainable parameters), OMP_NUM_THREADS=1, on this 2-core CPU shared with
# benchmark jobs (load average ~7): 0.076-0.145 s/step, so 13-24 minutes plus ~25 s of start-up -- inside 30 minutes
# even at the slowest rate seen (the official run's 12,000 steps would reach 29 min there). 80,000 image visits
# (1.3 epochs) against the official ~104,000 (8 epochs of ~13,000 ImageNet images); the spec's EMA 0.9999 is kept,
# which leaves 0.9999 ** 10,000 = 37% of the EMA on the pre-trained weights (official run: 30%).
FINETUNE_PRESETS: dict[str, dict] = {
    "fashion-mnist": {"steps": 10000, "ckpt_every": 500, "log_every": 100},
}


def finetune_preset(dataset: str) -> dict:
    """Default settings for ``dataset`` (empty: the spec's defaults)."""
    return dict(FINETUNE_PRESETS.get(dataset, {}))


# ----------------------------------------------------------------------------------------------------------------------
# base model reference

def path_digest(path: str | Path) -> str:
    """sha256 of a file, or of a diffusers folder (its config.json and weight files, names included, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and
                                           (f.name == "config.json" or f.suffix in (".safetensors", ".bin")))
    for f in files:
        if p.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def phase_chunks(labels: Sequence[int], cfg: FinetuneConfig) -> list[list[int]]:
    """One phase for up to ``max_classes`` classes, else chunks of ``phase_size`` in order (spec 1.5)."""
    labels = list(labels)
    if len(labels) <= cfg.max_classes:
        return [labels]
    return [labels[i:i + cfg.phase_size] for i in range(0, len(labels), cfg.phase_size)]


# ----------------------------------------------------------------------------------------------------------------------
# the fine-tuning loop

def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _step_seed(seed: int, phase: int, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(phase), int(step)]).generate_state(1, dtype=np.uint64)[0]
               & ((1 << 63) - 1))


class PhaseTrainer:
    """Fine-tunes one DiffFit DiT on the classes ``labels`` of ``ds`` (spec 1.3), resumable from ``work/state.pt``.

    ``model``: a DiT with :func:`apply_difffit` applied (its base weights loaded), on ``device``.
    """

    def __init__(self, model, codec, ds, labels: Sequence[int], cfg: FinetuneConfig, work: Path, phase: int = 0,
                 base: dict | None = None, device: str | torch.device = "cpu") -> None:
        self.model, self.codec, self.ds, self.cfg = model, codec, ds, cfg
        self.labels = [int(c) for c in labels]
        self.work, self.phase, self.base = Path(work), phase, base or {}
        self.device = torch.device(device)
        self.work.mkdir(parents=True, exist_ok=True)
        pools = [ds.indices("train", c, cfg.finetune_ipc) for c in self.labels]
        self.positions = np.concatenate(pools).astype(np.int64)  # [N] natural-order positions in the train split
        self.pos_labels = np.concatenate([np.full(len(p), c, dtype=np.int64) for p, c in zip(pools, self.labels)])
        self.steps_per_epoch = len(self.positions) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"{len(self.positions)} training images are fewer than one batch of {cfg.batch_size}",
                            "lower --batch-size or use more images per class")
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def key(self) -> dict:
        return {"config": self.cfg.training_key(), "labels": self.labels, "base": self.base.get("sha256")}

    def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, subset labels) of step ``step``: epoch-seeded permutation, drop_last (DataLoader-like)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.cfg.seed, self.phase, epoch])
            self._perm = (epoch, rng.permutation(len(self.positions)))
        b = self._perm[1][k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]
        return self.positions[b], self.pos_labels[b]

    def run(self, progress: Callable[[str], None] | None = None,
            on_metrics: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Tensor]:
        """Train to ``total_steps`` (resuming if a state exists); returns the EMA trainable tensors."""
        from raydistill.diffusion.gaussian import q_sample, training_losses
        from raydistill.diffusion.schedule import Schedule
        from raydistill.methods.minimax.difffit import load_trainable_state

        cfg, model, dev = self.cfg, self.model, self.device
        say = progress or (lambda m: None)
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        ema = {n: p.detach().clone() for n, p in zip(self.names, self.params)}  # EMA initialised from the model
        memory = ClassMemory(cfg.memory_size)
        step, log = 0, []
        state_path = self.work / "state.pt"
        if state_path.exists():
            st = torch.load(state_path, map_location="cpu", weights_only=True)
            if json.loads(st["key"]) != json.loads(json.dumps(self.key)):
                raise UserError(f"{self.work} holds a fine-tune with other settings",
                                "pass another --out, or delete that folder to start over")
            load_trainable_state(model, st["model"], source=str(state_path))
            ema = {n: v.to(dev) for n, v in st["ema"].items()}
            opt.load_state_dict(st["opt"])
            memory = ClassMemory.from_state(st["memory"], dev)
            step, log = int(st["step"]), json.loads(st["log"])
            say(f"phase {self.phase}: resumed at step {step}/{self.total_steps}")
        sched = Schedule.linear(1000, respace=None)
        dit_labels = torch.as_tensor(self.ds.dit_labels, dtype=torch.long)
        model.train()  # label dropout 0.1 (CFG), as the original
        t0, acc, n_acc = time.time(), np.zeros(4), 0
        while step < self.total_steps:
            torch.manual_seed(_step_seed(cfg.seed, self.phase, step))
            pos, lab = self._batch(step)
            x = self.ds.read("train", pos).float().div(127.5).sub(1.0)  # [B, C, H, W] in [-1, 1]
            if cfg.flip:
                flip = torch.rand(len(x)) < 0.5
                x[flip] = x[flip].flip(-1)
            y = torch.as_tensor(lab)  # [B] subset labels (memory keys)
            with torch.no_grad():
                z = self.codec.encode(x.to(dev), sample=True)  # [B, c, h, w] latent * scale
            t = torch.randint(0, 1000, (len(z),))
            noise = torch.randn_like(z)
            zt = q_sample(sched, z, t, noise)
            out = model(zt, timestep=t.to(dev), class_labels=dit_labels[y].to(dev)).sample  # [B, 2c, h, w]
            terms = training_losses(sched, out, z, zt, t, noise)
            l_diff = terms["loss"].mean()
            l_mm, l_pos, l_neg = minimax_loss(terms["x0_hat"], y.to(dev), memory, cfg.lambda_pos, cfg.lambda_neg)
            loss = l_diff + l_mm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for n, p in zip(self.names, self.params):
                    ema[n].mul_(cfg.ema_decay).add_(p.detach(), alpha=1.0 - cfg.ema_decay)
                x0 = terms["x0_hat"].detach()
                for c in sorted(set(lab.tolist())):
                    m = y.to(dev) == c
                    memory.push(c, z[m], x0[m])
            step += 1
            acc += np.array([loss.item(), l_diff.item(), l_pos.item(), l_neg.item()])
            n_acc += 1
            if step % cfg.log_every == 0 or step == self.total_steps:
                m = dict(zip(("loss", "loss_diffusion", "loss_representativeness", "loss_diversity"), acc / n_acc))
                m["seconds_per_step"] = (time.time() - t0) / n_acc
                log.append({"step": step, **{k: round(float(v), 6) for k, v in m.items()}})
                say(f"phase {self.phase} step {step}/{self.total_steps} loss {m['loss']:.4f} (diffusion "
                    f"{m['loss_diffusion']:.4f}, repr {m['loss_representativeness']:.5f}, div "
                    f"{m['loss_diversity']:.5f}) {m['seconds_per_step']:.3f} s/step")
                if on_metrics is not None:
                    on_metrics(m, step)
                t0, acc, n_acc = time.time(), np.zeros(4), 0
            if step % cfg.ckpt_every == 0 or step == self.total_steps:
                _atomic_torch_save({"key": json.dumps(self.key), "step": step,
                                    "model": {n: p.detach().cpu() for n, p in zip(self.names, self.params)},
                                    "ema": {n: v.cpu() for n, v in ema.items()}, "opt": opt.state_dict(),
                                    "memory": {"size": memory.size,
                                               "real": {c: v.cpu() for c, v in memory.real.items()},
                                               "pseudo": {c: v.cpu() for c, v in memory.pseudo.items()}},
                                    "log": json.dumps(log)}, state_path)
        model.eval()
        self.log = log
        return {n: v.detach().cpu() for n, v in ema.items()}


def open_finetune(ds, dit_path: str | Path, vae_path: str | Path, out: str | Path, cfg: FinetuneConfig,
                  labels: Sequence[int] | None = None, model_size: str | None = None) -> dict:
    """Write (or, on a rerun with the same base model and classes, keep) the unfinished index of a fine-tune of
    ``labels`` (default: all classes of ``ds``) into ``out``; returns it. Another base or other classes: UserError."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(range(ds.num_classes)) if labels is None else [int(c) for c in labels]
    base = {"path": str(Path(dit_path).resolve()), "sha256": path_digest(dit_path), "model_size": model_size,
            "vae": str(Path(vae_path).resolve())}
    phases = phase_chunks(labels, cfg)
    index = {"format": "raydistill-minimax-1", "dataset": ds.name, "base": base, "config": asdict(cfg),
             "phases": [{"dir": f"phase-{p:02d}", "labels": ch, "class_names": [ds.class_names[c] for c in ch],
                         "dit_labels": [int(ds.dit_labels[c]) for c in ch]} for p, ch in enumerate(phases)]}
    old = out / INDEX_FILE
    if old.exists():
        prev = json.loads(old.read_text())
        if (prev.get("base", {}).get("sha256"), prev.get("phases")) != (base["sha256"], index["phases"]):
            raise UserError(f"{out} holds a fine-tune of another base model or other classes",
                            "pass another --out, or delete that folder to start over")
    atomic_write_text(out / INDEX_FILE, json.dumps({**index, "complete": False}, indent=1))
    return index


def phase_done(out: str | Path, index: dict, p: int) -> bool:
    """Phase ``p`` is committed: its ``ema.safetensors`` (renamed into place last) and ``finetune.json`` exist."""
    pdir = Path(out) / index["phases"][p]["dir"]
    return (pdir / "ema.safetensors").exists() and (pdir / "finetune.json").exists()


def finetune_phase(ds, vae_path: str | Path, out: str | Path, index: dict, p: int, cfg: FinetuneConfig,
                   device: str | torch.device | None = None, progress: Callable[[str], None] | None = None,
                   on_metrics: Callable[[dict[str, float], int], None] | None = None) -> bool:
    """Fine-tune phase ``p`` of ``index`` (from :func:`open_finetune`) into ``<out>/phase-NN``; False when it was
    already done. Independent of the other phases (its own model, seeds from (seed, phase, step)), so phases may
    run in any order or at once. Commit: ``finetune.json`` and ``model.safetensors`` first, then
    ``ema.safetensors.tmp`` renamed to ``ema.safetensors`` (what :func:`phase_done` checks)."""
    from safetensors.torch import save_file

    from raydistill.methods.minimax.difffit import apply_difffit, embedders_tied, gamma_blocks_of, trainable_state
    from raydistill.models.dit import dit_config_of
    from raydistill.models.dit_convert import load_dit
    from raydistill.models.vae import load_vae

    say = progress or (lambda m: None)
    out, phase = Path(out), index["phases"][p]
    pdir = out / phase["dir"]
    if phase_done(out, index, p):
        say(f"phase {p}: already done")
        return False
    t_start = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = index["base"]
    codec = load_vae(vae_path, image_size=ds.image_size, device=dev).requires_grad_(False)
    model = load_dit(base["path"], size=base["model_size"], device=dev)
    depth = len(model.transformer_blocks)
    apply_difffit(model, list(range(cfg.gamma_blocks)) if cfg.gamma_blocks is not None else None)
    n_train = sum(p_.numel() for p_ in model.parameters() if p_.requires_grad)
    trainer = PhaseTrainer(model, codec, ds, phase["labels"], cfg, pdir, phase=p, base=base, device=dev)
    say(f"phase {p}: classes {phase['class_names']}, {len(trainer.positions)} images, {trainer.total_steps} steps "
        f"({trainer.steps_per_epoch} per epoch), {n_train:,} trainable parameters of "
        f"{sum(p_.numel() for p_ in model.parameters()):,}")
    ema = trainer.run(progress, on_metrics)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()},
              pdir / "model.safetensors.tmp")
    os.replace(pdir / "model.safetensors.tmp", pdir / "model.safetensors")
    info = {"phase": p, **phase, "base": base, "dit": dit_config_of(model).to_dict(), "depth": depth,
            "gamma_blocks": gamma_blocks_of(model), "tied_embedders": embedders_tied(model),
            "trainable_parameters": n_train, "steps": trainer.total_steps, "config": asdict(cfg), "device": str(dev),
            "seconds_last_session": round(time.time() - t_start, 1), "log": trainer.log}
    atomic_write_text(pdir / "finetune.json", json.dumps(info, indent=1))
    save_file({k: v.contiguous() for k, v in ema.items()}, pdir / "ema.safetensors.tmp")
    os.replace(pdir / "ema.safetensors.tmp", pdir / "ema.safetensors")
    say(f"phase {p}: wrote {pdir / 'ema.safetensors'}")
    return True


def close_finetune(out: str | Path, index: dict) -> dict:
    """Mark the fine-tune complete once every phase is committed (:func:`phase_done`); returns the index."""
    missing = [p for p in range(len(index["phases"])) if not phase_done(out, index, p)]
    if missing:
        raise RuntimeError(f"phases {missing} of the fine-tune in {out} are not done; rerun to resume")
    index = {**index, "complete": True}
    atomic_write_text(Path(out) / INDEX_FILE, json.dumps(index, indent=1))
    return index


def finetune(ds, dit_path: str | Path, vae_path: str | Path, out: str | Path, cfg: FinetuneConfig,
             labels: Sequence[int] | None = None, model_size: str | None = None, device: str | None = None,
             progress: Callable[[str], None] | None = None,
             on_metrics: Callable[[dict[str, float], int, int], None] | None = None) -> dict:
    """Fine-tune every phase of ``labels`` (default: all classes of ``ds``) into ``out``, one after another, in this
    process; returns the index. (``orchestration.finetune_job`` runs the phases as parallel Ray tasks instead.)

    Resumable: finished phases are skipped, an interrupted one continues from its ``state.pt``.
    ``on_metrics(metrics, step, phase)`` receives the logged loss averages (MLflow curves).
    """
    say = progress or (lambda m: None)
    index = open_finetune(ds, dit_path, vae_path, out, cfg, labels, model_size)
    n = len(index["phases"])
    if n > 1:
        say(f"{sum(len(ph['labels']) for ph in index['phases'])} classes > {cfg.max_classes}: {n} phases of up to "
            f"{cfg.phase_size} classes")
    for p in range(n):
        finetune_phase(ds, vae_path, out, index, p, cfg, device, progress,
                       None if on_metrics is None else (lambda m, s, _p=p: on_metrics(m, s, _p)))
    return close_finetune(out, index)


def finetune_config_from(settings: dict) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from a mapping, rejecting unknown keys as a UserError."""
    known = {f.name for f in fields(FinetuneConfig)}
    bad = sorted(set(settings) - known)
    if bad:
        raise UserError(f"unknown finetune setting(s): {', '.join(bad)}", f"valid: {', '.join(sorted(known))}")
    return FinetuneConfig(**settings)
