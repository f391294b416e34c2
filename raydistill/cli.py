"""``raydistill`` command line: distill, evaluate, tune, compare, modes, surrogate, finetune, pretrain (lazy imports).

Bad input raises :class:`raydistill.errors.UserError`; ``main`` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from raydistill.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError (one line, exit 2) instead of usage text + SystemExit."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _csv(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--config", help="YAML config file (command-line flags override it)")
    g.add_argument("--dataset", help="fashion-mnist (default), digits, imagenette, imagewoof, imageidc, "
                   "imagenet-100, imagenet-1k, folder")
    g.add_argument("--data-root", help="dataset directory (ImageNet layout: root/train/<wnid>, root/val/<wnid>)")
    g.add_argument("--image-size", type=_positive_int)
    g.add_argument("--classes", type=_csv, help="comma-separated class names or indices (default: all)")
    g.add_argument("--nclass", type=_positive_int, help="classes per phase (ImageNet subsets)")
    g.add_argument("--phase", type=int)
    g.add_argument("--allow-other-split", action="store_true", default=None,
                   help="ImageNet subsets: accept a tree that is not ImageNet's own images (e.g. the fastai "
                   "ImageWoof download; recorded in MLflow)")
    g.add_argument("--model", help="DiT: a local diffusers folder or an original DiT .pt (default: built-in)")
    g.add_argument("--model-size", help="DiT size for .pt files (XL/2, L/2, B/2, S/2, fmnist, test)")
    g.add_argument("--vae", help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-preset", help="dc (default), dsa, idc, igd")
    g.add_argument("--eval-nets", type=_csv, help="comma-separated nets: convnet, resnet_ap10, resnet18")
    g.add_argument("--num-evals", type=int, help="nets per network type (default 1; 5 for a real estimate)")
    g.add_argument("--eval-epochs", type=_positive_int, help="override the preset's epochs (quick runs)")
    g.add_argument("--seed", type=int)
    g.add_argument("--ipc", type=int, help="images per class (default 10)")


def _key_value(s: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as YAML (``igd_scale=5``, ``igd_window=[30,45]``, ``surrogate=path``)."""
    import yaml

    key, sep, value = s.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {key!r}: {value!r}") from None


def _config(a: argparse.Namespace, **extra):
    from raydistill.config import DistillConfig, read_config_yaml

    keys = ["dataset", "data_root", "image_size", "classes", "nclass", "phase", "allow_other_split", "model",
            "model_size", "vae",
            "eval_preset", "eval_nets", "num_evals", "eval_epochs", "seed", "ipc"]
    keys += [k for k in ("method", "sampler", "steps", "cfg_scale", "cfg_channels", "batch_size", "baselines", "out")
             if hasattr(a, k)]
    over = {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}
    over.update(extra)
    preset = read_config_yaml(a.preset, "preset") if getattr(a, "preset", None) else {}
    data = {**preset, **(read_config_yaml(a.config, "config") if a.config else {})}
    data["extra"] = {**(preset.get("extra") or {}), **(data.get("extra") or {})}
    data.update(over)
    cfg = DistillConfig.from_dict(data)
    sets = dict(getattr(a, "set", None) or [])
    return cfg.with_(extra={**cfg.extra, **sets}) if sets else cfg


def _check_eval(cfg, ds) -> None:
    """Fail now, not after sampling, on an unknown evaluation preset or net."""
    from raydistill.evaluate.presets import get_preset
    from raydistill.models.evalnets import build_eval_net

    preset = get_preset(cfg.eval_preset)
    for net in cfg.eval_nets:
        build_eval_net(net, ds.channels, ds.num_classes, preset.size or ds.image_size)


