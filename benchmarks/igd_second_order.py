"""IGD's surrogate second-order term: the shipped ``fast`` path (``vmap(grad)`` per checkpoint, a loop over
checkpoints) against one ``vmap`` over the stacked checkpoints, same run, same gradient (docs/BENCHMARKS.md section 6).

    python benchmarks/igd_second_order.py [--batch 8] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from raydistill.config import BUILTIN_MODEL
from raydistill.methods.igd.guidance import InfluenceGuidance, code_cosine
from raydistill.methods.igd.surrogate import Trajectory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    traj = Trajectory(BUILTIN_MODEL / "surrogate", device="cpu")
    epochs = [0, 1]  # the shipped similarity selection
    ckpts = [traj.params(e) for e in epochs]
    n_params = sum(v.numel() for v in ckpts[0].values())
    gen = torch.Generator().manual_seed(0)
    real = {0: torch.randn(len(epochs), n_params, generator=gen)}
    term = InfluenceGuidance(lambda z: z, traj.net, ckpts, real)
    images = torch.randn(a.batch, 1, 28, 28, generator=gen)
    labels = torch.zeros(a.batch, dtype=torch.long)
    stacked = {k: torch.stack([c[k].detach() for c in ckpts]) for k in ckpts[0]}

    def loss(params, image, label):
        return F.cross_entropy(functional_call(traj.net, params, (image[None],)), label[None])

    def stacked_losses(x):  # [E, B] per-image losses of every checkpoint in one nested vmap
        per = vmap(vmap(grad(loss), in_dims=(None, 0, 0)), in_dims=(0, None, None))(stacked, x, labels)
        flat = torch.cat([per[k].reshape(len(epochs), a.batch, -1) for k in stacked], 2)  # [E, B, P]
        return (1 - code_cosine(flat, real[0][:, None])) / len(epochs)

    def timed(fn):
        best, g = float("inf"), None
        for _ in range(a.repeats):
            x = images.clone().requires_grad_()
            t0 = time.perf_counter()
            g = torch.autograd.grad(fn(x).sum(), x)[0]
            best = min(best, time.perf_counter() - t0)
        return best, g

    t_loop, g_loop = timed(lambda x: term.checkpoint_losses(x, labels))
    t_stack, g_stack = timed(stacked_losses)
    rel = float((g_loop - g_stack).norm() / g_loop.norm())
    print(f"batch {a.batch}, {len(epochs)} checkpoints, {a.threads} thread(s): shipped loop {1000 * t_loop:.0f} ms, "
          f"stacked vmap {1000 * t_stack:.0f} ms ({t_loop / t_stack:.2f}x), gradients equal to {rel:.1e} relative")


if __name__ == "__main__":
    main()
