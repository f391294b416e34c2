"""Minimax's criteria (spec 1.3): representativeness and diversity of the predicted clean latents against per-class
memories of real latents and past predictions, added to the diffusion loss while fine-tuning
(:mod:`raydistill.methods.minimax.finetune`)."""

from __future__ import annotations

import torch
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities of flattened rows: a [n, ...], b [m, ...] -> [n, m] (the original has no epsilon)."""
    a, b = a.flatten(1), b.flatten(1)  # [n, D], [m, D]
    return (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])


def minimax_class_terms(x0_hat: Tensor, real: Tensor, pseudo: Tensor) -> tuple[Tensor, Tensor]:
    """Spec 1.3 for one class: ``L_r = 1 - min cos(x0_hat, R_c)``, ``L_d = max cos(x0_hat, P_c)``.

    x0_hat [n, C, h, w] (the class's predictions in the batch), real [m, C, h, w], pseudo [k, C, h, w].
    The min/max run over the whole [n, m] / [n, k] matrix: L_r pulls towards the least similar real latent,
    L_d pushes away from the most similar past prediction.
    """
    return 1.0 - cosine_matrix(x0_hat, real).min(), cosine_matrix(x0_hat, pseudo).max()


class ClassMemory:
    """Per-class FIFO memories of real latents ``R_c`` and detached predictions ``P_c`` (spec 1.3, N_M = 64)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.real: dict[int, Tensor] = {}  # c -> [<=size, C, h, w]
        self.pseudo: dict[int, Tensor] = {}

    def push(self, c: int, real: Tensor, pseudo: Tensor) -> None:
        """Append (oldest dropped beyond ``size``)."""
        for mem, new in ((self.real, real), (self.pseudo, pseudo)):
            cur = mem.get(c)
            cat = new.detach() if cur is None else torch.cat([cur, new.detach()])
            mem[c] = cat[-self.size:].clone()

    def state(self) -> dict:
        return {"size": self.size, "real": dict(self.real), "pseudo": dict(self.pseudo)}

    @classmethod
    def from_state(cls, st: dict, device: torch.device | str = "cpu") -> ClassMemory:
        m = cls(int(st["size"]))
        m.real = {int(k): v.to(device) for k, v in st["real"].items()}
        m.pseudo = {int(k): v.to(device) for k, v in st["pseudo"].items()}
        return m


def minimax_loss(x0_hat: Tensor, labels: Tensor, memory: ClassMemory, lambda_pos: float = 0.002,
                 lambda_neg: float = 0.008) -> tuple[Tensor, Tensor, Tensor]:
    """``sum_c [lambda_pos L_r(c) + lambda_neg L_d(c)] / (#classes in batch)`` over classes with a non-empty
    ``P_c``; returns (total, weighted L_r sum, weighted L_d sum). x0_hat [B, C, h, w], labels [B] (subset labels).
    The memories are not updated here (see :meth:`ClassMemory.push`)."""
    classes = sorted(set(labels.tolist()))
    pos = x0_hat.new_zeros(())
    neg = x0_hat.new_zeros(())
    for c in classes:
        if len(memory.pseudo.get(c, ())):  # the first time a class is seen there is no minimax term
            l_r, l_d = minimax_class_terms(x0_hat[labels == c], memory.real[c], memory.pseudo[c])
            pos = pos + l_r * lambda_pos / len(classes)
            neg = neg + l_d * lambda_neg / len(classes)
    return pos + neg, pos, neg
