"""GPU tests (``pytest -m gpu``; skipped without CUDA): device placement, CUDA sampling against CPU sampling on a
tiny model, and the TF32 / bf16 paths of the sampler and the evaluation (benchmarks/gpu_check.sh runs them).

Tolerances: fp32 CUDA latents equal the CPU ones to 1e-3 relative L2 (different kernels, same maths), tf32 to 1e-2,
bf16 to 2e-2 (the CPU bf16 bound of tests/test_precision.py)."""

from __future__ import annotations

import pytest
import torch

from raydistill.config import DistillConfig
from raydistill.data import load_dataset
from raydistill.generator import load_generator
from raydistill.precision import precision_scope

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _gen(tiny_model, ds, device: str, **kw):
    dit, vae = tiny_model
    return load_generator(DistillConfig(dataset="digits", model=str(dit), vae=str(vae), **kw), ds.dit_labels,
                          ds.image_size, device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).norm() / b.cpu().norm())


def test_generator_lives_on_the_gpu(tiny_model, digits) -> None:
    g = _gen(tiny_model, digits, "cuda")
    assert next(g.dit.parameters()).is_cuda and next(g.codec.parameters()).is_cuda
    z = g.sample_latents([0, 1], [0, 0], 0)
    assert z.is_cuda and torch.isfinite(z).all()
    img = g.decode(z)
    assert img.dtype == torch.uint8 and img.shape[0] == 2


@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-3), ("tf32", 1e-2), ("bf16", 2e-2)])
def test_cuda_sampling_equals_cpu_sampling(tiny_model, digits, precision: str, tol: float) -> None:
    cpu = _gen(tiny_model, digits, "cpu", precision="fp32").sample_latents([0, 1, 2, 3], [0, 1, 0, 1], 0)
    cuda = _gen(tiny_model, digits, "cuda", precision=precision).sample_latents([0, 1, 2, 3], [0, 1, 0, 1], 0)
    assert _rel(cuda, cpu) < tol


def test_auto_is_tf32_on_cuda_and_bf16_autocasts() -> None:
    with precision_scope("auto", "cuda") as name:
        assert name == "tf32" and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with precision_scope("fp32", "cuda"):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    a = torch.randn(64, 64, device="cuda")
    with precision_scope("bf16", "cuda"):
        assert (a @ a).dtype == torch.bfloat16


def test_bf16_evaluation_on_cuda_learns(digits) -> None:
    from raydistill.evaluate.train import evaluate_synthetic

    x = torch.cat([digits.load("train", label=c)[0][:30] for c in range(10)])
    y = torch.arange(10).repeat_interleave(30)
    tx, ty = digits.load("test")
    r = {p: evaluate_synthetic(x.float() / 255, y, tx.float() / 255, ty, net="convnet", num_nets=1, epochs=30,
                               device="cuda", precision=p) for p in ("fp32", "bf16")}
    assert r["bf16"].reported_mean > 50 and abs(r["bf16"].reported_mean - r["fp32"].reported_mean) < 15