def _check_model(cfg) -> None:
    """Fail now, not in a Ray actor, on missing model files or a DiT .pt that does not fit --model-size."""
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
    if dit.is_file():  # an original .pt: check the shapes --model-size fixes (class count, input size: at load)
        from raydistill.models.dit_convert import _check, _infer, _read

        sd = {k: v for k, v in _read(dit).items() if "gamma" not in k}
        if "x_embedder.proj.weight" in sd and sd["x_embedder.proj.weight"].ndim == 4:
            inf = _infer(sd)
            size = DiTConfig(size=cfg.model_size or "XL/2", in_channels=inf["in_channels"],
                             num_classes=inf.get("num_classes", 1000), input_size=inf.get("input_size", 32),
                             learn_sigma=inf.get("learn_sigma", True))
        else:
            size = DiTConfig(size=cfg.model_size or "XL/2")
        _check(sd, size, dit)


def _preflight_data(cfg) -> None:
    from raydistill.distill import open_dataset, selected_labels

    selected_labels(cfg, open_dataset(cfg))
    _check_model(cfg)


def _preflight(cfg, root: str, overwrite: bool) -> None:
    """Everything a distill run can check before Ray starts: the method parameters, the dataset and classes, the
    evaluation settings, the model files, and that every output folder may take its set (and, when resumed, that
    its committed shards are intact). Reads only."""
    from raydistill.distill import GENERATIVE, check_method_params, open_dataset, selected_labels
    from raydistill.minimax import MINIMAX_METHODS, finetune_source
    from raydistill.orchestration.distill_job import set_configs
    from raydistill.outputs import check_output_dir

    check_method_params(cfg)
    ds = open_dataset(cfg)
    selected_labels(cfg, ds)
    _check_eval(cfg, ds)
    sets = set_configs(cfg, root)  # the same folders as run_main_job
    if any(m in GENERATIVE or m == "herding" for m in sets):  # herding encodes with the VAE
        _check_model(cfg)
    if cfg.method in MINIMAX_METHODS:
        finetune_source(cfg)  # a missing or unfinished fine-tune fails here, not in a Ray actor
    for c in sets.values():
        check_output_dir(c.out, c.fingerprint(), overwrite)


def cmd_distill(a: argparse.Namespace) -> int:
    from raydistill.orchestration.distill_job import format_table, run_main_job

    cfg = _config(a)
    _preflight(cfg, a.root, a.overwrite)
    reports = run_main_job(cfg, root=a.root, address=a.address, pool_size=a.pool_size, shard_size=a.shard_size,
                           gpus_per_actor=a.gpus_per_actor, tracking_uri=a.tracking_uri, overwrite=a.overwrite,
                           log=_log)
    from raydistill.orchestration.distill_job import set_configs
    from raydistill.reproduce import judge_reports

    cells, warnings = judge_reports(set_configs(cfg, a.root), reports)  # expected bands (docs/REPRODUCE.md)
    print()
    print(format_table(reports, cfg.eval_preset, cells))
    for w in warnings:
        print(f"raydistill: warning: {w}", file=sys.stderr)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from raydistill.distill import evaluate_images, load_distilled, open_dataset, selected_labels

    cfg = _config(a, method="random")
    ds = open_dataset(cfg)
    labels = selected_labels(cfg, ds)
    _check_eval(cfg, ds)
    x, y = load_distilled(a.dir, ds, labels, ipc=cfg.ipc if a.ipc is not None else None)
    print(f"{a.dir}: {len(x)} images, {len(labels)} classes, {tuple(x.shape[1:])}")
    for net in cfg.eval_nets:
        r = evaluate_images(x, y, ds, cfg.eval_preset, net, cfg.num_evals, seed=cfg.seed, epochs=cfg.eval_epochs,
                            progress=_log)
        print(f"{net}: {r.reported_mean:.2f} +- {r.reported_std:.2f} ({r.report}, {r.num_nets} nets, "
              f"preset {r.preset})")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from raydistill.tune_space import load_space

    space = load_space(a.space, dict(a.set or []))
    if a.num_samples is not None or a.time_budget is not None:
        from dataclasses import replace

        space = replace(space, num_samples=a.num_samples or space.num_samples,
                        time_budget_s=a.time_budget or space.time_budget_s)
    cfg = space.base_config()
    from raydistill.distill import GENERATIVE, open_dataset, selected_labels

    ds = open_dataset(cfg)
    selected_labels(cfg, ds)
    _check_eval(cfg, ds)
    if cfg.method in GENERATIVE:
        _check_model(cfg)
    if "igd" in cfg.method:
        _check_surrogate(cfg, ds)
    from raydistill.orchestration.tune_job import format_summary, run_study

    summary = run_study(space, a.root, address=a.address, tracking_uri=a.tracking_uri, log=_log)
    print()
    print(format_summary(summary, space.metric))
    return 0


