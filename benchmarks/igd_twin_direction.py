"""How far IGD's influence direction moves when the unconditional twin is decoded too (issue 24 item 3, spec 2.2).

On the built-in Fashion-MNIST model and surrogate, one image per class is sampled along the released (twin) chain:
influence guidance only (k = 5, gamma = 0, window [30, 45], CFG 4, 50 DDPM steps). At every window step the twin
gradient (CE averaged over the image and its twin) and the one-copy gradient (the image alone, same x_t) are taken
and compared: their cosine per image, and the relative distance between the twin's and the image's x0_hat. Results
go to benchmarks/results/igd_twin_direction.json (docs/METHODS.md, IGD).

    OMP_NUM_THREADS=1 python benchmarks/igd_twin_direction.py [--classes 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from raydistill.config import BUILTIN_MODEL, DistillConfig
from raydistill.data import load_dataset
from raydistill.diffusion.sampler import cfg_predict, dit_denoiser
from raydistill.generator import load_generator
from raydistill.guidance.base import StepContext
from raydistill.methods.igd.guidance import InfluenceGuidance
from raydistill.methods.igd.surrogate import Trajectory, resolve_epochs

OUT = Path(__file__).parent / "results" / "igd_twin_direction.json"


class TwinVsOneCopy:
    """The twin influence term (its delta drives the chain), measuring the one-copy gradient at the same x_t."""

    name = "igd-influence"
    uses_twin = True

    def __init__(self, twin: InfluenceGuidance, one: InfluenceGuidance, gen) -> None:
        self.twin, self.one, self.gen = twin, one, gen
        self.rows: list[dict] = []

    def active(self, i: int) -> bool:
        return self.twin.active(i)

    def needs_grad(self, i: int) -> bool:
        return self.twin.needs_grad(i)

    def on_images_done(self, *a) -> None:
        return None

    def _fresh(self, ctx: StepContext) -> StepContext:
        """The same step with its own graph (each gradient frees the graph it used)."""
        x = ctx.x_t.detach().requires_grad_()
        mv = cfg_predict(dit_denoiser(self.gen.dit), self.gen.schedule, x, ctx.i, ctx.dit_labels,
                         self.gen.null_label, self.gen.sampler)
        return dataclasses.replace(ctx, x_t=x, eps=mv.eps, x0_hat=mv.x0_hat, mean=mv.mean, x0_hat_twin=None)

    def delta(self, ctx: StepContext) -> torch.Tensor:
        g_one = self.one.gradient(self._fresh(ctx)).flatten(1)
        drift = ((ctx.x0_hat_twin - ctx.x0_hat).flatten(1).norm(dim=1) / ctx.x0_hat.flatten(1).norm(dim=1)).detach()
        d = self.twin.delta(ctx)  # -k rho g_twin, rho > 0 per image: its direction is -g_twin
        cos = torch.nn.functional.cosine_similarity(-d.flatten(1), g_one, dim=1)
        for b in range(d.shape[0]):
            self.rows.append({"step": ctx.i, "class": int(ctx.class_labels[b]), "cosine": float(cos[b]),
                              "x0_hat_drift": float(drift[b])})
        return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    ds = load_dataset("fashion-mnist")
    gen = load_generator(DistillConfig(), ds.dit_labels, ds.image_size, "cpu")
    traj = Trajectory(BUILTIN_MODEL / "surrogate", device="cpu")
    epochs = resolve_epochs(traj, ds.name, "similarity")
    labels = list(range(a.classes))
    with tempfile.TemporaryDirectory() as cache:  # the shipped trajectory stays untouched
        real = {c: traj.real_gradients(ds, c, epochs, 200, cache) for c in labels}
    ckpts = [traj.params(e) for e in epochs]
    make = lambda twin: InfluenceGuidance(gen.codec.decode, traj.net, ckpts, real, scale=5.0, twin=twin)  # noqa: E731
    term = TwinVsOneCopy(make(True), make(False), gen)
    gen.sample_latents(labels, [0] * len(labels), a.seed, [term])
    cos = torch.tensor([r["cosine"] for r in term.rows])
    by_step = {}
    for r in term.rows:
        by_step.setdefault(r["step"], []).append(r)
    steps = {s: {"cosine_mean": sum(r["cosine"] for r in rs) / len(rs), "cosine_min": min(r["cosine"] for r in rs),
                 "x0_hat_drift_mean": sum(r["x0_hat_drift"] for r in rs) / len(rs)}
             for s, rs in sorted(by_step.items(), reverse=True)}
    summary = {"classes": labels, "seed": a.seed, "epochs": epochs, "k": 5.0, "cfg_scale": gen.sampler.cfg_scale,
               "window": [30, 45], "cosine_mean": float(cos.mean()), "cosine_median": float(cos.median()),
               "cosine_min": float(cos.min()), "cosine_max": float(cos.max()), "by_step": steps, "rows": term.rows,
               "seconds": round(time.time() - t0, 1), "threads": a.threads}
    OUT.write_text(json.dumps(summary, indent=1))
    print(f"{len(term.rows)} (image, step) pairs: cosine(twin, one copy) mean {summary['cosine_mean']:.3f}, "
          f"median {summary['cosine_median']:.3f}, min {summary['cosine_min']:.3f}, max {summary['cosine_max']:.3f}")
    for s, v in steps.items():
        print(f"step {s:>2}: cosine mean {v['cosine_mean']:.3f} min {v['cosine_min']:.3f}, twin x0_hat drift "
              f"{v['x0_hat_drift_mean']:.3f}")
    print(f"{summary['seconds']:.0f} s -> {OUT}")


if __name__ == "__main__":
    main()
