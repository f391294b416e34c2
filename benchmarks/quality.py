"""Fashion-MNIST quality table: distill each method at each IPC, train fresh nets on it, report accuracy.

Resumable at the granularity of one net: results accumulate in a JSON file (default
``benchmarks/results/quality.json``) keyed by (method, IPC, preset, net, seed index); a rerun skips what is there.
Distilled sets are cached under ``--root`` (same settings -> resumed, see raydistill.outputs).

    python benchmarks/quality.py --methods random,dit --ipc 10 --preset dc --nets 5
    python benchmarks/quality.py --table-only --plot docs/quality.png     # table + bar plot from the results
    python benchmarks/quality.py --methods mgd3 --ipc 10 --formation 2     # IDC multi-formation: 40 made, 10 stored

Run several in parallel with different ``--results benchmarks/results/quality-NAME.json``: the table and plot
merge every ``quality*.json`` in that folder. Every set's mode coverage (raydistill.evaluate.coverage) is stored
next to its accuracies. Method parameters: ``--set KEY=VALUE`` (applied to every method; a method ignores keys it
does not use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from raydistill.cli import cfg_interval_arg
from raydistill.config import DistillConfig
from raydistill.distill import distill_local, evaluate_images, load_distilled, open_dataset, selected_labels
from raydistill.outputs import save_merged_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="random,dit")
    ap.add_argument("--ipc", default="10", help="comma-separated IPCs")
    ap.add_argument("--preset", default="dc")
    ap.add_argument("--net", default="convnet")
    ap.add_argument("--nets", type=int, default=5, help="nets per (method, IPC)")
    ap.add_argument("--first-net", type=int, default=0,
                    help="index of the first net (split one set's nets over processes: --nets 3, then --first-net 3 "
                         "--nets 2 once the set exists)")
    ap.add_argument("--seed", type=int, default=0, help="distillation seed (one synthetic set per method/IPC)")
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--root", default="runs/bench")
    ap.add_argument("--results", default="benchmarks/results/quality.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method parameter (YAML value)")
    ap.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale of the sampler")
    ap.add_argument("--cfg-interval", type=cfg_interval_arg, default=None, metavar="LO,HI",
                    help="CFG only for model timesteps LO <= t <= HI (config cfg_interval); pair it with --tag")
    ap.add_argument("--model", default=None, help="a DiT folder other than the built-in one (a candidate)")
    ap.add_argument("--vae", default=None, help="a VAE folder other than the built-in one (recon: its VAE bound)")
    ap.add_argument("--tag", default="", help="suffix of the set folder and result keys (e.g. for --set variants)")
    ap.add_argument("--formation", type=int, default=1,
                    help="IDC multi-formation factor F: distill IPC*F^2 images per class, pack them into IPC stored "
                         "images (raydistill pack) and evaluate them decoded; results as METHOD-mfF")
    ap.add_argument("--no-coverage", dest="coverage", action="store_false")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--plot", help="write a bar plot of the table to this PNG")
    a = ap.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, _, v in (kv.partition("=") for kv in a.set)}
    if a.threads:
        torch.set_num_threads(a.threads)
    res_path = Path(a.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": {}}
    for ipc in [] if a.table_only else [int(v) for v in a.ipc.split(",")]:
        for method in a.methods.split(","):
            name, made_ipc = method + a.tag, ipc * a.formation ** 2
            cfg = DistillConfig(method=method, ipc=made_ipc, seed=a.seed, baselines=(), extra=extra,
                                cfg_scale=a.cfg_scale, cfg_interval=a.cfg_interval,
                                out=str(Path(a.root) / f"{name}-ipc{made_ipc}-seed{a.seed}"),
                                model=a.model, vae=a.vae)
            t0 = time.time()
            tag = f"{method} ipc{made_ipc}"
            made = distill_local(cfg, progress=lambda m, tag=tag: print(f"  [{tag}] {m}", flush=True))
            print(f"[{method} ipc{made_ipc}] set ready ({made.shards_run} shards made, {time.time() - t0:.0f} s)",
                  flush=True)
            ds = open_dataset(cfg)
            stored = cfg.out
            if a.formation > 1:  # IDC multi-formation: F^2 generated images in each stored one
                from raydistill.formation import pack_set

                name = f"{name}-mf{a.formation}"
                stored = str(Path(a.root) / f"{name}-ipc{ipc}-seed{a.seed}")
                pack_set(cfg.out, stored, a.formation)
            x, y = load_distilled(stored, ds, selected_labels(cfg, ds), ipc=ipc)
            cov_key = f"{name}|ipc{ipc}|set{a.seed}"
            if a.coverage and a.formation == 1 and cov_key not in results.setdefault("coverage", {}):
                from raydistill.distill import coverage_of_set

                cov = coverage_of_set(cfg, cfg.out)
                gen = cov.get("generator", {})  # FID / precision / recall / ... and the same-size real floor
                results["coverage"][cov_key] = {"mode_coverage": cov["mode_coverage"],
                                                "mode_distance": cov["mode_distance"],
                                                **{k: round(float(v), 4) for k, v in gen.items()}}
                save_merged_json(res_path, results, indent=1)
                gen_txt = f", FID {gen['gen_fid']:.2f} (floor {gen['gen_floor_fid']:.2f}), recall " \
                          f"{gen['gen_recall']:.3f}" if gen else ""
                print(f"[{name} ipc{ipc}] mode coverage {cov['mode_coverage']:.3f}, distance "
                      f"{cov['mode_distance']:.3f}{gen_txt}", flush=True)
            for i in range(a.first_net, a.first_net + a.nets):
                key = f"{name}|ipc{ipc}|{a.preset}|{a.net}|epochs{a.epochs}|set{a.seed}|net{i}"
                if key in results["runs"]:
                    continue
                where = f"{name} ipc{ipc} {a.preset} net {i + 1}/{a.first_net + a.nets}"
                r = evaluate_images(x, y, ds, a.preset, a.net, 1, seed=1000 * a.seed + i, epochs=a.epochs,
                                    formation=a.formation,
                                    progress=lambda m, w=where: print(f"  [{w}] {m.split(': ', 1)[-1]}", flush=True))
                results["runs"][key] = {"last": r.last_accs[0], "best": r.best_accs[0], "seconds": r.seconds,
                                        "report": r.report, "epochs": r.epochs}
                results["machine"] = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, " \
                                     f"threads {torch.get_num_threads()}"
                save_merged_json(res_path, results, indent=1)
                print(f"[{name} ipc{ipc} {a.preset}] net {i + 1}/{a.first_net + a.nets}: {r.reported_mean:.2f}% "
                      f"({r.seconds:.0f} s)", flush=True)
    merged = merged_results(res_path.parent, also=res_path)  # every quality*.json beside it (parallel processes)
    print_table(merged)
    if a.plot:
        plot(merged, a.plot)


def merged_results(folder: Path, also: Path | None = None) -> dict:
    """The union of ``quality*.json`` in ``folder`` and of ``also`` (this run's ``--results``, whatever its name):
    parallel runs write separate files."""
    out: dict = {"runs": {}, "coverage": {}}
    files = set(folder.glob("quality*.json")) | ({also} if also is not None and also.exists() else set())
    for f in sorted(files):
        r = json.loads(f.read_text())
        out["runs"].update(r.get("runs", {}))
        out["coverage"].update(r.get("coverage", {}))
    return out


def _groups(results: dict) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for key, r in results["runs"].items():
        groups.setdefault(key.rsplit("|", 1)[0], []).append(r["last"] if r["report"] == "last" else r["best"])
    return groups


def plot(results: dict, path: str) -> None:
    """Bar plot: one panel per (IPC, preset), a horizontal bar per measured set (mean +- std over nets, best on top),
    one colour per method across panels, and the published distillation figure of the preset (DC for ``dc``, DSA for
    ``dsa``) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    settings = sorted({(int(g.split("|")[1][3:]), g.split("|")[2]) for g in groups})
    methods = sorted({g.split("|")[0] for g in groups})
    colour = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    cols = min(2, max(1, len(settings)))
    rows = max(1, -(-len(settings) // cols))
    per_panel = [sum(g.split("|")[1:3] == [f"ipc{i}", p] for g in groups) for i, p in settings]
    height = max(per_panel, default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 0.8 + 0.32 * height * rows), squeeze=False)
    for ax, (ipc, preset) in zip(axes.flat, settings):
        bars = []
        for g, accs in groups.items():
            method, ipc_key, pre, net, epochs, _ = g.split("|")
            if (ipc_key, pre) != (f"ipc{ipc}", preset):
                continue
            label = method + ("" if net == "convnet" else f" ({net})")
            label += "" if epochs == "epochsNone" else f" {epochs}"
            sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            bars.append((statistics.mean(accs), sd, len(accs), label, method))
        bars.sort()
        ys = range(len(bars))
        ax.barh(ys, [b[0] for b in bars], xerr=[b[1] for b in bars], color=[colour[b[4]] for b in bars], capsize=2)
        ax.set_yticks(list(ys), [f"{b[3]} ({b[2]})" for b in bars], fontsize=8)
        for y, b in zip(ys, bars):
            ax.text(b[0] + b[1] + 0.3, y, f"{b[0]:.1f}", va="center", fontsize=7)
        anchor = {"dc": "DC", "dsa": "DSA"}.get(preset)
        published = ANCHORS.get(anchor, {}).get(ipc) if anchor else None
        if published is not None:  # DC / DSA anchors are plain numbers ("82.3")
            ax.axvline(float(published), ls="--", c="k", lw=0.8)
            ax.text(float(published), 0.01, f" {anchor} {published}", fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_xlim(max(0, min((b[0] for b in bars), default=0) - 8), 100)
        ax.set_title(f"IPC {ipc}, {preset} (nets in brackets)", fontsize=9)
        ax.set_xlabel("test accuracy (%)", fontsize=8)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    fig.suptitle("Fashion-MNIST, ConvNet-3 trained on the distilled set", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


# Published Fashion-MNIST anchors, ConvNet-3 (../shared/spec/benchmarks.md section 1; "U" = widely cited, unchecked).
ANCHORS = {
    "random": {1: "51.4+-3.8 (U)", 10: "73.8+-0.7 (U)", 50: "82.5+-0.7 (U)"},
    "herding": {1: "67.0+-1.9 (U)", 10: "71.1+-0.7 (U)", 50: "71.9+-0.8 (U)"},
    "DC": {1: "70.5", 10: "82.3", 50: "83.6"},
    "DSA": {1: "70.6", 10: "84.6", 50: "88.7"},
    "IDC-I": {1: "70.7", 10: "85.3", 50: "89.1"},
}


def print_table(results: dict) -> None:
    cov = results.get("coverage", {})
    w = max([14, *(len(g.split("|")[0]) for g in _groups(results))])  # tagged names (igd-gamma3.125) stay aligned
    print(f"\n{'method':<{w}} {'IPC':>4} {'preset':<9} {'net':<8} {'nets':>4}  {'accuracy':<15} {'coverage':>8} "
          f"{'distance':>8} {'FID':>7} {'floor':>6} {'prec':>5} {'recall':>6}  published")
    for group, accs in sorted(_groups(results).items()):
        method, ipc, preset, net, epochs, set_seed = group.split("|")
        if epochs != "epochsNone":  # a shortened schedule (--epochs) is not the preset's protocol: say so
            preset = f"{preset}:{epochs[6:]}ep"
        std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        c = cov.get(f"{method}|{ipc}|{set_seed}")
        c_txt = f"{c['mode_coverage']:>8.2f} {c['mode_distance']:>8.2f}" if c else f"{'-':>8} {'-':>8}"
        c_txt += (f" {c['gen_fid']:>7.2f} {c['gen_floor_fid']:>6.2f} {c['gen_precision']:>5.2f} {c['gen_recall']:>6.2f}"
                  if c and "gen_fid" in c else f" {'-':>7} {'-':>6} {'-':>5} {'-':>6}")
        pub = ANCHORS.get(method, {}).get(int(ipc[3:]), "")
        print(f"{method:<{w}} {ipc[3:]:>4} {preset:<9} {net:<8} {len(accs):>4}  "
              f"{statistics.mean(accs):6.2f} +- {std:4.2f}  {c_txt}  {pub}")
    ipcs = sorted({int(g.split("|")[1][3:]) for g in _groups(results)})
    print("published distillation anchors: " + "; ".join(
        f"{m} " + ", ".join(f"IPC {i} {ANCHORS[m][i]}" for i in ipcs if i in ANCHORS[m])
        for m in ("DC", "DSA", "IDC-I")))


if __name__ == "__main__":
    main()
