"""Distillation in plain torch: plan class shards, run one shard (the unit a Ray actor serves), evaluate a set.

A *method* (:mod:`raydistill.methods`: one registry of parts and their combinations) turns a shard (one class, some
image indices) into images and manifest rows: a real part picks training images; generative methods sample the
generator with their parts' guidance terms. :func:`distill_local` runs everything in-process; the Ray pipeline calls
the same :class:`ShardRunner` from its actors, so both produce the same bytes for the same seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from raydistill.config import DistillConfig
from raydistill.data import ClassDataset, load_dataset, resolve_classes
from raydistill.errors import UserError
from raydistill.methods import MethodContext, get_method
from raydistill.outputs import DistilledSetWriter, Shard, png_bytes, read_image, save_grid
from raydistill.storage import is_uri


def open_dataset(cfg: DistillConfig) -> ClassDataset:
    return load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size, nclass=cfg.nclass, phase=cfg.phase,
                        allow_other_split=cfg.allow_other_split)


def selected_labels(cfg: DistillConfig, ds: ClassDataset) -> list[int]:
    return resolve_classes(ds, list(cfg.classes) if cfg.classes else None)


def plan_shards(cfg: DistillConfig, labels: list[int], shard_size: int | None = None) -> list[Shard]:
    """Split each class's images 0..IPC-1 into shards of ``shard_size`` (None: one shard per class).

    Methods with per-class sequential state (a part with ``whole_class``: IGD's deviation memory) must keep a class in
    one shard; they set ``shard_size=None``.
    """
    from raydistill.diffusion.sampler import image_seed

    if shard_size is not None and get_method(cfg.method).whole_class and shard_size < cfg.ipc:
        raise UserError(f"--shard-size {shard_size} would split classes, but {cfg.method} keeps per-class sequential "
                        "state (IGD's deviation memory), so each class must stay in one shard",
                        "leave --shard-size unset for this method")
    size = shard_size or cfg.ipc
    shards = []
    for c in labels:
        for start in range(0, cfg.ipc, size):
            idx = list(range(start, min(cfg.ipc, start + size)))
            shards.append(Shard(f"c{c:04d}-i{start:05d}", c, idx, [image_seed(cfg.seed, c, k) for k in idx]))
    return shards


def set_dir(root: str | Path, cfg: DistillConfig, method: str) -> Path:
    return Path(root) / cfg.dataset / f"{method}-ipc{cfg.ipc}-seed{cfg.seed}"


def set_configs(cfg: DistillConfig, root: str | Path) -> dict[str, DistillConfig]:
    """One config per set the main job makes: the method (into ``cfg.out`` when given) and each baseline.

    A generative baseline (``dit`` beside ``mgd3``, say) samples with the method's generator settings (CFG scale,
    steps) but keeps only the method parameters of its own parts, so it is the plain baseline at the same CFG: its
    fingerprint, expected band and tracked parameters are those of that baseline run on its own. Real-image baselines
    keep ``extra`` whole (they ignore it; their sets made before keep their fingerprint)."""
    methods = [cfg.method] + [b for b in cfg.baselines if b != cfg.method]
    out = {}
    for m in methods:
        c = cfg.with_(method=m, out=cfg.out if (m == cfg.method and cfg.out) else str(set_dir(root, cfg, m)),
                      published=cfg.published if m == cfg.method else {})  # a paper cell's figure: its method's
        spec = get_method(m)
        if m != cfg.method and spec.generative:
            c = c.with_(extra={k: v for k, v in cfg.extra.items() if k in spec.param_keys()})
        out[m] = c
    return out


class ShardRunner:
    """Holds the heavy state (dataset, generator, guidance state) and turns shards into PNGs + manifest rows."""

    def __init__(self, cfg: DistillConfig, device: str | torch.device | None = None, ds: ClassDataset | None = None,
                 generator=None) -> None:
        """``ds`` and ``generator`` may come already loaded (a Tune worker's cache); the guidance terms, which hold
        the method parameters, are always built for ``cfg``."""
        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.params = self.method.parse(cfg.extra, cfg)
        self.ds = ds if ds is not None else open_dataset(cfg)
        self.generator = None
        self.terms: list = []
        codec = None
        if self.method.needs_codec:
            from raydistill.generator import resolve_model_paths
            from raydistill.models.vae import load_vae

            codec = load_vae(resolve_model_paths(cfg)[1], image_size=self.ds.image_size, device=device or "cpu")
        if self.method.generative:
            from raydistill.generator import load_generator

            self.generator = generator or load_generator(cfg, self.ds.dit_labels, self.ds.image_size, device)
            codec = self.generator.codec
        self.ctx = MethodContext(cfg, self.ds, selected_labels(cfg, self.ds), self.generator, codec, self.method.base)
        for part in self.method.parts:
            if part.terms is not None:
                self.terms += part.terms(self.ctx, self.params.get(part.name))

    def images(self, shard: Shard) -> tuple[torch.Tensor, list[int]]:
        """uint8 images [B, C, H, W] of the shard and the per-image seed (or real index for real methods)."""
        cfg, real = self.cfg, self.method.real
        if real is not None:
            chosen = real.select(self.ctx, self.params.get(real.name), shard.class_label)[shard.indices]
            imgs = self.ds.read("train", chosen)
            if real.transform is not None:
                imgs = real.transform(self.ctx, self.params.get(real.name), imgs)
            return imgs, [int(i) for i in chosen]
        out = []
        batch = self.method.batch_size(self.params, cfg.batch_size)
        for start in range(0, len(shard.indices), batch):
            idx = shard.indices[start:start + batch]
            out.append(self.generator.generate([shard.class_label] * len(idx), idx, cfg.seed, self.terms))
        return torch.cat(out), list(shard.seeds)

    def run(self, shard: Shard) -> tuple[list[dict], list[bytes]]:
        t0 = time.time()
        imgs, seeds = self.images(shard)
        params = json.dumps(self.cfg.generation_key(), sort_keys=True, default=str)
        rows, pngs = [], []
        for k, img, sd in zip(shard.indices, imgs, seeds):
            rows.append({"class_name": self.ds.class_names[shard.class_label], "label": shard.class_label,
                         "dit_label": self.ds.dit_labels[shard.class_label], "index": int(k), "seed": int(sd),
                         "method": self.cfg.method, "params": params, "shard": shard.shard_id,
                         "seconds": (time.time() - t0) / max(1, len(shard.indices))})
            pngs.append(png_bytes(img))
        return rows, pngs


@dataclass
class DistillResult:
    out: Path
    rows: list[dict]
    seconds: float
    images_per_s: float
    shards_run: int
    shards_skipped: int


def distill_local(cfg: DistillConfig, overwrite: bool = False, device: str | None = None,
                  progress: Callable[[str], None] | None = None, shard_size: int | None = None,
                  runner: ShardRunner | None = None) -> DistillResult:
    """Distill ``cfg`` in this process (no Ray): resumable, atomic per shard. ``runner``: one built for ``cfg``."""
    if cfg.out is None:
        raise UserError("no output folder given", "set out in the config or pass --out")
    if is_uri(cfg.out):
        raise UserError(f"the output {cfg.out!r} is a URI, which only the Ray pipeline's sampler actors write to",
                        "run on Ray with write_from_workers, or pass a local path")
    runner = runner if runner is not None else ShardRunner(cfg, device)
    labels = selected_labels(cfg, runner.ds)
    writer = DistilledSetWriter(cfg.out, runner.ds.class_names, cfg.fingerprint(), cfg.generation_key(), overwrite)
    shards = plan_shards(cfg, labels, shard_size)
    t0, ran, skipped, made = time.time(), 0, 0, 0
    for n, shard in enumerate(shards):
        if writer.shard_done(shard.shard_id):
            skipped += 1
            continue
        rows, pngs = runner.run(shard)
        writer.commit(shard.shard_id, rows, pngs)
        ran += 1
        made += len(rows)
        if progress:
            progress(f"shard {n + 1}/{len(shards)} ({runner.ds.class_names[shard.class_label]}): "
                     f"{made / (time.time() - t0):.2f} images/s")
    rows = writer.finalize()
    secs = time.time() - t0
    write_grid(cfg.out, runner.ds)
    return DistillResult(Path(cfg.out), rows, secs, made / secs if made else 0.0, ran, skipped)


def write_grid(out: str | Path, ds: ClassDataset, per_class: int = 10) -> None:
    """``<out>/grid.png``: the first ``per_class`` images of every class in the manifest, one row per class."""
    from raydistill.outputs import read_manifest

    rows = [r for r in read_manifest(out) if r["index"] < per_class]
    x = torch.stack([read_image(Path(out) / r["path"], ds.channels) for r in rows])
    save_grid(x, torch.as_tensor([r["label"] for r in rows]), Path(out) / "grid.png", per_class=per_class)


def load_distilled(out: str | Path, ds: ClassDataset, labels: list[int] | None = None,
                   ipc: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PNG tree of a distilled set as uint8 images and subset labels (first ``ipc`` files per class)."""
    from raydistill.outputs import load_png_tree

    labels = list(range(ds.num_classes)) if labels is None else labels
    names = [ds.class_names[c] for c in labels]
    x, y_local = load_png_tree(out, names, ipc=ipc, channels=ds.channels)
    return x, torch.as_tensor(labels)[y_local]


def evaluate_images(x: torch.Tensor, y: torch.Tensor, ds: ClassDataset, preset: str, net: str, num_nets: int,
                    seed: int = 0, epochs: int | None = None, device: str | None = None,
                    progress: Callable[[str], None] | None = None, on_epoch=None, eval_every: int | None = None,
                    teacher: str | None = None, precision: str = "fp32", compile: bool = False, formation: int = 1):
    """Train ``num_nets`` fresh ``net``s on uint8 images ``x`` under ``preset``; test on the dataset's test split.
    ``formation`` > 1: ``x`` is a packed set, decoded into ``formation**2`` training images each
    (:func:`raydistill.formation.decode_zoom`, IDC's multi-formation) before any preset sees it.
    A soft-label preset (``rded``) runs :func:`raydistill.evaluate.soft_label.evaluate_soft` with ``teacher`` (a
    checkpoint path; None: the preset's, else the built-in one; hard-label presets take no teacher) in fp32 and
    eager; hard-label presets train in ``precision`` and, with ``compile``, ``torch.compile``'d nets."""
    from raydistill.evaluate.presets import get_preset
    from raydistill.evaluate.train import evaluate_synthetic

    labels = sorted(set(y.tolist()))
    remap = {c: i for i, c in enumerate(labels)}  # train on the selected classes only
    tx, ty = [], []
    for c in labels:
        a, _ = ds.load("test", label=c)
        tx.append(a)
        ty.append(torch.full((len(a),), remap[c], dtype=torch.long))
    test_x, test_y = torch.cat(tx), torch.cat(ty)
    train_y = torch.as_tensor([remap[int(c)] for c in y.tolist()])
    train_x = x.float() / 255.0
    if formation != 1:
        from raydistill.formation import decode_zoom

        train_x, train_y = decode_zoom(train_x, train_y, formation)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if get_preset(preset).labels == "soft":  # RDED protocol: a teacher's soft labels (raydistill.evaluate.soft_label)
        if precision != "fp32":
            raise UserError(f"eval precision {precision} is for the hard-label presets; {preset} trains in fp32",
                            "leave --eval-precision out with a soft-label preset")
        from raydistill.evaluate.soft_label import evaluate_soft

        soft = get_preset(preset, teacher=teacher) if teacher is not None else preset
        return evaluate_soft(train_x, train_y, test_x.float() / 255.0, test_y, preset=soft, net=net,
                             num_nets=num_nets, seed=seed, device=dev, epochs=epochs, progress=progress,
                             on_epoch=on_epoch, eval_every=eval_every, dataset=ds, classes=labels)
    return evaluate_synthetic(train_x, train_y, test_x.float() / 255.0, test_y, preset=preset, net=net,
                              num_nets=num_nets, seed=seed, device=dev, epochs=epochs, progress=progress,
                              on_epoch=on_epoch, eval_every=eval_every, precision=precision, compile=compile)


def coverage_of_set(cfg: DistillConfig, out: str | Path, max_real: int | None = 1000) -> dict:
    """Mode coverage and assignment distance (:mod:`raydistill.evaluate.coverage`) of the set in ``out`` (the
    generator's VAE) and, where the dataset has a feature network (the built-in Fashion-MNIST one), its generator
    metrics against the test split next to those of a same-size random real subset
    (``gen_fid``, ``gen_precision``, ..., ``gen_floor_fid``, ...; :mod:`raydistill.evaluate.generator_metrics`)."""
    from raydistill.evaluate.coverage import set_coverage
    from raydistill.evaluate.generator_metrics import BUILTIN_FEATURE_NET, set_generator_metrics
    from raydistill.generator import resolve_model_paths
    from raydistill.models.vae import load_vae

    ds = open_dataset(cfg)
    x, y = load_distilled(out, ds, selected_labels(cfg, ds), ipc=cfg.ipc)
    codec = load_vae(resolve_model_paths(cfg)[1], image_size=ds.image_size)
    result = set_coverage(ds, codec, x, y, max_real=max_real, seed=cfg.seed)
    if ds.name == "fashion-mnist" and ds.image_size == 28 and BUILTIN_FEATURE_NET.exists() and len(x) > 2:
        result["generator"] = set_generator_metrics(ds, x, y, seed=cfg.seed)
    return result