def _check_surrogate(cfg, ds) -> None:
    """Fail now, not in every trial, when IGD's surrogate trajectory is missing or was trained on other data."""
    from raydistill.config import BUILTIN_MODEL
    from raydistill.surrogate import Trajectory

    path = cfg.extra.get("surrogate")
    if path is None:
        if ds.name != "fashion-mnist" or cfg.model is not None:
            raise UserError("IGD needs a surrogate trajectory", "pass --set surrogate=PATH (`raydistill surrogate`)")
        path = BUILTIN_MODEL / "surrogate"
    Trajectory(path).check_dataset(ds)


def cmd_compare(a: argparse.Namespace) -> int:
    from raydistill.orchestration.compare import collect_runs, format_runs, plot_runs
    from raydistill.orchestration.tracking import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri(a.root)
    rows = collect_runs(uri, method=a.method, dataset=a.dataset, ipc=a.ipc, study=a.study)
    if not rows:
        raise UserError(f"no runs with an accuracy match the filters in {uri}", "loosen --method/--dataset/--ipc")
    print(format_runs(rows))
    if a.plot:
        print(plot_runs(rows, a.plot))
    return 0


def cmd_surrogate(a: argparse.Namespace) -> int:
    from dataclasses import fields

    from raydistill.data import load_dataset
    from raydistill.surrogate import SURROGATE_DEFAULTS, SurrogateConfig

    data = {"name": a.dataset, "root": a.data_root, "image_size": a.image_size, "nclass": a.nclass,
            "phase": a.phase or 0, "allow_other_split": a.allow_other_split}
    ds = load_dataset(**data)  # fails here, before Ray, on a bad dataset
    settings = dict(SURROGATE_DEFAULTS.get(ds.name, {}))
    settings.update({f.name: getattr(a, f.name) for f in fields(SurrogateConfig)
                     if getattr(a, f.name, None) is not None})
    cfg = SurrogateConfig(**settings)
    if a.local:
        from raydistill.surrogate import Trajectory, similarity_selection, train_trajectory

        train_trajectory(ds, a.out, cfg, progress=_log)
        sel = similarity_selection(Trajectory(a.out), ds, a.grad_ipc, progress=_log) if a.select else {}
    else:
        from raydistill.orchestration.surrogate_job import run_surrogate_job

        sel = run_surrogate_job(data, a.out, cfg, select=a.select, grad_ipc=a.grad_ipc, address=a.address, log=_log)
    if sel:
        print(f"selected epochs (cosine to the last accepted < {sel['threshold']}): {sel['selected']}")
    return 0


