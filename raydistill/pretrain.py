"""Pretraining of the built-in Fashion-MNIST models: a small AutoencoderKL, then a small latent DiT.

Stages (each resumable from ``<work>/state.pt``, written atomically every ``ckpt_every`` steps):
1. ``vae``: L1 + MSE reconstruction + ``kl_weight`` KL on 32x32 padded images; then the latent scale factor is
   set to ``1 / std`` of the posterior-mean latents (the role 0.18215 plays for the SD VAE).
2. ``dit``: DiT loss (MSE on eps + VB, learned sigma; :func:`training_losses`) on latents sampled from the cached
   posteriors, label dropout 0.1 (CFG), AdamW, EMA; the EMA weights are shipped.
3. ``classifier``: a ConvNet-3 trained on the real training set, shipped to measure class consistency.
Outputs go to ``<out>/{vae,dit}`` (diffusers layout, safetensors, fp16; ``--dit-export-dtype fp32`` keeps the DiT
unrounded), ``<out>/classifier.safetensors`` and ``<out>/pretrain.json`` (config, command, log, timings).

The resume state lives outside the work tree by default (``$RAYDISTILL_PRETRAIN_HOME`` or
``~/.cache/raydistill/pretrain/<dit_size>``), so a run of several hours survives a fresh checkout. ``--vae-from`` /
``--classifier-from`` reuse a trained VAE / classifier instead of training them; ``--snapshot-every N`` keeps the
EMA DiT every N steps under ``<work>/snapshots/step-NNNNNN/`` (diffusers layout) for the FID-vs-steps curve of
``benchmarks/pretrain_curve.py``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from raydistill.diffusion.gaussian import q_sample, training_losses
from raydistill.diffusion.schedule import Schedule
from raydistill.errors import UserError
from raydistill.models.dit import DiTConfig, build_dit
from raydistill.models.vae import build_small_vae

EXPORT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class PretrainConfig:
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    vae_steps: int = 2800  # the defaults are the shipped model's recipe (docs/PRETRAINING.md; the first model:
    #   2000 VAE steps, blocks 16,32,32, DiT "fmnist" at 3e-4 for 6000 steps)
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    vae_blocks: str = "16,32"  # block widths: two blocks downsample x2 (16x16 latents), three x4 (8x8)
    vae_layers: int = 1  # ResNet layers per block
    vae_latent_channels: int = 4
    vae_only: bool = False  # train (or resume) the VAE stage, export it to <work>/vae with its scores, and stop
    dit_size: str = "fmnist/4"
    dit_steps: int = 24000
    dit_batch: int = 128
    dit_lr: float = 1e-3
    dit_warmup: int = 500
    ema_decay: float = 0.999
    clf_epochs: int = 2
    seed: int = 0
    ckpt_every: int = 250
    log_every: int = 100
    snapshot_every: int = 0  # 0: no snapshots; N: the EMA DiT every N steps under <work>/snapshots/
    vae_from: str = ""  # a diffusers AutoencoderKL folder to reuse instead of stage 1
    vae_init: str = ""  # a diffusers AutoencoderKL folder to start stage 1 from (fine-tune) instead of random weights
    classifier_from: str = ""  # a ConvNet-3 safetensors file to reuse instead of stage 3
    dit_init: str = ""  # a DiT snapshot folder (step-NNNNNN) to warm-start stage 2 from when <work> has no DiT state
    train_limit: int = 0  # 0: every training image; N: the first N of each class (smoke runs, tests)
    export_step: int = 0  # 0: export the DiT where training ends; N: the EMA snapshot of step N (the curve's pick)
    dit_export_dtype: str = "fp16"  # fp16 halves the shipped file; fp32 ships the snapshot bit for bit

    def __post_init__(self) -> None:
        if self.dit_export_dtype not in EXPORT_DTYPES:
            raise UserError(f"--dit-export-dtype must be one of {', '.join(EXPORT_DTYPES)}, got "
                            f"{self.dit_export_dtype!r}", "pass --dit-export-dtype fp16 or fp32")


def default_work(dit_size: str) -> Path:
    """Where resume state lives unless ``--work`` says otherwise: outside the repository's work tree."""
    home = os.environ.get("RAYDISTILL_PRETRAIN_HOME")
    root = Path(home) if home else Path.home() / ".cache" / "raydistill" / "pretrain"
    return root / dit_size.replace("/", "_")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# What an export writes into ``--out``; anything else there (feature_net, teacher, surrogate, minimax) is left as is.
