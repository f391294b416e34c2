"""The pretraining curve: generator metrics (and optionally plain-DiT accuracy) of every EMA snapshot of a run.

``raydistill pretrain --snapshot-every N`` keeps ``<work>/snapshots/step-NNNNNN/``; this scores each snapshot not yet
in ``--results`` (keyed by tag, step, CFG) with ``benchmarks/generator_quality.py``'s code, so the size and the
training length of the built-in DiT are chosen from measured curves. ``--accuracy-cfg`` also trains ``dc`` ConvNet-3
nets on a plain-DiT IPC-10 set of the snapshot (the quantity the built-in model exists for).

    python benchmarks/pretrain_curve.py --work ~/.cache/raydistill/pretrain/fmnist --tag fmnist --cfg 1.5
    python benchmarks/pretrain_curve.py --plot docs/pretrain_curve.png --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generator_quality import score_generator  # noqa: E402

from raydistill.outputs import save_merged_json  # noqa: E402


def plain_dit_accuracy(model: Path, vae: Path, cfg_scale: float, ipc: int, nets: int, seed: int = 0) -> list[float]:
    """``dc`` accuracies of ``nets`` ConvNet-3s trained on the snapshot's plain IPC-``ipc`` set (seed ``seed``)."""
    from raydistill.config import DistillConfig
    from raydistill.data import load_dataset
    from raydistill.distill import evaluate_images
    from raydistill.generator import load_generator

    ds = load_dataset("fashion-mnist")
    gen = load_generator(DistillConfig(model=str(model), vae=str(vae), cfg_scale=cfg_scale), ds.dit_labels,
                         ds.image_size, device="cpu")
    labels = [c for c in range(ds.num_classes) for _ in range(ipc)]
    indices = [k for _ in range(ds.num_classes) for k in range(ipc)]
    x = torch.cat([gen.generate(labels[s:s + 100], indices[s:s + 100], seed) for s in range(0, len(labels), 100)])
    res = evaluate_images(x, torch.as_tensor(labels), ds, "dc", "convnet", nets, seed=0)
    return [float(v) for v in res.last_accs]  # dc reports the last epoch


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    series: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for key, m in runs.items():
        tag, step, cfg = key.split("|")
        series.setdefault((tag, cfg), []).append((int(step), m))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {key: f"C{i}" for i, key in enumerate(sorted(series))}  # one colour per (model, CFG) in every panel
    any_acc = False
    for (tag, cfg), pts in sorted(series.items()):
        pts.sort()
        steps, c = [s for s, _ in pts], colours[tag, cfg]
        axes[0].plot(steps, [m["fid"] for _, m in pts], "o-", color=c, label=f"{tag} CFG {cfg}")
        axes[1].plot(steps, [m["recall"] for _, m in pts], "o-", color=c, label=f"{tag} CFG {cfg} recall")
        axes[1].plot(steps, [m["precision"] for _, m in pts], "x--", color=c, label=f"{tag} CFG {cfg} precision")
        acc = [(s, sum(m["accuracy"]) / len(m["accuracy"])) for s, m in pts if m.get("accuracy")]
        if acc:
            any_acc = True
            axes[2].plot(*zip(*acc), "o-", color=c, label=f"{tag} CFG {cfg}")
    for label, item in sorted(results.get("accuracy_points", {}).items()):  # measured apart (benchmarks/quality.py)
        any_acc = True
        axes[2].plot(*zip(*item["points"]), "s--", label=label)
    if not any_acc:
        axes[2].text(0.5, 0.5, "not measured yet", ha="center", va="center", transform=axes[2].transAxes)
    floor = results.get("floor")
    if floor:
        axes[0].axhline(floor["fid"], color="grey", ls=":", label="real vs real (same size)")
        axes[1].axhline(floor["recall"], color="grey", ls=":", label="real recall")
    for name, fid in sorted(results.get("vae_floors", {}).items()):  # what no DiT on that VAE's latents can beat
        axes[0].axhline(fid, ls="--", lw=0.8, color="black" if name.startswith("first") else "green",
                        label=f"VAE floor: {name}")
    axes[0].set_yscale("log")
    if results.get("random_ipc10"):
        axes[2].axhline(results["random_ipc10"], color="grey", ls=":", label="random real IPC 10")
    for ax, title in zip(axes, ("FID (lower is better)", "precision / recall", "plain DiT IPC 10, dc (%)")):
        ax.set_xlabel("training steps (batch 128)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from raydistill.data import load_dataset
    from raydistill.evaluate.consistency import load_builtin_classifier
    from raydistill.evaluate.generator_metrics import feature_extractor, real_floor, split_reference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="a pretraining work folder (holds snapshots/)")
    ap.add_argument("--vae", default=str(Path.home() / ".cache/raydistill/base/vae"))
    ap.add_argument("--tag", default="fmnist")
    ap.add_argument("--cfg", default="1.5")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--every", type=int, default=1, help="score every n-th snapshot only")
    ap.add_argument("--accuracy-cfg", type=float, default=None, help="also train dc nets on a plain IPC-10 set")
    ap.add_argument("--accuracy-nets", type=int, default=1)
    ap.add_argument("--results", default="benchmarks/results/pretrain_curve.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res_path = Path(a.results)
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": {}}

    def save() -> None:
        save_merged_json(res_path, results, indent=1, sort_keys=True)

    snaps = [] if a.table_only else sorted((Path(a.work) / "snapshots").glob("step-[0-9]*[0-9]"))[a.every - 1::a.every]
    todo = [(snap, step, cfg) for snap, step in ((s, int(s.name.split("-")[1])) for s in snaps)
            for cfg in [float(c) for c in a.cfg.split(",")] if f"{a.tag}|{step}|{cfg:g}" not in results["runs"]]
    if todo or (not a.table_only and "floor" not in results):  # the feature network and test set only when needed
        ds = load_dataset("fashion-mnist")
        extractor = feature_extractor("fashion-mnist")
        reference = split_reference(ds, extractor)
        judge = load_builtin_classifier()
        if "floor" not in results:
            labels = torch.arange(ds.num_classes).repeat_interleave(a.per_class)
            results["floor"] = real_floor(ds, extractor, reference, labels).as_dict()
            save()
        for snap, step, cfg in todo:
            t0 = time.time()
            m = score_generator(snap, Path(a.vae), [cfg], a.per_class, 0, extractor, reference, judge,
                                tag=f"{a.tag}-{step}", log=lambda s: print(s, flush=True))[f"{cfg:g}"]
            if a.accuracy_cfg is not None and cfg == a.accuracy_cfg:
                m["accuracy"] = plain_dit_accuracy(snap, Path(a.vae), cfg, 10, a.accuracy_nets)
                print(f"[{a.tag}-{step} cfg {cfg:g}] plain DiT IPC 10 dc: {m['accuracy']}", flush=True)
            m["seconds"] = round(time.time() - t0)
            results["runs"][f"{a.tag}|{step}|{cfg:g}"] = m
            save()
    for key, m in sorted(results["runs"].items(), key=lambda kv: (kv[0].split("|")[0], int(kv[0].split("|")[1]))):
        acc = f"  acc {sum(m['accuracy']) / len(m['accuracy']):.2f}" if m.get("accuracy") else ""
        print(f"{key:28s} FID {m['fid']:7.2f}  P {m['precision']:.3f}  R {m['recall']:.3f}  "
              f"C {m['coverage']:.3f}  cons {m['class_consistency']:.1f}%{acc}")
    if a.plot:
        plot(results, Path(a.plot))


if __name__ == "__main__":
    main()
