"""One evaluation net through a preset's schedule (:mod:`raydistill.evaluate.presets`): the optimizer, one training
pass (with CutMix when the preset asks), the ``dc_step`` / ``multistep`` schedules, test accuracy and progress lines.
The data come from the caller as callables, so the tensor pipeline (:mod:`.train`) and the DataLoader reference of the
speed benchmark (``benchmarks/eval_reference.py``) share this loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.evaluate.augment import cutmix
from raydistill.evaluate.presets import EvalPreset, dc_decay_pass, multistep_milestones
from raydistill.precision import autocast, precision_scope

ProgressFn = Callable[[str], None]
EpochFn = Callable[[int, int, float], None]
PassFn = Callable[[int, int], None]
Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
TestFn = Callable[[nn.Module], float]


def make_optimizer(preset: EvalPreset, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if preset.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=preset.momentum, weight_decay=preset.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=preset.betas, weight_decay=preset.weight_decay)


def train_pass(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    preset: EvalPreset,
    gen: torch.Generator,
    precision: str = "fp32",
) -> None:
    """One pass over ``batches``; forwards and losses under ``precision``'s autocast (:mod:`raydistill.precision`)."""
    model.train()
    for xb, yb in batches:
        use_mix = preset.cutmix_p >= 1.0 or (
            preset.cutmix_p > 0 and float(torch.rand(1, generator=gen, device=gen.device).item()) < preset.cutmix_p
        )
        with autocast(precision, xb.device):
            if use_mix:
                mix = cutmix(xb, yb, gen)
                loss = mix.loss(model(mix.x))
            else:
                loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def pass_reporter(
    progress: ProgressFn | None, every_s: float, net_index: int, num_nets: int, label: str
) -> PassFn | None:
    """A ``_fit`` ``on_pass`` hook that sends "net 2/5 convnet3: pass 400/1001 (310 s, ~465 s left)" to ``progress``
    at most every ``every_s`` seconds (never after the last pass: the finished-net line follows it)."""
    if progress is None:
        return None
    start = last = time.perf_counter()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done < total and now - last >= every_s:
            last = now
            left = (now - start) / done * (total - done)
            progress(
                f"net {net_index + 1}/{num_nets} {label}: pass {done}/{total} ({now - start:.0f} s, ~{left:.0f} s left)"
            )

    return report


def fit(
    model: nn.Module,
    preset: EvalPreset,
    epochs: int,
    eval_every: int,
    batches_fn: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    test_fn: Callable[[nn.Module], float],
    gen: torch.Generator,
    on_epoch: EpochFn | None,
    net_index: int,
    on_pass: PassFn | None = None,
    precision: str = "fp32",
) -> tuple[float, float]:
    """Run one net through the preset's schedule; returns (last, best) test accuracy in percent.

    Epoch numbers given to ``on_epoch`` count completed passes: 1..E+1 for ``dc_step``, 1..E for ``multistep``.
    ``on_pass(done, total)`` is called after every pass (progress only; it sees no model state). ``precision``
    (fp32 for the published protocols, tf32, bf16, auto) holds for training and testing; ``test_fn`` runs its
    forwards under its autocast too.
    """
    device = next(model.parameters()).device
    with precision_scope(precision, device, forwards=False):
        return _fit(model, preset, epochs, eval_every, batches_fn, test_fn, gen, on_epoch, net_index, on_pass,
                    precision)


def _fit(model: nn.Module, preset: EvalPreset, epochs: int, eval_every: int, batches_fn: Batches, test_fn: TestFn,
         gen: torch.Generator, on_epoch: EpochFn | None, net_index: int, on_pass: PassFn | None,
         precision: str) -> tuple[float, float]:
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    accs: list[float] = []

    def evaluate(done: int) -> None:
        with autocast(precision, device):
            acc = test_fn(model)
        accs.append(acc)
        if on_epoch is not None:
            on_epoch(net_index, done, acc)

    if preset.schedule == "dc_step":
        lr = preset.lr
        opt = make_optimizer(preset, params, lr)
        decay_at, passes = dc_decay_pass(epochs), epochs + 1
        for ep in range(passes):
            train_pass(model, opt, batches_fn(), preset, gen, precision)
            if on_pass is not None:
                on_pass(ep + 1, passes)
            if ep == decay_at:  # DC: lr *= 0.1 and a fresh optimizer (momentum reset)
                lr *= preset.lr_decay
                opt = make_optimizer(preset, params, lr)
            done = ep + 1
            if done == passes or (eval_every > 0 and done % eval_every == 0):
                evaluate(done)
    else:
        opt = make_optimizer(preset, params, preset.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, multistep_milestones(preset, epochs), gamma=preset.gamma)
        for epoch in range(1, epochs + 1):
            train_pass(model, opt, batches_fn(), preset, gen, precision)
            if on_pass is not None:
                on_pass(epoch, epochs)
            if epoch == epochs or (eval_every > 0 and epoch % eval_every == 0):
                evaluate(epoch)
            sched.step()
    return accs[-1], max(accs)


def test_accuracy(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int) -> float:
    model.eval()
    correct: torch.Tensor | int = 0
    with torch.inference_mode():
        for xb, yb in batches:
            correct = correct + (model(xb).argmax(dim=1) == yb).sum()
    model.train()
    return 100.0 * float(correct) / n
