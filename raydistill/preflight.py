"""Everything a run can check before Ray starts, in one place for ``distill``, ``tune``, ``modes`` and the Ray jobs
(which run the same CLI): the method parameters and each method part's own checks, the dataset and classes (and a
sample of a folder dataset's images decoded), the evaluation settings, the model files (readable weights whose shapes
match their config), the output root and folders. Reads only; each failure is one :class:`UserError` line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raydistill.config import DistillConfig
from raydistill.data import ClassDataset
from raydistill.errors import UserError

IMAGE_SAMPLE = 16  # images per class a folder dataset has decoded before Ray starts (plus the real sets' choices)


def check_eval(cfg: DistillConfig, ds: ClassDataset) -> None:
    """An unknown evaluation preset or net fails now, not after sampling; so does, for a soft-label preset (``rded``),
    a missing, unreadable or mismatched teacher (``prepare_teacher``: the checkpoint, its channels, size, classes
    and normalisation), and a ``--teacher`` given to a hard-label preset."""
    from raydistill.evaluate.presets import get_preset
    from raydistill.models.evalnets import build_eval_net

    preset = get_preset(cfg.eval_preset)
    size = preset.size or ds.image_size
    for net in cfg.eval_nets:
        build_eval_net(net, ds.channels, ds.num_classes, size)
    if preset.labels != "soft":
        if cfg.teacher is not None:
            raise UserError(f"--teacher is read only by soft-label presets, not by {preset.name!r}",
                            "pass --eval-preset rded, or leave --teacher out")
        return
    from raydistill.distill import selected_labels
    from raydistill.evaluate.soft_label import prepare_teacher

    soft = get_preset(preset, teacher=cfg.teacher) if cfg.teacher is not None else preset
    labels = selected_labels(cfg, ds)
    for net in cfg.eval_nets:
        prepare_teacher(soft, net, ds.channels, size, len(labels), ds, labels)


def check_weights(folder: Path, what: str, model_class) -> None:
    """A diffusers folder: ``config.json`` parses, the safetensors weights are readable (not truncated) and hold
    exactly the tensors, with the shapes, that the config implies (the model is built on the meta device: no
    memory, no weights read)."""
    import torch
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the {what} config {folder / 'config.json'} ({e})", "copy the folder again") from e
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        return  # another weight format (.bin): diffusers reads and checks it at load time
    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        raise UserError(f"cannot read the {what} weights {weights} ({str(e).splitlines()[0]})",
                        "the file is damaged or truncated: copy it again") from e
    try:
        with torch.device("meta"):
            model = model_class.from_config(config)
    except Exception as e:  # noqa: BLE001 - diffusers raises TypeError/ValueError for foreign configs
        raise UserError(f"the {what} config {folder / 'config.json'} does not describe a {model_class.__name__} "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})", "copy the folder again") from e
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(set(want) | set(shapes)):
        if want.get(key) != shapes.get(key):
            raise UserError(f"the {what} weights in {folder} do not match its config.json: {key} has shape "
                            f"{shapes.get(key, 'none')}, the config implies {want.get(key, 'none')}",
                            "use the config.json that was saved with these weights")


def check_model(cfg: DistillConfig) -> None:
    """Missing model files, damaged weights, a config that does not fit its weights or a DiT .pt that does not fit
    --model-size fail now, not in a Ray actor."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from raydistill.generator import resolve_model_paths
    from raydistill.models.dit import DIT_SIZES, DiTConfig

    dit, vae = resolve_model_paths(cfg)
    if cfg.model_size is not None and cfg.model_size not in DIT_SIZES:
        raise UserError(f"unknown DiT size {cfg.model_size!r}", f"use one of {', '.join(DIT_SIZES)}")
    if not dit.exists():
        raise UserError(f"DiT checkpoint not found: {dit}", "pass --model a diffusers directory or a DiT .pt file")
    if dit.is_dir() and not (dit / "config.json").exists():
        raise UserError(f"{dit} is not a diffusers model directory (no config.json)",
                        "point --model at the folder that holds config.json and the safetensors weights")
    if not (vae / "config.json").exists():
        raise UserError(f"VAE not found at {vae} (no config.json)", "pass --vae a local diffusers AutoencoderKL folder")
    check_weights(vae, "VAE", AutoencoderKL)
    if dit.is_dir():
        check_weights(dit, "DiT", DiTTransformer2DModel)
        return
    from raydistill.models.dit_convert import _check, _infer, _read  # an original .pt: the shapes --model-size fixes

    sd = {k: v for k, v in _read(dit).items() if "gamma" not in k}
    if "x_embedder.proj.weight" in sd and sd["x_embedder.proj.weight"].ndim == 4:
        inf = _infer(sd)
        size = DiTConfig(size=cfg.model_size or "XL/2", in_channels=inf["in_channels"],
                         num_classes=inf.get("num_classes", 1000), input_size=inf.get("input_size", 32),
                         learn_sigma=inf.get("learn_sigma", True))
    else:
        size = DiTConfig(size=cfg.model_size or "XL/2")
    _check(sd, size, dit)


