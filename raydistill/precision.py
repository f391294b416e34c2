"""Numerics of sampling, guidance and evaluation: the ``precision`` / ``eval_precision`` settings and ``compile``.

- ``fp32``: plain float32 (TF32 off for cuBLAS and cuDNN, so a CUDA run is true fp32).
- ``tf32``: float32 tensors, matmuls and convolutions on TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``
  and ``torch.backends.cudnn.allow_tf32``, as DiT's ``sample.py`` and IGD's released sampler set them). On a CPU
  these flags do nothing: tf32 computes as fp32 there.
- ``bf16``: :func:`torch.autocast` with ``dtype=torch.bfloat16`` around the forwards (DiT, VAE, surrogate, evaluation
  net); TF32 stays on for the ops autocast keeps in float32. Parameters, latents, gradients and the sampler's
  arithmetic stay float32 (the DiT's output is cast back before the CFG combination).
- ``auto`` (the default of ``precision``): tf32 on CUDA, fp32 elsewhere. ``eval_precision`` defaults to fp32: the
  published evaluation protocols (DC, IDC) train in fp32.

The flags are set for the duration of :func:`precision_scope` and restored afterwards, so one process can run a
tf32 sampler and an fp32 evaluation one after the other. :func:`maybe_compile` wraps a module in
:func:`torch.compile` (the ``compile`` setting), after :func:`compile_problem` found nothing that stops it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from raydistill.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the config validates precisions without it
    import torch

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def check_precision(value: object, key: str = "precision") -> str:
    """``value`` if it names a precision, else one UserError line naming ``key`` and the choices."""
    if value not in PRECISIONS:
        flag = "--" + key.replace("_", "-")
        raise UserError(f"{key} must be one of {', '.join(PRECISIONS)}, got {value!r}",
                        f"pass {flag} fp32, tf32 or bf16 (auto: tf32 on CUDA, fp32 on CPU)")
    return str(value)


def resolve_precision(value: str, device: str | torch.device) -> str:
    """The precision ``value`` means on ``device``: ``auto`` is tf32 on CUDA and fp32 elsewhere."""
    import torch

    check_precision(value)
    if value != "auto":
        return value
    return "tf32" if torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def precision_scope(value: str, device: str | torch.device, forwards: bool = True) -> Iterator[str]:
    """Run the block in precision ``value`` on ``device`` (module docstring); yields the resolved name.

    ``forwards=False`` sets only the TF32 flags (for a training loop that wraps its forwards in :func:`autocast`)."""
    import torch

    name = resolve_precision(value, device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = name != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        with autocast(name, device) if forwards else contextlib.nullcontext():
            yield name
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(value: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device``'s type when ``value`` resolves to bf16, else a no-op context. A training loop
    puts only its forward and loss in it (PyTorch's advice: the backward runs outside, in the forward's dtypes)."""
    import torch

    if resolve_precision(value, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def compile_problem() -> str | None:
    """Why :func:`torch.compile` cannot work here (None when it can): it needs TorchDynamo for this Python and, for
    its inductor backend, a C compiler to build the generated kernels."""
    import torch
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"TorchDynamo does not support Python {sys.version.split()[0]} with torch {torch.__version__}"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) on PATH for torch.compile's inductor kernels"
    return None


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(module)`` when ``enabled`` (one UserError line if it cannot work here), else ``module``.

    The compiled module shares the parameters of ``module``; the first call of each new input shape compiles
    (docs/BENCHMARKS.md gives the warm-up cost measured on CPU)."""
    import torch

    if not enabled:
        return module
    problem = compile_problem()
    if problem is not None:
        raise UserError(f"--compile cannot work on this machine: {problem}", "leave --compile off (eager mode)")
    return torch.compile(module)
