"""``raydistill`` command line: distill, evaluate, tune, compare, modes, surrogate, finetune, pretrain, teacher, score,
pack (lazy imports).

Bad input raises :class:`raydistill.errors.UserError`; ``main`` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from raydistill.errors import UserError
from raydistill.precision import PRECISIONS


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError (one line, exit 2) instead of usage text + SystemExit."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _csv(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def cfg_interval_arg(s: str) -> tuple[int, int]:
    """``--cfg-interval LO,HI`` as two integers (also the benchmarks' flag); the range is checked by the config
    (``check_cfg_interval``)."""
    parts = s.split(",")
    try:
        lo, hi = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not two integers LO,HI (e.g. 80,580)") from None
    return lo, hi


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None


def _positive_int(s: str) -> int:
    if (v := _int(s)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _non_negative_int(s: str) -> int:
    if (v := _int(s)) < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {v}")
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
    g.add_argument("--plugin", action="append", metavar="MODULE_OR_FILE.py",
                   help="import a module or .py file that registers method parts (docs/METHODS.md, \"Adding a "
                   "method\"); repeatable")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="sampling and guidance numerics: auto (default: tf32 on CUDA, fp32 on CPU), fp32, tf32, "
                   "bf16 (autocast around the DiT, VAE and surrogate forwards); a set's settings include it")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the DiT forward and the evaluation nets (off by default; a warm-up per "
                   "shape, docs/RAY_JOBS.md)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-preset", help="dc (default), dsa, idc, igd, rded (soft labels from a teacher: --teacher)")
    g.add_argument("--teacher", help="rded: the teacher checkpoint (.safetensors from `raydistill teacher`, or a .pt "
                   "state dict; default for Fashion-MNIST: the built-in teacher)")
    g.add_argument("--eval-nets", type=_csv, help="comma-separated nets: convnet, resnet_ap10, resnet18")
    g.add_argument("--num-evals", type=int, help="nets per network type (default 1; 5 for a real estimate)")
    g.add_argument("--eval-epochs", type=_positive_int, help="override the preset's epochs (quick runs)")
    g.add_argument("--eval-precision", choices=PRECISIONS,
                   help="evaluation nets' numerics: fp32 (default: the published protocols), tf32, bf16 (opt-in, "
                   "docs/BENCHMARKS.md), auto")
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
            "model_size", "vae", "precision", "compile",
            "eval_preset", "eval_nets", "num_evals", "eval_epochs", "eval_precision", "teacher", "seed", "ipc"]
    keys += [k for k in ("method", "sampler", "steps", "cfg_scale", "cfg_channels", "cfg_interval", "batch_size",
                         "baselines", "out")
             if hasattr(a, k)]
    if getattr(a, "write_from_workers", False):
        keys.append("write_from_workers")
    over = {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}
    if getattr(a, "plugin", None):
        over["plugins"] = tuple(a.plugin)
    over.update(extra)
    preset = read_config_yaml(a.preset, "preset") if getattr(a, "preset", None) else _builtin_default(a)
    data = {**preset, **(read_config_yaml(a.config, "config") if a.config else {})}
    data["extra"] = {**(preset.get("extra") or {}), **(data.get("extra") or {})}
    data.update(over)
    cfg = DistillConfig.from_dict(data)
    sets = dict(getattr(a, "set", None) or [])
    return cfg.with_(extra={**cfg.extra, **sets}) if sets else cfg


def _builtin_default(a: argparse.Namespace) -> dict:
    """``raydistill distill`` with no method, preset, config or model of its own on the built-in dataset: the best
    measured preset for the built-in model (``raydistill/presets/fmnist-default.yaml``, docs/BENCHMARKS.md section 2),
    next to its baselines. Any of ``--method``, ``--preset``, ``--config``, ``--model`` or another ``--dataset``
    leaves the library defaults (``DistillConfig``) in force."""
    from raydistill.config import BUILTIN_DEFAULT_PRESET, read_config_yaml

    if getattr(a, "command", None) != "distill" or any(getattr(a, k, None) for k in ("method", "config", "model")):
        return {}
    if (a.dataset or "fashion-mnist") != "fashion-mnist" or not BUILTIN_DEFAULT_PRESET.is_file():
        return {}
    return read_config_yaml(BUILTIN_DEFAULT_PRESET, "built-in default preset")


def cmd_distill(a: argparse.Namespace) -> int:
    from raydistill.orchestration.distill_job import format_table, run_main_job
    from raydistill.preflight import preflight_distill

    cfg = _config(a)
    preflight_distill(cfg, a.root, a.overwrite)
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
    from raydistill.formation import formation_of
    from raydistill.preflight import check_eval

    cfg = _config(a, method="random")
    if cfg.num_evals < 1:
        raise UserError(f"--num-evals must be at least 1 to evaluate, got {cfg.num_evals}",
                        "pass --num-evals 1 or more")
    ds = open_dataset(cfg)
    labels = selected_labels(cfg, ds)
    check_eval(cfg, ds)
    x, y = load_distilled(a.dir, ds, labels, ipc=cfg.ipc if a.ipc is not None else None)
    formation = formation_of(a.dir)
    packed = f" (packed, multi-formation factor {formation}: {len(x) * formation ** 2} training images)" \
        if formation > 1 else ""
    print(f"{a.dir}: {len(x)} images, {len(labels)} classes, {tuple(x.shape[1:])}{packed}")
    for net in cfg.eval_nets:
        r = evaluate_images(x, y, ds, cfg.eval_preset, net, cfg.num_evals, seed=cfg.seed, epochs=cfg.eval_epochs,
                            progress=_log, teacher=cfg.teacher, precision=cfg.eval_precision, compile=cfg.compile,
                            formation=formation)
        print(f"{net}: {r.reported_mean:.2f} +- {r.reported_std:.2f} ({r.report}, {r.num_nets} nets, "
              f"preset {r.preset})")
    return 0


def tune_space_of(a: argparse.Namespace):
    """The search space of ``raydistill tune``: the file with ``--set``, then the budget and confirm overrides."""
    from dataclasses import replace

    from raydistill.tune_space import load_space

    space = load_space(a.space, dict(a.set or []))
    return replace(space, num_samples=a.num_samples or space.num_samples,
                   time_budget_s=a.time_budget or space.time_budget_s,
                   confirm_top=space.confirm_top if a.confirm is None else a.confirm)


def cmd_tune(a: argparse.Namespace) -> int:
    space = tune_space_of(a)
    from raydistill.orchestration.tune_job import format_summary, run_study
    from raydistill.preflight import check_root, preflight_tune

    check_root(a.root)
    preflight_tune(space.base_config())

    summary = run_study(space, a.root, address=a.address, tracking_uri=a.tracking_uri, log=_log)
    print()
    print(format_summary(summary, space.metric))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from raydistill.orchestration.compare import collect_runs, format_runs, plot_runs
    from raydistill.orchestration.tracking import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri(a.root, create=False)  # reading: makes no folder
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
    from raydistill.methods.igd.surrogate import SURROGATE_DEFAULTS, SurrogateConfig

    data = {"name": a.dataset, "root": a.data_root, "image_size": a.image_size, "nclass": a.nclass,
            "phase": a.phase or 0, "allow_other_split": a.allow_other_split}
    ds = load_dataset(**data)  # fails here, before Ray, on a bad dataset
    settings = dict(SURROGATE_DEFAULTS.get(ds.name, {}))
    settings.update({f.name: getattr(a, f.name) for f in fields(SurrogateConfig)
                     if getattr(a, f.name, None) is not None})
    cfg = SurrogateConfig(**settings)
    if a.local:
        from raydistill.methods.igd.surrogate import Trajectory, similarity_selection, train_trajectory

        train_trajectory(ds, a.out, cfg, progress=_log)
        sel = similarity_selection(Trajectory(a.out), ds, a.grad_ipc, progress=_log) if a.select else {}
    else:
        from raydistill.orchestration.surrogate_job import run_surrogate_job

        sel = run_surrogate_job(data, a.out, cfg, select=a.select, grad_ipc=a.grad_ipc, address=a.address, log=_log)
    if sel:
        print(f"selected epochs (cosine to the last accepted < {sel['threshold']}): {sel['selected']}")
    return 0


def cmd_modes(a: argparse.Namespace) -> int:
    from raydistill.distill import set_dir
    from raydistill.orchestration.modes_job import run_modes_job
    from raydistill.preflight import preflight_modes

    cfg = _config(a, method="mgd3")
    if cfg.out is None and "modes_cache" not in cfg.extra:
        cfg = cfg.with_(out=str(set_dir(a.root, cfg, "mgd3")))  # the cache the distill run will read
    preflight_modes(cfg)
    secs = run_modes_job(cfg, address=a.address, log=_log)
    print(f"modes of {len(cfg.classes or []) or 'all'} classes ready ({secs:.0f} s)")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    """Minimax DiffFit fine-tune (spec 1.2-1.5); default model and output: the built-in Fashion-MNIST ones."""
    from dataclasses import asdict, fields

    from raydistill.config import BUILTIN_MODEL
    from raydistill.data import load_dataset, resolve_classes
    from raydistill.methods.minimax.finetune import (
        FinetuneConfig,
        finetune_config_from,
        finetune_preset,
        phase_chunks,
    )

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
        from raydistill.methods.minimax.finetune import finetune

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
        index, reports = run_finetune_job(data, str(dit), str(vae), a.model_size, out, cfg, labels, params,
                                          tracking_uri=a.tracking_uri or default_tracking_uri(a.root),
                                          address=a.address, log=_log)
        ran = [r["phase"] for r in reports if r["trained"]]
        _log(f"phases fine-tuned now: {ran or 'none'}"
             + (" (the others were done before)" if len(ran) < len(reports) else ""))
    print(f"fine-tune written to {out} ({len(index['phases'])} phase(s)); distill with --method minimax"
          + ("" if a.out is None and a.model is None else f" --set finetune={out}"))
    return 0


def cmd_pretrain(a: argparse.Namespace, rest: list[str]) -> int:
    from raydistill.pretrain import main as pretrain_main

    pretrain_main(rest)
    return 0


def cmd_teacher(a: argparse.Namespace) -> int:
    """Train the soft-label teacher on a dataset's full training split (``raydistill.evaluate.teacher``)."""
    from pathlib import Path

    from raydistill.data import load_dataset
    from raydistill.evaluate.teacher import BUILTIN_TEACHER, train_teacher

    ds = load_dataset(a.dataset, a.data_root, image_size=a.image_size)
    if a.out is None and (ds.name != "fashion-mnist" or a.image_size is not None):
        raise UserError(f"no default --out for a {ds.name} teacher at this size (only Fashion-MNIST at 28 px has one)",
                        "pass --out PATH.safetensors")
    out = Path(a.out) if a.out else BUILTIN_TEACHER
    if out.exists() and not a.overwrite:
        raise UserError(f"{out} exists", "pass --overwrite to replace it, or another --out")
    meta = train_teacher(ds, out, net=a.net, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                         device=a.device, progress=_log)
    print(f"teacher {meta['net']} on {ds.name} ({meta['train_images']} images, {meta['epochs']} epochs): "
          f"{meta['test_accuracy']:.2f}% test accuracy -> {out}")
    return 0


def _add_teacher_parser(sub) -> None:
    t = sub.add_parser("teacher", help="train the soft-label (rded) teacher on the full training split")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--data-root")
    t.add_argument("--image-size", type=_positive_int)
    t.add_argument("--net", default="convnet", help="evaluation net (default convnet: ConvNet-3 at 28 px)")
    t.add_argument("--epochs", type=_positive_int, default=20, help="default 20 (cosine LR to 0 over them)")
    t.add_argument("--batch-size", type=_positive_int, default=256)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    t.add_argument("--out", help="PATH.safetensors (default for Fashion-MNIST: the built-in teacher's place)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def cmd_pack(a: argparse.Namespace) -> int:
    """Pack a finished set into a multi-formation set (``raydistill.formation``, IDC's storage format)."""
    from raydistill.formation import pack_set

    rows = pack_set(a.src, a.out, a.factor, overwrite=a.overwrite)
    classes = len({r["label"] for r in rows})
    print(f"{a.out}: {len(rows)} stored images ({len(rows) // max(1, classes)} per class), each holding "
          f"{a.factor ** 2} images of {a.src} at 1/{a.factor} resolution; `raydistill evaluate {a.out}` decodes them")
    return 0


def _add_pack_parser(sub) -> None:
    k = sub.add_parser("pack", help="pack a set of IPC*factor^2 images per class into IPC multi-formation images")
    k.add_argument("src", help="a finished distilled set (its images per class a multiple of factor^2)")
    k.add_argument("--out", required=True, help="the packed set's folder")
    k.add_argument("--factor", type=_positive_int, default=2, help="parts per side of a stored image (default 2)")
    k.add_argument("--overwrite", action="store_true", help="replace an --out made from other settings")


def cmd_score(a: argparse.Namespace) -> int:
    """DD-Ranking's HLR, IOR, LRS and ARS per method from result files or the tracked MLflow runs."""
    from raydistill.evaluate.scores import format_scores, records_from_results, score_table

    if a.results:
        records = records_from_results(a.results)
    else:
        from raydistill.orchestration.score_runs import records_from_mlflow
        from raydistill.orchestration.tracking import default_tracking_uri

        records = records_from_mlflow(a.tracking_uri or default_tracking_uri(a.root))
    rows = [r for r in score_table(records, a.real_hard, a.hard_preset, a.soft_preset, a.aug_preset,
                                   a.noaug_preset, a.net, a.lam)
            if (a.dataset is None or r["dataset"] == a.dataset) and (a.ipc is None or r["ipc"] == a.ipc)]
    if not rows:
        raise UserError(f"no accuracies of net {a.net} match the filters", "loosen --dataset/--ipc or check --net")
    print(format_scores(rows, a.real_hard, a.hard_preset, a.soft_preset, a.aug_preset, a.noaug_preset))
    return 0


def _add_score_parser(sub) -> None:
    s = sub.add_parser("score", help="DD-Ranking scores (HLR, IOR, LRS, ARS) of every method from its runs")
    s.add_argument("results", nargs="*", help="benchmarks/quality.py result files (default: the MLflow runs)")
    s.add_argument("--root", default="runs", help="output root holding mlflow.db (default ./runs)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<root>/mlflow.db)")
    s.add_argument("--real-hard", type=float, help="hard-label accuracy (%%) of the whole real training set")
    s.add_argument("--hard-preset", default="dc", help="hard-label preset of HLR (default dc)")
    s.add_argument("--soft-preset", default="rded", help="soft-label preset of IOR (default rded)")
    s.add_argument("--aug-preset", default="dsa", help="ARS: the preset with augmentation (default dsa)")
    s.add_argument("--noaug-preset", default="dc", help="ARS: the preset without it (default dc)")
    s.add_argument("--net", default="convnet")
    s.add_argument("--lam", type=float, default=0.5, help="DD-Ranking's weight lambda (default 0.5)")
    s.add_argument("--dataset")
    s.add_argument("--ipc", type=_positive_int)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="raydistill", description="Diffusion-based dataset distillation on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    from raydistill.methods import method_names, methods_help

    d = sub.add_parser("distill", help="distill a dataset (default: built-in Fashion-MNIST, IPC 10, the built-in "
                       "preset raydistill/presets/fmnist-default.yaml beside plain DiT and random)",
                       epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(d)
    d.add_argument("--method", help=f"{', '.join(method_names())}, or more parts joined by '+' (default: the "
                   "built-in preset's on Fashion-MNIST, else dit; "
                   "minimax*: --set finetune=DIR from `raydistill finetune`; parameters: see below)")
    d.add_argument("--preset", help="YAML of config keys incl. extra (e.g. a tune study's best.yaml); --config and "
                   "flags override it")
    d.add_argument("--set", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="a method parameter (config extra:), e.g. --set igd_scale=5 --set t_stop=25; repeatable")
    d.add_argument("--baselines", type=_csv, help="comma-separated baselines evaluated alongside (default: random)")
    d.add_argument("--sampler", choices=("ddpm", "ddim"))
    d.add_argument("--steps", type=_positive_int)
    d.add_argument("--cfg-scale", type=float)
    d.add_argument("--cfg-channels", type=int)
    d.add_argument("--cfg-interval", type=cfg_interval_arg, metavar="LO,HI",
                   help="classifier-free guidance only for model timesteps LO <= t <= HI (0-999; Kynkaanniemi et "
                   "al. 2024); the conditional prediction alone elsewhere (config key cfg_interval: [LO, HI])")
    d.add_argument("--batch-size", type=_positive_int)
    d.add_argument("--root", default="runs", help="output root: sets, and mlflow.db (default ./runs)")
    d.add_argument("--out", help="output folder of the main method's set (default <root>/<dataset>/<method>-...); "
                   "with --write-from-workers also file:// or an object store URI (s3://BUCKET/PREFIX/SET)")
    d.add_argument("--write-from-workers", action="store_true", default=None,
                   help="sampler actors write their shards' PNGs where the set lives (shared filesystem or object "
                   "store); the driver commits only manifests (config key write_from_workers)")
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
    t.add_argument("--confirm", type=_non_negative_int, metavar="N",
                   help="override confirm.top: re-run the N best trials and the defaults on the full protocol after "
                        "the search and keep the best of them as best.yaml (0: keep the search's best)")
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
    _add_teacher_parser(sub)
    _add_score_parser(sub)
    _add_pack_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["pretrain"]:
            return cmd_pretrain(argparse.Namespace(), argv[1:])
        a = build_parser().parse_args(argv)
        commands = {"distill": cmd_distill, "evaluate": cmd_evaluate, "surrogate": cmd_surrogate, "modes": cmd_modes,
                    "finetune": cmd_finetune, "tune": cmd_tune, "compare": cmd_compare, "teacher": cmd_teacher,
                    "score": cmd_score, "pack": cmd_pack}
        return commands[a.command](a)
    except UserError as e:
        print(f"raydistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydistill: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output left (`raydistill score ... | head`): stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter's last flush must not raise again)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