EXPORTED = ("vae", "dit", "classifier.safetensors", "pretrain.json")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final``; an existing ``final`` is moved aside first and removed only once
    the new one is in place."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _forget_source(model) -> None:
    """Drop the ``_name_or_path`` diffusers records on ``from_pretrained``: an exported config would otherwise name
    the exporting machine's snapshot folder (and change the digest the shipped folder is keyed by with it)."""
    from diffusers.configuration_utils import FrozenDict

    model._internal_dict = FrozenDict({k: v for k, v in model._internal_dict.items() if k != "_name_or_path"})


def _pad32(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N,1,28,28] -> float [-1, 1] padded to 32x32 with the background value."""
    return F.pad(x.float() / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, work: Path, out: Path, device: str = "cpu", log=print) -> None:
        from raydistill.data import load_dataset

        self.cfg, self.work, self.out, self.device, self._log = cfg, work, out, torch.device(device), log
        work.mkdir(parents=True, exist_ok=True)
        self.ds = load_dataset(cfg.dataset, cfg.data_root)
        self.x, self.y = self.ds.load("train", limit=cfg.train_limit or None)
        self.state_path = work / "state.pt"
        self.state: dict = torch.load(self.state_path, weights_only=True) if self.state_path.exists() else {}
        self.lines: list[str] = list(self.state.get("log", []))

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.lines.append(line)
        self._log(line)

    def save(self, **kw) -> None:
        self.state.update(kw, log=self.lines)
        _atomic_save(self.state, self.state_path)

    # ---- stage 1: VAE --------------------------------------------------------------------------------------------
    def train_vae(self):
        cfg, dev = self.cfg, self.device
        if cfg.vae_from:
            from diffusers import AutoencoderKL

            self.log(f"vae: reused from {cfg.vae_from}")
            vae = AutoencoderKL.from_pretrained(cfg.vae_from, local_files_only=True, torch_dtype=torch.float32)
            return vae.to(dev).eval()
        blocks = tuple(int(w) for w in cfg.vae_blocks.split(","))
        vae = build_small_vae(channels=self.ds.channels, block_out=blocks, layers_per_block=cfg.vae_layers,
                              latent_channels=cfg.vae_latent_channels)
        vae = vae.to(dev).train()
        if cfg.vae_init and "vae" not in self.state:
            from diffusers import AutoencoderKL

            init = AutoencoderKL.from_pretrained(cfg.vae_init, local_files_only=True, torch_dtype=torch.float32)
            vae.load_state_dict(init.state_dict())
            self.log(f"vae: initialised from {cfg.vae_init}")
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        step = 0
        if "vae" in self.state:
            vae.load_state_dict(self.state["vae"])
            opt.load_state_dict(self.state["vae_opt"])
            step = int(self.state["vae_step"])
            self.log(f"vae: resumed at step {step}")
        g = torch.Generator().manual_seed(cfg.seed * 1000 + step)
        t0 = time.time()
        while step < cfg.vae_steps:
            lr = cfg.vae_lr * 0.5 * (1 + torch.cos(torch.tensor(step / cfg.vae_steps * torch.pi)).item())
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(self.x), (cfg.vae_batch,), generator=g)
            x = _pad32(self.x[idx]).to(dev)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=None)).sample
            l1, mse = (rec - x).abs().mean(), ((rec - x) ** 2).mean()
            kl = post.kl().mean() / x[0].numel()
            loss = l1 + mse + cfg.kl_weight * kl * x[0].numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.log_every == 0:
                self.log(f"vae step {step}/{cfg.vae_steps} l1 {l1.item():.4f} mse {mse.item():.5f} "
                         f"kl {kl.item():.3f} ({(time.time() - t0) / cfg.log_every:.3f} s/step)")
                t0 = time.time()
            if step % cfg.ckpt_every == 0 or step == cfg.vae_steps:
                self.save(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step)
        return vae.eval()

    @torch.no_grad()
    def export_vae(self, vae) -> Path:
        """``--vae-only``: the VAE (fp32, latent scale set) as a diffusers folder ``<work>/vae``, with the PSNR of its
        reconstructions of the first 1,000 test images in ``<work>/vae/scores.json`` (a later run reuses it with
        ``--vae-from <work>/vae``)."""
        from raydistill.models.vae import LatentCodec, psnr_db, reconstruct_images

        _, _, scale = self.encode_all(vae)
        vae.register_to_config(scaling_factor=scale)
        x, _ = self.ds.load("test" if self.ds.has_split("test") else "train", limit=100)
        psnr = psnr_db(x, reconstruct_images(LatentCodec(vae, image_size=x.shape[-1]), x))
        final, tmp = self.work / "vae", self.work / "vae.tmp"
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / "scores.json").write_text(json.dumps({"psnr_db": round(psnr, 3), "test_images": len(x),
                                                     "vae_step": int(self.state.get("vae_step", 0)),
                                                     "config": asdict(self.cfg)}, indent=1))
        _replace_dir(tmp, final)
        self.log(f"vae: exported to {final} (PSNR {psnr:.2f} dB on {len(x)} test images)")
        return final

    @torch.no_grad()
    def encode_all(self, vae) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Posterior means and stds of the whole training set, and the latent scale 1/std."""
        vae_step = int(self.state.get("vae_step", -1))  # latents of a VAE trained on since are encoded again
        if "lat_mean" in self.state and int(self.state.get("lat_vae_step", vae_step)) == vae_step:
            return self.state["lat_mean"], self.state["lat_std"], float(self.state["scale"])
        means, stds = [], []
        for i in range(0, len(self.x), 500):
            d = vae.encode(_pad32(self.x[i:i + 500]).to(self.device)).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        scale = float(vae.config.scaling_factor) if self.cfg.vae_from else float(1.0 / mean.std())
        self.log(f"latents: {tuple(mean.shape)}, posterior-mean std {mean.std():.4f} -> scale {scale:.5f}")
        self.save(lat_mean=mean, lat_std=std, scale=torch.tensor(scale), lat_vae_step=vae_step)
        return mean, std, scale

    # ---- stage 2: DiT --------------------------------------------------------------------------------------------
    def train_dit(self, lat_mean: torch.Tensor, lat_std: torch.Tensor, scale: float):
        cfg, dev = self.cfg, self.device
        dcfg = DiTConfig(size=cfg.dit_size, input_size=lat_mean.shape[-1], in_channels=lat_mean.shape[1],
                         num_classes=self.ds.num_classes)
        torch.manual_seed(cfg.seed)
        model = build_dit(dcfg).to(dev).train()
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, weight_decay=0.0)
        sched = Schedule.linear(1000, respace=None)
        step = start = 0  # start: where this run's warm-up began (0, or the step of a --dit-init snapshot)
        if "dit" in self.state:
            model.load_state_dict(self.state["dit"])
            ema.load_state_dict(self.state["dit_ema"])
            opt.load_state_dict(self.state["dit_opt"])
            step, start = int(self.state["dit_step"]), int(self.state.get("dit_init_step", 0))
            torch.set_rng_state(self.state["dit_rng"])
            self.log(f"dit: resumed at step {step}")
        elif cfg.dit_init:
            step = start = self._warm_start(model, ema, cfg.dit_init)
        n_params = sum(p.numel() for p in model.parameters())
        self.log(f"dit: {cfg.dit_size}, {n_params / 1e6:.2f} M params, latents {tuple(lat_mean.shape[1:])}")
        t0, run = time.time(), 0.0
        while step < cfg.dit_steps:
            for group in opt.param_groups:
                group["lr"] = cfg.dit_lr * min(1.0, (step - start + 1) / cfg.dit_warmup)
            idx = torch.randint(0, len(lat_mean), (cfg.dit_batch,))
            z0 = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])).to(dev) * scale
            y = self.y[idx].to(dev)
            t = torch.randint(0, 1000, (cfg.dit_batch,))
            noise = torch.randn_like(z0)
            zt = q_sample(sched, z0, t, noise)
            out = model(zt, timestep=t.to(dev), class_labels=y).sample
            loss = training_losses(sched, out, z0, zt, t, noise)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1.0 - cfg.ema_decay)
            step += 1
            run = 0.98 * run + 0.02 * loss.item() if run else loss.item()
            if step % cfg.log_every == 0:
                self.log(f"dit step {step}/{cfg.dit_steps} loss {run:.4f} "
                         f"({(time.time() - t0) / cfg.log_every:.3f} s/step)")
                t0 = time.time()
            if step % cfg.ckpt_every == 0 or step == cfg.dit_steps:
                self.save(dit=model.state_dict(), dit_ema=ema.state_dict(), dit_opt=opt.state_dict(),
                          dit_step=step, dit_rng=torch.get_rng_state(), dit_init_step=start)
            if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                self.snapshot(ema, step)
        return ema

    def _warm_start(self, model, ema, folder: str) -> int:
        """``--dit-init``: model and EMA both start from a snapshot's EMA weights and the step count from its name
        (``step-NNNNNN``); the optimizer starts afresh, with the warm-up again. Not bit-exact with an uninterrupted
        run (Adam's moments and the raw weights are lost): it is how a run continues on a machine where only the
        snapshot survived (docs/PRETRAINING.md)."""
        import re

        from raydistill.models.dit_convert import load_dit

        path = Path(folder)
        m = re.fullmatch(r"step-(\d+)", path.name)
        if not (path / "config.json").exists() or not m:
            raise UserError(f"--dit-init {folder} is not a DiT snapshot folder (step-NNNNNN with a config.json)",
                            "pass a folder from <work>/snapshots/ or a copy of one under the same name")
        init = load_dit(path, device=self.device).float().state_dict()
        try:
            model.load_state_dict(init)
        except RuntimeError as e:
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise UserError(f"--dit-init {folder} does not fit --dit-size {self.cfg.dit_size} on these latents: "
                            f"{first}", "pass the --dit-size and --vae-from the snapshot was trained with") from None
        ema.load_state_dict(init)
        step = int(m.group(1))
        torch.manual_seed(self.cfg.seed * 1000 + step)
        self.log(f"dit: initialised from {folder} at step {step} (fresh optimizer, warm-up again)")
        return step

    def snapshot(self, ema, step: int) -> Path:
        """The EMA DiT at ``step`` as a diffusers folder (fp32), written to a temporary name and renamed."""
        final = self.work / "snapshots" / f"step-{step:06d}"
        if not final.exists():
            tmp = final.with_name(final.name + ".tmp")
            copy.deepcopy(ema).save_pretrained(tmp, safe_serialization=True)
            os.replace(tmp, final)
            self.log(f"dit: snapshot {final.name}")
        return final

    def load_snapshot(self, step: int):
        """The EMA DiT snapshot of ``step`` (``--export-step``: ship the point the curve chose, not the last one)."""
        from raydistill.models.dit_convert import load_dit

        path = self.work / "snapshots" / f"step-{step:06d}"
        if not (path / "config.json").exists():
            have = sorted(int(p.name[5:]) for p in (self.work / "snapshots").glob("step-??????"))
            raise UserError(f"no DiT snapshot of step {step} in {self.work / 'snapshots'} (have: "
                            f"{', '.join(map(str, have)) or 'none'})", "pass --export-step one of those steps")
        self.log(f"dit: exporting the EMA snapshot of step {step}")
        return load_dit(path, device=self.device)

    # ---- stage 3: classifier for the class-consistency check ----------------------------------------------------
    def train_classifier(self):
        from raydistill.models.evalnets import build_eval_net

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        net = build_eval_net("convnet3", self.ds.channels, self.ds.num_classes, self.ds.image_size).to(self.device)
        if cfg.classifier_from:
            from safetensors.torch import load_file

            net.load_state_dict(load_file(cfg.classifier_from))
            self.log(f"classifier: reused from {cfg.classifier_from}")
            return net.eval()
        if "clf" in self.state:
            net.load_state_dict(self.state["clf"])
            return net.eval()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        x = self.x.float() / 255.0
        for epoch in range(cfg.clf_epochs):
            perm = torch.randperm(len(x))
            t0 = time.time()
            for i in range(0, len(x), 256):
                b = perm[i:i + 256]
                loss = F.cross_entropy(net(normalize_fmnist(x[b].to(self.device))), self.y[b].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            acc = classifier_accuracy(net, *self.ds.load("test"))
            self.log(f"classifier epoch {epoch + 1}/{cfg.clf_epochs}: test accuracy {acc:.2f}% "
                     f"({time.time() - t0:.0f} s)")
        self.save(clf=net.state_dict())
        return net.eval()

    def run(self, command: str) -> None:
        t_start = time.time()
        self.log(f"pretrain: {json.dumps(asdict(self.cfg))}")
        vae = self.train_vae()
        if self.cfg.vae_only:
            self.export_vae(vae)
            return
        mean, std, scale = self.encode_all(vae)
        ema = self.load_snapshot(self.cfg.export_step) if self.cfg.export_step else self.train_dit(mean, std, scale)
        clf = self.train_classifier()
        self.export(vae, ema, clf, scale, command, time.time() - t_start)

    def export(self, vae, dit, clf, scale: float, command: str, seconds: float) -> None:
        from safetensors.torch import save_file

        tmp = self.out.with_name(self.out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
        tmp.mkdir(parents=True)
        vae.register_to_config(scaling_factor=scale)
        for name, model, dtype in (("vae", vae, torch.float16), ("dit", dit, EXPORT_DTYPES[self.cfg.dit_export_dtype])):
            _forget_source(model)
            model.to(dtype).save_pretrained(tmp / name, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, tmp / "classifier.safetensors")
        info = {"config": asdict(self.cfg), "command": command, "device": str(self.device),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "seconds_this_session": round(seconds, 1), "latent_scale": scale, "log": self.lines}
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=1))
        self.out.mkdir(parents=True, exist_ok=True)
        for name in EXPORTED:  # only what pretraining makes: the feature net, teacher, surrogate and fine-tune stay
            if (tmp / name).is_dir():
                _replace_dir(tmp / name, self.out / name)
            else:
                os.replace(tmp / name, self.out / name)
        tmp.rmdir()
        self.log(f"exported to {self.out}")


