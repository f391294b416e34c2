"""Distillation in plain torch: plan class shards, run one shard (the unit a Ray actor serves), evaluate a set.

A *method* turns a shard (one class, some image indices) into images and manifest rows. ``random`` picks seeded real
training images; ``dit`` samples the generator; guided methods add guidance terms (other modules register them in
:data:`METHOD_TERMS`). :func:`distill_local` runs everything in-process; the Ray pipeline calls the same
:class:`ShardRunner` from its actors, so both produce the same bytes for the same seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raydistill.config import DistillConfig
from raydistill.data import ClassDataset, load_dataset, resolve_classes
from raydistill.errors import UserError
from raydistill.outputs import DistilledSetWriter, Shard, png_bytes, read_image, save_grid

# method name -> factory(cfg, runner) -> list of guidance terms; "dit" has none.
METHOD_TERMS: dict[str, Callable] = {"dit": lambda cfg, runner: []}
GENERATIVE = {"dit"}


def _mgd3_terms(cfg: DistillConfig, runner) -> list:
    """MGD3 (spec 3): one mode-guidance term; modes per selected class from its training images, cached."""
    from raydistill.guidance.mode import mode_guidance_from_config

    return [mode_guidance_from_config(cfg, runner.ds, runner.generator.codec, selected_labels(cfg, runner.ds))]


def _igd_terms(cfg: DistillConfig, runner) -> list:
    """IGD (spec 2): deviation + influence terms from the surrogate trajectory in ``cfg.extra``."""
    from raydistill.guidance.influence import igd_terms_from_config

    return igd_terms_from_config(cfg, runner.ds, runner.generator.codec, selected_labels(cfg, runner.ds))


METHOD_TERMS["mgd3"] = _mgd3_terms
METHOD_TERMS["igd"] = _igd_terms
METHOD_TERMS["mgd3+igd"] = lambda cfg, runner: _mgd3_terms(cfg, runner) + _igd_terms(cfg, runner)
GENERATIVE.update({"mgd3", "igd", "mgd3+igd"})


def _minimax_terms(cfg: DistillConfig, runner) -> list:
    """Minimax (spec 1.4): plain sampling from the fine-tuned EMA (loaded by ``load_generator``); no guidance term.
    Checks that the fine-tune covers every selected class (phases route each class to its own model)."""
    router = getattr(runner.generator, "router", None)
    if router is not None:
        router.check_covers([runner.ds.dit_labels[c] for c in selected_labels(cfg, runner.ds)])
    return []


def _minimax_igd_terms(cfg: DistillConfig, runner) -> list:
    """Minimax-IGD (spec 2.1 step 4): IGD's terms with the Minimax presets, on the fine-tuned model."""
    from raydistill.guidance.influence import igd_terms_from_config

    return _minimax_terms(cfg, runner) + igd_terms_from_config(cfg, runner.ds, runner.generator.codec,
                                                               selected_labels(cfg, runner.ds), base="minimax")


METHOD_TERMS["minimax"] = _minimax_terms
METHOD_TERMS["minimax-igd"] = _minimax_igd_terms
METHOD_TERMS["minimax+mgd3"] = lambda cfg, runner: _minimax_terms(cfg, runner) + _mgd3_terms(cfg, runner)
GENERATIVE.update({"minimax", "minimax-igd", "minimax+mgd3"})
WHOLE_CLASS = {"igd", "mgd3+igd", "minimax-igd"}  # per-class sequential state (IGD's deviation memory)


IGD_PARAMS = {"surrogate", "igd_epochs", "igd_scale", "igd_gamma", "igd_window", "igd_grad_ipc", "igd_memory",
              "igd_impl", "igd_refresh", "igd_cache"}
MGD3_PARAMS = {"mode_scale", "t_stop", "mode_method", "mode_snap", "modes_cache"}
OTHER_PARAMS = {"finetune", "herding_pool"}  # Minimax's fine-tune folder / .pt; herding's candidate cap


