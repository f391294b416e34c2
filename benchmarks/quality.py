"""Fashion-MNIST quality table: distill each method at each IPC, train fresh nets on it, report accuracy.

Resumable at the granularity of one net: results accumulate in a JSON file (default
``benchmarks/results/quality.json``) keyed by (method, IPC, preset, net, seed index); a rerun skips what is there.
Distilled sets are cached under ``--root`` (same settings -> resumed, see raydistill.outputs).

    python benchmarks/quality.py --methods random,dit --ipc 10 --preset dc --nets 5
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

from raydistill.config import DistillConfig
from raydistill.distill import distill_local, evaluate_images, load_distilled, open_dataset, selected_labels
from raydistill.outputs import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="random,dit")
    ap.add_argument("--ipc", default="10", help="comma-separated IPCs")
    ap.add_argument("--preset", default="dc")
    ap.add_argument("--net", default="convnet")
    ap.add_argument("--nets", type=int, default=5, help="nets per (method, IPC)")
    ap.add_argument("--seed", type=int, default=0, help="distillation seed (one synthetic set per method/IPC)")
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--root", default="runs/bench")
    ap.add_argument("--results", default="benchmarks/results/quality.json")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res_path = Path(a.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": {}}
    for ipc in [int(v) for v in a.ipc.split(",")]:
        for method in a.methods.split(","):
            cfg = DistillConfig(method=method, ipc=ipc, seed=a.seed, baselines=(),
                                out=str(Path(a.root) / f"{method}-ipc{ipc}-seed{a.seed}"))
            t0 = time.time()
            tag = f"{method} ipc{ipc}"
            made = distill_local(cfg, progress=lambda m, tag=tag: print(f"  [{tag}] {m}", flush=True))
            print(f"[{method} ipc{ipc}] set ready ({made.shards_run} shards made, {time.time() - t0:.0f} s)",
                  flush=True)
            ds = open_dataset(cfg)
            x, y = load_distilled(cfg.out, ds, selected_labels(cfg, ds), ipc=ipc)
            for i in range(a.nets):
                key = f"{method}|ipc{ipc}|{a.preset}|{a.net}|epochs{a.epochs}|set{a.seed}|net{i}"
                if key in results["runs"]:
                    continue
                r = evaluate_images(x, y, ds, a.preset, a.net, 1, seed=1000 * a.seed + i, epochs=a.epochs)
                results["runs"][key] = {"last": r.last_accs[0], "best": r.best_accs[0], "seconds": r.seconds,
                                        "report": r.report, "epochs": r.epochs}
                results["machine"] = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, " \
                                     f"threads {torch.get_num_threads()}"
                atomic_write_text(res_path, json.dumps(results, indent=1))
                print(f"[{method} ipc{ipc} {a.preset}] net {i + 1}/{a.nets}: {r.reported_mean:.2f}% "
                      f"({r.seconds:.0f} s)", flush=True)
    print_table(results)


def print_table(results: dict) -> None:
    groups: dict[str, list[float]] = {}
    for key, r in results["runs"].items():
        group = key.rsplit("|", 1)[0]
        groups.setdefault(group, []).append(r["last"] if r["report"] == "last" else r["best"])
    print(f"\n{'method':<12} {'IPC':>4} {'preset':<6} {'net':<8} {'nets':>4}  accuracy")
    for group, accs in sorted(groups.items()):
        method, ipc, preset, net, _, _ = group.split("|")
        std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        mean = statistics.mean(accs)
        print(f"{method:<12} {ipc[3:]:>4} {preset:<6} {net:<8} {len(accs):>4}  {mean:.2f} +- {std:.2f}")


if __name__ == "__main__":
    main()