def cmd_modes(a: argparse.Namespace) -> int:
    from raydistill.orchestration.distill_job import set_dir
    from raydistill.orchestration.modes_job import run_modes_job

    cfg = _config(a, method="mgd3")
    if cfg.out is None and "modes_cache" not in cfg.extra:
        cfg = cfg.with_(out=str(set_dir(a.root, cfg, "mgd3")))  # the cache the distill run will read
    _preflight_data(cfg)
    secs = run_modes_job(cfg, address=a.address, log=_log)
    print(f"modes of {len(cfg.classes or []) or 'all'} classes ready ({secs:.0f} s)")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    """Minimax DiffFit fine-tune (spec 1.2-1.5); default model and output: the built-in Fashion-MNIST ones."""
    from dataclasses import asdict, fields

    from raydistill.config import BUILTIN_MODEL
    from raydistill.data import load_dataset, resolve_classes
    from raydistill.minimax import FinetuneConfig, finetune_config_from, finetune_preset, phase_chunks

    ds = load_dataset(a.dataset, a.data_root, image_size=a.image_size, nclass=a.nclass, phase=a.phase or 0,
                      allow_other_split=a.allow_other_split)
    labels = resolve_classes(ds, list(a.classes) if a.classes else None)
    if a.model is None:
        if ds.name != "fashion-mnist":
            raise UserError(f"no built-in model for dataset {ds.name!r}", "pass --model and --vae")
        if not (BUILTIN_MODEL / "dit" / "config.json").exists():
            raise UserError(f"the built-in model is missing from {BUILTIN_MODEL}", "run `raydistill pretrain` first")
        dit, vae = BUILTIN_MODEL / "dit", BUILTIN_MODEL / "vae"
        out = a.out or str(BUILTIN_MODEL / "minimax")
    else:
        if a.vae is None:
            raise UserError("--model is given without --vae", "pass --vae, the AutoencoderKL the DiT was trained with")
        if a.out is None:
            raise UserError("no output folder given", "pass --out DIR (then distill with --set finetune=DIR)")
        dit, vae, out = a.model, a.vae, a.out
    from pathlib import Path

    for what, p in (("DiT", Path(dit)), ("VAE", Path(vae))):
        if not p.exists():
            raise UserError(f"{what} not found: {p}", f"pass --{what.lower()} an existing path")
    settings = finetune_preset(ds.name)
    settings.update({f.name: getattr(a, f.name) for f in fields(FinetuneConfig)
                     if getattr(a, f.name, None) is not None})
    cfg = finetune_config_from(settings)
    phases = phase_chunks(labels, cfg)
    _log(f"fine-tune {ds.name}: {len(labels)} classes in {len(phases)} phase(s), settings {asdict(cfg)}")
    if a.local:
        from raydistill.minimax import finetune

        index = finetune(ds, dit, vae, out, cfg, labels=labels, model_size=a.model_size, device=a.device,
                         progress=_log)
    else:
        from raydistill.orchestration.finetune_job import run_finetune_job
        from raydistill.orchestration.tracking import default_tracking_uri

        data = {"name": a.dataset, "root": a.data_root, "image_size": a.image_size, "nclass": a.nclass,
                "phase": a.phase or 0, "allow_other_split": a.allow_other_split}
        params = {**{k: str(v) for k, v in asdict(cfg).items()}, "dataset": ds.name, "model": str(dit),
                  "allow_other_split": str(a.allow_other_split),
                  "vae": str(vae), "out": str(out), "classes": ",".join(ds.class_names[c] for c in labels)}
        index = run_finetune_job(data, str(dit), str(vae), a.model_size, out, cfg, labels, len(phases), params,
                                 tracking_uri=a.tracking_uri or default_tracking_uri(a.root), address=a.address,
                                 log=_log)
    print(f"fine-tune written to {out} ({len(index['phases'])} phase(s)); distill with --method minimax"
          + ("" if a.out is None and a.model is None else f" --set finetune={out}"))
    return 0