def check_method_params(cfg: DistillConfig) -> None:
    """Fail now, not in a Ray actor, on an unknown or badly typed method parameter (``extra:``, ``--set``)."""
    from raydistill.guidance.influence import check_impl, check_refresh, check_scale, check_window
    from raydistill.guidance.mode import _extra, _is_int, _is_number
    from raydistill.modes import MODE_METHODS

    ex = cfg.extra
    known = IGD_PARAMS | MGD3_PARAMS | OTHER_PARAMS
    unknown = sorted(set(ex) - known)
    if unknown:
        raise UserError(f"unknown method parameter(s): {', '.join(unknown)}",
                        f"valid --set keys: {', '.join(sorted(known))}")
    for key in ("igd_scale", "igd_gamma"):
        if key in ex:
            check_scale(key, ex[key])
    if "igd_window" in ex:
        check_window(ex["igd_window"])
    if "igd_impl" in ex:
        check_impl(ex["igd_impl"])
    if "igd_refresh" in ex:
        check_refresh(ex["igd_refresh"])
    for key in ("igd_grad_ipc", "igd_memory"):
        v = ex.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{key} must be a positive integer, got {v!r}", f"fix {key} in the config")
    if "surrogate" in ex and cfg.method in WHOLE_CLASS and not Path(str(ex["surrogate"])).is_dir():
        raise UserError(f"surrogate trajectory not found: {ex['surrogate']}",
                        "train one with `raydistill surrogate --out PATH` and pass --set surrogate=PATH")
    _extra(cfg, "mode_scale", 0.1, lambda v: _is_number(v) and v >= 0, "a number >= 0 (the paper uses 0.1)")
    _extra(cfg, "t_stop", 25, _is_int, "an integer respaced index (the paper uses 25)")
    _extra(cfg, "mode_method", "kmeans", lambda v: v in MODE_METHODS, f"one of {', '.join(MODE_METHODS)}")
    _extra(cfg, "mode_snap", False, lambda v: isinstance(v, bool), "true or false")


def open_dataset(cfg: DistillConfig) -> ClassDataset:
    return load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size, nclass=cfg.nclass, phase=cfg.phase,
                        allow_other_split=cfg.allow_other_split)


def selected_labels(cfg: DistillConfig, ds: ClassDataset) -> list[int]:
    return resolve_classes(ds, list(cfg.classes) if cfg.classes else None)


def plan_shards(cfg: DistillConfig, labels: list[int], shard_size: int | None = None) -> list[Shard]:
    """Split each class's images 0..IPC-1 into shards of ``shard_size`` (None: one shard per class).

    Methods with per-class sequential state (IGD's deviation memory) must keep a class in one shard; they set
    ``shard_size=None``.
    """
    from raydistill.diffusion.sampler import image_seed

    if shard_size is not None and cfg.method in WHOLE_CLASS and shard_size < cfg.ipc:
        raise UserError(f"--shard-size {shard_size} would split classes, but {cfg.method}'s deviation memory needs "
                        "each class in one shard", "leave --shard-size unset for this method")
    size = shard_size or cfg.ipc
    shards = []
    for c in labels:
        for start in range(0, cfg.ipc, size):
            idx = list(range(start, min(cfg.ipc, start + size)))
            shards.append(Shard(f"c{c:04d}-i{start:05d}", c, idx, [image_seed(cfg.seed, c, k) for k in idx]))
    return shards


def random_real_indices(ds: ClassDataset, label: int, ipc: int, seed: int) -> np.ndarray:
    """Seeded choice of ``ipc`` training images of class ``label`` (positions in the train split)."""
    pool = ds.indices("train", label)
    if len(pool) < ipc:
        raise UserError(f"class {ds.class_names[label]!r} has {len(pool)} training images, fewer than IPC {ipc}",
                        "lower --ipc")
    rng = np.random.default_rng([int(seed), int(label)])
    return pool[rng.choice(len(pool), size=ipc, replace=False)]