def check_images(cfg: DistillConfig, ds: ClassDataset, labels: list[int]) -> None:
    """A folder dataset decodes its images lazily (in the actors): decode, now, the first :data:`IMAGE_SAMPLE`
    training images of every selected class and the ones the ``random`` set will take."""
    from raydistill.data.folder import FolderDatasetBase
    from raydistill.methods.baselines import random_real_indices

    if not isinstance(ds, FolderDatasetBase):
        return
    for c in labels:
        pool = ds.indices("train", c)
        take = set(pool[:IMAGE_SAMPLE].tolist())
        if len(pool) >= cfg.ipc and ("random" in cfg.baselines or cfg.method == "random"):
            take |= set(random_real_indices(ds, c, cfg.ipc, cfg.seed).tolist())
        ds.read("train", np.asarray(sorted(take), dtype=np.int64))


def check_method(cfg: DistillConfig, ds: ClassDataset) -> None:
    """The method's parameters parse (already true of any DistillConfig) and each part's own checks pass."""
    from raydistill.methods import get_method

    spec = get_method(cfg.method)
    params = spec.parse(cfg.extra, cfg)
    for part in spec.parts:
        if part.check is not None:
            part.check(cfg, params.get(part.name), ds)


def check_root(root: str | Path) -> None:
    p = Path(root)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise UserError(f"output root {p} is not a folder ({q} is a file)", "pass --root a folder")
            return


def preflight_distill(cfg: DistillConfig, root: str | Path, overwrite: bool) -> None:
    """``raydistill distill``: the method and every baseline, dataset, classes, images, evaluation settings, model
    files, and that every output folder may take its set (and, when resumed, that its committed shards are
    intact)."""
    from raydistill.distill import open_dataset, selected_labels, set_configs
    from raydistill.methods import get_method
    from raydistill.outputs import check_output_dir
    from raydistill.storage import SetStore, is_uri

    check_root(root)
    ds = open_dataset(cfg)
    labels = selected_labels(cfg, ds)
    check_eval(cfg, ds)
    sets = set_configs(cfg, root)  # the same folders as run_main_job
    for c in sets.values():
        check_method(c, ds)
    check_images(cfg, ds, labels)
    if any(get_method(m).generative or get_method(m).needs_codec for m in sets):
        check_model(cfg)
    for c in sets.values():
        if is_uri(c.out):  # an object store: the URI parses; its settings are checked when the job opens it
            SetStore(c.out)
        else:
            check_output_dir(c.out, c.fingerprint(), overwrite, c.generation_key())


def preflight_tune(cfg: DistillConfig) -> None:
    """``raydistill tune``: the study's base configuration, checked as a distill run's main method."""
    from raydistill.distill import open_dataset, selected_labels
    from raydistill.methods import get_method

    ds = open_dataset(cfg)
    check_images(cfg, ds, selected_labels(cfg, ds))
    check_eval(cfg, ds)
    check_method(cfg, ds)
    if get_method(cfg.method).generative:
        check_model(cfg)


def preflight_modes(cfg: DistillConfig) -> None:
    """``raydistill modes``: the dataset, classes, images and model files of MGD3's mode discovery."""
    from raydistill.distill import open_dataset, selected_labels

    ds = open_dataset(cfg)
    check_images(cfg, ds, selected_labels(cfg, ds))
    check_method(cfg, ds)
    check_model(cfg)
