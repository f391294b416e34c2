"""Evaluation under bf16 autocast against fp32 on this CPU, side by side in one run (issue 22, item 4).

1. One ConvNet-3 training pass over 100 Fashion-MNIST images (the ``dc`` preset: one batch of 100, SGD), fp32 and
   bf16 interleaved round by round so that load on the machine hits both alike; median milliseconds per pass.
2. A ``dc`` evaluation of the random real IPC 10 subset (ConvNet-3, ``--nets`` nets, ``--epochs`` epochs; the
   preset's 300 unless shortened; the whole test split unless ``--test-images``) in fp32 and in bf16: accuracy
   mean +- std and seconds.

The CPU's ``avx512_bf16`` / ``amx_bf16`` flags are recorded: without them oneDNN has no native bf16 arithmetic and
emulates it through conversions, so bf16 is not expected to be faster.

    python benchmarks/eval_precision.py [--rounds 30] [--nets 3] [--epochs 300] [--test-images N] [--results F]
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

from raydistill.outputs import atomic_write_text

PRECISIONS = ("fp32", "bf16")


def cpu_flags() -> dict:
    """The bf16-related flags of this CPU (/proc/cpuinfo) and its model name."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    return {"model": model, **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def subset():
    from raydistill.data import load_dataset
    from raydistill.methods.baselines import random_real_indices

    ds = load_dataset("fashion-mnist")
    idx = [i for c in range(10) for i in random_real_indices(ds, c, 10, 0)]
    return ds, ds.read("train", idx), torch.as_tensor([c for c in range(10) for _ in range(10)])


def one_pass(rounds: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Median ms of one ``dc`` training pass of ConvNet-3 over the 100 images, per precision (interleaved)."""
    from raydistill.evaluate.fit import make_optimizer, train_pass
    from raydistill.evaluate.presets import get_preset
    from raydistill.models.evalnets import build_eval_net
    from raydistill.precision import precision_scope

    preset = get_preset("dc")
    xb = (x.float() / 255 - preset.mean[0]) / preset.std[0]
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    nets = {}
    for p in PRECISIONS:
        torch.manual_seed(0)
        net = build_eval_net("convnet", 1, 10, 28)
        nets[p] = (net, make_optimizer(preset, [q for q in net.parameters()], preset.lr))
    for r in range(rounds + 1):  # round 0 warms up
        for p in PRECISIONS:
            net, opt = nets[p]
            gen = torch.Generator().manual_seed(r)
            with precision_scope(p, "cpu", forwards=False):
                t0 = time.perf_counter()
                train_pass(net, opt, iter([(xb, y)]), preset, gen, p)
                dt = time.perf_counter() - t0
            if r:
                times[p].append(1000 * dt)
        if r and r % 10 == 0:
            print(f"pass timing round {r}/{rounds}: " + ", ".join(f"{p} {statistics.median(times[p]):.0f} ms"
                                                                   for p in PRECISIONS), flush=True)
    res = {f"{p}_ms_per_pass": statistics.median(times[p]) for p in PRECISIONS}
    res["bf16_speedup"] = res["fp32_ms_per_pass"] / res["bf16_ms_per_pass"]
    res["rounds"] = rounds
    return res


def full_eval(ds, x: torch.Tensor, y: torch.Tensor, nets: int, epochs: int | None, test_images: int | None) -> dict:
    from raydistill.evaluate.train import evaluate_synthetic

    tx, ty = ds.load("test")
    if test_images:
        tx, ty = tx[:test_images], ty[:test_images]
    res: dict = {"test_images": len(tx)}
    for p in PRECISIONS:
        r = evaluate_synthetic(x.float() / 255, y, tx.float() / 255, ty, preset="dc", net="convnet", num_nets=nets,
                               epochs=epochs, device="cpu", precision=p,
                               progress=lambda m, p=p: print(f"[{p}] {m}", flush=True), progress_every_s=30)
        res[p] = {"mean": r.reported_mean, "std": r.reported_std, "accs": r.last_accs, "seconds": r.seconds,
                  "epochs": r.epochs, "nets": r.num_nets}
        print(f"dc {p}: {r.reported_mean:.2f} +- {r.reported_std:.2f} ({r.num_nets} nets, {r.epochs} epochs, "
              f"{r.seconds:.0f} s)", flush=True)
    res["accuracy_gap"] = res["bf16"]["mean"] - res["fp32"]["mean"]
    res["within_spread"] = abs(res["accuracy_gap"]) <= max(res["fp32"]["std"], res["bf16"]["std"])
    res["bf16_speedup"] = res["fp32"]["seconds"] / res["bf16"]["seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="timed passes per precision (default 30)")
    ap.add_argument("--nets", type=int, default=3, help="nets of the dc evaluation per precision (default 3)")
    ap.add_argument("--epochs", type=int, help="epochs of the dc evaluation (default: the preset's 300)")
    ap.add_argument("--test-images", type=int, help="score on the first N test images (default: all 10,000)")
    ap.add_argument("--results", default="benchmarks/results/eval_precision.json")
    a = ap.parse_args()
    ds, x, y = subset()
    res = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_average": list(os.getloadavg()),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads", "cpu": cpu_flags()}
    print(f"cpu: {res['cpu']}", flush=True)
    res["one_pass"] = one_pass(a.rounds, x, y)
    res["dc_evaluation"] = full_eval(ds, x, y, a.nets, a.epochs, a.test_images)
    res["load_average_end"] = list(os.getloadavg())
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.results), json.dumps(res, indent=1))
    print(json.dumps(res["one_pass"]), flush=True)


if __name__ == "__main__":
    main()