def herding_indices(ds: ClassDataset, label: int, ipc: int, codec, max_pool: int | None = None) -> np.ndarray:
    """Herding coreset (Welling 2009, as the DC benchmarks' "herding" baseline) of class ``label``: greedily add the
    training image whose VAE latent (posterior mean) brings the running mean of the chosen latents closest to the
    class mean. Deterministic; ``max_pool`` caps the candidates to the first images in natural order."""
    from raydistill.modes import encode_images

    pool = ds.indices("train", label)
    if max_pool is not None:
        pool = pool[:max_pool]
    if len(pool) < ipc:
        raise UserError(f"class {ds.class_names[label]!r} has {len(pool)} training images, fewer than IPC {ipc}",
                        "lower --ipc")
    feats = encode_images(codec, ds.read("train", pool)).flatten(1).double()  # [N, D]
    mu = feats.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(len(pool), dtype=torch.bool)
    for t in range(ipc):
        gap = ((mu - (total[None] + feats) / (t + 1)) ** 2).sum(1)  # [N]
        gap[~available] = float("inf")
        j = int(gap.argmin())
        chosen.append(j)
        available[j] = False
        total += feats[j]
    return pool[np.asarray(chosen)]


class ShardRunner:
    """Holds the heavy state (dataset, generator, guidance state) and turns shards into PNGs + manifest rows."""

    def __init__(self, cfg: DistillConfig, device: str | torch.device | None = None, ds: ClassDataset | None = None,
                 generator=None) -> None:
        """``ds`` and ``generator`` may come already loaded (a Tune worker's cache); the guidance terms, which hold
        the method parameters, are always built for ``cfg``."""
        self.cfg = cfg
        self.ds = ds if ds is not None else open_dataset(cfg)
        self.generator = None
        self.terms: list = []
        self.codec = None
        if cfg.method == "herding":
            from raydistill.generator import resolve_model_paths
            from raydistill.models.vae import load_vae

            self.codec = load_vae(resolve_model_paths(cfg)[1], image_size=self.ds.image_size, device=device or "cpu")
        if cfg.method in GENERATIVE:
            from raydistill.generator import load_generator

            self.generator = generator or load_generator(cfg, self.ds.dit_labels, self.ds.image_size, device)
            self.terms = METHOD_TERMS[cfg.method](cfg, self)

    def images(self, shard: Shard) -> tuple[torch.Tensor, list[int]]:
        """uint8 images [B, C, H, W] of the shard and the per-image seed (or real index for ``random``)."""
        cfg = self.cfg
        if cfg.method == "random":
            chosen = random_real_indices(self.ds, shard.class_label, cfg.ipc, cfg.seed)[shard.indices]
            return self.ds.read("train", chosen), [int(i) for i in chosen]
        if cfg.method == "herding":
            chosen = herding_indices(self.ds, shard.class_label, cfg.ipc, self.codec,
                                     cfg.extra.get("herding_pool"))[shard.indices]
            return self.ds.read("train", chosen), [int(i) for i in chosen]
        out = []
        batch = 1 if cfg.extra.get("igd_impl") == "reference" else cfg.batch_size  # the released code's batch 1
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
                    progress: Callable[[str], None] | None = None, on_epoch=None, eval_every: int | None = None):
    """Train ``num_nets`` fresh ``net``s on uint8 images ``x`` under ``preset``; test on the dataset's test split."""
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
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate_synthetic(x.float() / 255.0, train_y, test_x.float() / 255.0, test_y, preset=preset, net=net,
                              num_nets=num_nets, seed=seed, device=dev, epochs=epochs, progress=progress,
                              on_epoch=on_epoch, eval_every=eval_every)


def coverage_of_set(cfg: DistillConfig, out: str | Path, max_real: int | None = 1000) -> dict:
    """Mode coverage and assignment distance (:mod:`raydistill.coverage`) of the set in ``out`` (generator's VAE)."""
    from raydistill.coverage import set_coverage
    from raydistill.generator import resolve_model_paths
    from raydistill.models.vae import load_vae

    ds = open_dataset(cfg)
    x, y = load_distilled(out, ds, selected_labels(cfg, ds), ipc=cfg.ipc)
    codec = load_vae(resolve_model_paths(cfg)[1], image_size=ds.image_size)
    return set_coverage(ds, codec, x, y, max_real=max_real, seed=cfg.seed)