def normalize_fmnist(x01: torch.Tensor) -> torch.Tensor:
    """The DC protocol's Fashion-MNIST normalisation (the evaluation presets' constants)."""
    from raydistill.evaluate.presets import FMNIST_MEAN, FMNIST_STD

    return (x01 - FMNIST_MEAN[0]) / FMNIST_STD[0]


@torch.no_grad()
def classifier_accuracy(net, x_uint8: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Percent of ``x`` (uint8 or [0,1] float) that ``net`` labels as ``y``."""
    net.eval()
    correct = 0
    dev = next(net.parameters()).device
    for i in range(0, len(x_uint8), batch):
        xb = x_uint8[i:i + batch]
        xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
        correct += (net(normalize_fmnist(xb.to(dev))).argmax(1).cpu() == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x_uint8)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="raydistill pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "assets" / "fmnist"))
    ap.add_argument("--work", default=None,
                    help="resumable state lives here (default: $RAYDISTILL_PRETRAIN_HOME or "
                         "~/.cache/raydistill/pretrain/<dit-size>, outside the work tree)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, f in PretrainConfig.__dataclass_fields__.items():
        if name in ("dataset", "data_root"):
            continue
        if isinstance(f.default, bool):
            ap.add_argument("--" + name.replace("_", "-"), action="store_true")
        else:
            ap.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(a, k) for k in PretrainConfig.__dataclass_fields__ if hasattr(a, k)})
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work) if a.work else default_work(cfg.dit_size)
    Pretrainer(cfg, work, Path(a.out), device=a.device,
               log=lambda s: print(s, flush=True)).run(" ".join(["raydistill", "pretrain", *argv]))


if __name__ == "__main__":
    main()