def cmd_pretrain(a: argparse.Namespace, rest: list[str]) -> int:
    from raydistill.pretrain import main as pretrain_main

    pretrain_main(rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="raydistill", description="Diffusion-based dataset distillation on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("distill", help="distill a dataset (default: built-in Fashion-MNIST, IPC 10, method dit)")
    _add_common(d)
    d.add_argument("--method", help="dit (default), random, herding, mgd3, igd, mgd3+igd, minimax, minimax-igd, "
                   "minimax+mgd3 (minimax*: --set finetune=DIR from `raydistill finetune`)")
    d.add_argument("--preset", help="YAML of config keys incl. extra (e.g. a tune study's best.yaml); --config and "
                   "flags override it")
    d.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="a method parameter (config extra:), e.g. --set igd_scale=5 --set t_stop=25; repeatable")
    d.add_argument("--baselines", type=_csv, help="comma-separated baselines evaluated alongside (default: random)")
    d.add_argument("--sampler", choices=("ddpm", "ddim"))
    d.add_argument("--steps", type=_positive_int)
    d.add_argument("--cfg-scale", type=float)
    d.add_argument("--cfg-channels", type=int)
    d.add_argument("--batch-size", type=_positive_int)
    d.add_argument("--root", default="runs", help="output root: sets, and mlflow.db (default ./runs)")
    d.add_argument("--out", help="output folder of the main method's set (default <root>/<dataset>/<method>-...)")
    d.add_argument("--overwrite", action="store_true", help="replace a set made with other settings")
    d.add_argument("--address", help="Ray cluster address (default: start a local Ray on 127.0.0.1)")
    d.add_argument("--pool-size", type=_positive_int,
                   help="sampler actors (default: one per GPU, else one per CPU, at most one per shard)")
    d.add_argument("--shard-size", type=_positive_int, help="images per shard (default: one class)")
    d.add_argument("--gpus-per-actor", type=float)
    d.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<root>/mlflow.db)")
    e = sub.add_parser("evaluate", help="evaluate a distilled set <dir>/<class>/<k>.png")
    e.add_argument("dir")
    _add_common(e)
    m = sub.add_parser("modes", help="MGD3 mode discovery as Ray tasks (one per class) into the mode cache")
    _add_common(m)
    m.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="mode_method=gmm, mode_snap=true, modes_cache=PATH")
    m.add_argument("--root", default="runs", help="output root the distill run uses (default ./runs)")
    m.add_argument("--address", help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    t = sub.add_parser("tune", help="Ray Tune study over a method's guidance parameters (see tune_spaces/)")
    t.add_argument("space", help="search space YAML, e.g. tune_spaces/mgd3.yaml")
    t.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="override a fixed setting of the space's config (e.g. surrogate=PATH, ipc=5); repeatable")
    t.add_argument("--num-samples", type=_positive_int, help="override budget.num_samples")
    t.add_argument("--time-budget", type=_positive_int, help="override budget.time_budget_s (seconds)")
    t.add_argument("--root", default="runs", help="output root: runs/tune/<study>-<time>, mlflow.db (default ./runs)")
    t.add_argument("--address", help="Ray cluster address (default: start a local Ray on 127.0.0.1)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<root>/mlflow.db)")
    c = sub.add_parser("compare", help="table (and plot) of the MLflow runs: accuracy by method, dataset and IPC")
    c.add_argument("--root", default="runs", help="output root holding mlflow.db (default ./runs)")
    c.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<root>/mlflow.db)")
    c.add_argument("--method")
    c.add_argument("--dataset")
    c.add_argument("--ipc", type=_positive_int)
    c.add_argument("--study", help="only the trials of this study name")
    c.add_argument("--plot", help="write accuracy by method and IPC to this PNG (needs matplotlib)")
    s = sub.add_parser("surrogate", help="train IGD's surrogate trajectory and select its checkpoints")
    s.add_argument("--dataset", default="fashion-mnist")
    s.add_argument("--data-root")
    s.add_argument("--image-size", type=_positive_int)
    s.add_argument("--nclass", type=_positive_int)
    s.add_argument("--phase", type=int)
    s.add_argument("--allow-other-split", action="store_true",
                   help="ImageNet subsets: accept a tree that is not ImageNet's own images")
    s.add_argument("--out", required=True, help="trajectory folder (rerun to resume)")
    s.add_argument("--net", help="surrogate net (default convnet: ConvNet-3 at 28/32 px, ConvNet-6 at 256 px)")
    s.add_argument("--epochs", type=_positive_int, help="default 50 (Fashion-MNIST: 10 of 12,000 images)")
    s.add_argument("--images-per-epoch", type=_positive_int, help="default: the whole training split")
    s.add_argument("--batch-size", type=_positive_int)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--augment", choices=("auto", "idc", "none"))
    s.add_argument("--grad-ipc", type=_positive_int, default=200, help="real images per class for gradients")
    s.add_argument("--no-select", dest="select", action="store_false", help="skip the similarity selection")
    s.add_argument("--address", help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    s.add_argument("--local", action="store_true", help="run in this process, without Ray")
    f = sub.add_parser("finetune", help="Minimax DiffFit fine-tune of the DiT (default: the built-in Fashion-MNIST "
                       "model, written next to it)")
    f.add_argument("--dataset", default="fashion-mnist")
    f.add_argument("--data-root")
    f.add_argument("--image-size", type=_positive_int)
    f.add_argument("--nclass", type=_positive_int)
    f.add_argument("--phase", type=int)
    f.add_argument("--allow-other-split", action="store_true",
                   help="ImageNet subsets: accept a tree that is not ImageNet's own images")
    f.add_argument("--classes", type=_csv, help="comma-separated class names or indices (default: all)")
    f.add_argument("--model", help="base DiT: a diffusers folder or an original DiT .pt (default: built-in)")
    f.add_argument("--model-size", help="DiT size for .pt files (XL/2, ...)")
    f.add_argument("--vae", help="the AutoencoderKL folder the DiT was trained with")
    f.add_argument("--out", help="fine-tune folder (rerun to resume; default for the built-in model: next to it)")
    f.add_argument("--epochs", type=_positive_int, help="default 8 (spec); Fashion-MNIST preset: --steps 10000")
    f.add_argument("--steps", type=_positive_int, help="total steps (overrides --epochs)")
    f.add_argument("--batch-size", type=_positive_int, help="default 8")
    f.add_argument("--lr", type=float, help="default 1e-3")
    f.add_argument("--ema-decay", type=float, help="default 0.9999")
    f.add_argument("--lambda-pos", type=float, help="representativeness weight (default 0.002)")
    f.add_argument("--lambda-neg", type=float, help="diversity weight (default 0.008)")
    f.add_argument("--memory-size", type=_positive_int, help="default 64")
    f.add_argument("--finetune-ipc", type=_positive_int, help="images per class (default: all)")
    f.add_argument("--phase-size", type=_positive_int, help="classes per model above --max-classes (default 10)")
    f.add_argument("--max-classes", type=_positive_int, help="most classes in one model (default 20)")
    f.add_argument("--seed", type=int)
    f.add_argument("--ckpt-every", type=_positive_int)
    f.add_argument("--log-every", type=_positive_int)
    f.add_argument("--device", help="cuda or cpu (default: cuda when available; --local only)")
    f.add_argument("--local", action="store_true", help="run in this process, without Ray or MLflow")
    f.add_argument("--address", help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    f.add_argument("--root", default="runs", help="holds mlflow.db (default ./runs)")
    f.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<root>/mlflow.db)")
    sub.add_parser("pretrain", help="pretrain the built-in Fashion-MNIST VAE + DiT (see --help)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["pretrain"]:
            return cmd_pretrain(argparse.Namespace(), argv[1:])
        a = build_parser().parse_args(argv)
        commands = {"distill": cmd_distill, "evaluate": cmd_evaluate, "surrogate": cmd_surrogate, "modes": cmd_modes,
                    "finetune": cmd_finetune, "tune": cmd_tune, "compare": cmd_compare}
        return commands[a.command](a)
    except UserError as e:
        print(f"raydistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydistill: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
