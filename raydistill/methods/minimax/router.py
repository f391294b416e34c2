"""Sampling from a Minimax fine-tune (spec 1.4-1.5): where it comes from (a ``raydistill finetune`` folder or an
official Minimax ``.pt``), loading its EMA into a DiffFit DiT, and routing every class to the phase fine-tuned on it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from raydistill.errors import UserError
from raydistill.methods.minimax.finetune import INDEX_FILE, path_digest


class PhaseRouter:
    """Holds the per-phase EMA tensors of a fine-tune and swaps them into one DiffFit DiT in place (cheap: only the
    trainable parameters), so every class is sampled by the model fine-tuned on it (spec 1.5)."""

    def __init__(self, model, phase_tensors: list[dict[str, Tensor]], phase_of_label: dict[int, int]) -> None:
        self.model, self.phase_tensors, self.phase_of_label = model, phase_tensors, phase_of_label
        self.active: int | None = None

    def phase_of(self, dit_label: int) -> int:
        if int(dit_label) not in self.phase_of_label:
            raise UserError(f"the Minimax fine-tune does not cover model label {dit_label}",
                            "fine-tune the classes you distill (`raydistill finetune --classes ...`)")
        return self.phase_of_label[int(dit_label)]

    def check_covers(self, dit_labels: Sequence[int]) -> None:
        for y in dit_labels:
            self.phase_of(int(y))

    def activate(self, phase: int) -> None:
        from raydistill.methods.minimax.difffit import load_trainable_state

        if phase != self.active:
            dev = next(self.model.parameters()).device
            load_trainable_state(self.model, {k: v.to(dev) for k, v in self.phase_tensors[phase].items()})
            self.active = phase

    def groups(self, dit_labels: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(phase, row indices) for a batch, phases in first-seen order."""
        out: dict[int, list[int]] = {}
        for row, y in enumerate(dit_labels):
            out.setdefault(self.phase_of(int(y)), []).append(row)
        return list(out.items())


def finetune_source(cfg) -> tuple[str, Path]:
    """Where a minimax method's fine-tune comes from, without loading weights: ("folder", path) for a
    ``raydistill finetune`` output, or ("checkpoint", path) for an official Minimax ``.pt`` (original DiT layout
    with gammas and ``ema``; from ``extra.finetune`` or, with no fine-tune set, ``--model``)."""
    from raydistill.config import BUILTIN_MODEL

    ex = cfg.extra.get("finetune")
    if ex is None:
        if cfg.model is not None and Path(cfg.model).suffix == ".pt":
            return "checkpoint", Path(cfg.model)
        if cfg.model is None and (BUILTIN_MODEL / "minimax" / INDEX_FILE).exists():
            return "folder", BUILTIN_MODEL / "minimax"
        hint = "run `raydistill finetune`" + ("" if cfg.model is None else " --model ... --vae ... --out DIR") + \
            (" (it writes the built-in model's fine-tune)" if cfg.model is None else " and pass --set finetune=DIR")
        raise UserError(f"method {cfg.method} needs a Minimax fine-tune of the DiT and none was found", hint)
    p = Path(str(ex))
    if p.is_file() and p.suffix == ".pt":
        return "checkpoint", p
    if not (p / INDEX_FILE).exists():
        raise UserError(f"{p} is not a Minimax fine-tune (no {INDEX_FILE})",
                        "pass --set finetune=DIR with a folder written by `raydistill finetune`, or an official "
                        "Minimax .pt")
    index = json.loads((p / INDEX_FILE).read_text())
    if not index.get("complete"):
        raise UserError(f"the Minimax fine-tune in {p} is not finished", "rerun the same `raydistill finetune` "
                        "command to resume it")
    return "folder", p


def load_minimax_dit(cfg, dit_path: Path, device: torch.device):
    """(eval-mode DiffFit DiT, PhaseRouter or None) for a minimax method (see :func:`finetune_source`)."""
    from safetensors.torch import load_file

    from raydistill.methods.minimax.difffit import apply_difffit, load_minimax_checkpoint
    from raydistill.models.dit_convert import load_dit

    kind, src = finetune_source(cfg)
    if kind == "checkpoint":
        return load_minimax_checkpoint(src, size=cfg.model_size).to(device).requires_grad_(False).eval(), None
    index = json.loads((src / INDEX_FILE).read_text())
    want = index["base"]["sha256"]
    got = path_digest(dit_path)
    if got != want:
        raise UserError(f"the Minimax fine-tune in {src} was made from another base model ({index['base']['path']}, "
                        f"sha256 {want[:12]}) than {dit_path} (sha256 {got[:12]})",
                        "pass the --model (and --vae) the fine-tune was made from")
    model = load_dit(dit_path, size=cfg.model_size, device=device)
    info0 = json.loads((src / index["phases"][0]["dir"] / "finetune.json").read_text())
    apply_difffit(model, info0["gamma_blocks"], tie=info0["tied_embedders"])
    tensors, phase_of = [], {}
    for p, ph in enumerate(index["phases"]):
        tensors.append(load_file(str(src / ph["dir"] / "ema.safetensors")))
        phase_of.update({int(y): p for y in ph["dit_labels"]})
    router = PhaseRouter(model, tensors, phase_of)
    router.activate(0)
    return model.requires_grad_(False).eval(), router
