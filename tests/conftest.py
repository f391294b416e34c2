"""Shared fixtures: tiny random models saved in diffusers layout, temporary output roots."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# One torch thread per test process (and per subprocess it starts): the suite is many small ops, and a second
# OpenMP thread on a CPU that something else keeps busy spin-waits (one IGD test: 10 s at one thread, 90 s at two
# beside a two-thread training run). Parallelism comes from pytest-xdist's workers instead (scripts/test).
TEST_THREADS = int(os.environ.get("RAYDISTILL_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
torch.set_num_threads(TEST_THREADS)

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Debian package dataset-fashion-mnist is not installed")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module is executed
    spec.loader.exec_module(module)
    return module


def make_tiny_model(root: Path, num_classes: int = 10, channels: int = 1, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random DiT (size "test", 8x8x4 latents) and a tiny AutoencoderKL (32 px, x4) saved under ``root``."""
    from raydistill.models.dit import DiTConfig, build_dit
    from raydistill.models.vae import build_small_vae

    torch.manual_seed(seed)
    dit = build_dit(DiTConfig(size="test", input_size=8, in_channels=4, num_classes=num_classes))
    with torch.no_grad():  # diffusers zero-initialises the adaLN/out layers: randomise so outputs depend on inputs
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    vae = build_small_vae(channels=channels, block_out=(8, 8, 8), scaling_factor=1.0)
    dit.save_pretrained(root / "dit")
    vae.save_pretrained(root / "vae")
    return root / "dit", root / "vae"


def make_fake_trajectory(path: Path, ds, epochs: int = 3, seed: int = 0):
    """An IGD surrogate trajectory folder for ``ds`` with random ConvNet-3 snapshots (no training: the maths of the
    guidance does not care), loaded as a :class:`Trajectory`."""
    import json

    from raydistill.methods.igd.surrogate import SurrogateConfig, Trajectory, _write_safetensors
    from raydistill.models.evalnets import build_eval_net

    path.mkdir(parents=True, exist_ok=True)
    cfg = SurrogateConfig(net="convnet3", epochs=epochs)
    meta = {"config": cfg.__dict__, "data": {"dataset": ds.name, "classes": list(ds.class_names),
                                             "image_size": ds.image_size, "channels": ds.channels,
                                             "train_images": ds.num_images("train")},
            "epochs_done": epochs, "log": []}
    (path / "trajectory.json").write_text(json.dumps(meta))
    for e in range(epochs + 1):
        torch.manual_seed(seed + e)
        net = build_eval_net("convnet3", ds.channels, ds.num_classes, ds.image_size)
        _write_safetensors(path / f"epoch_{e:03d}.safetensors", dict(net.state_dict()))
    return Trajectory(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def fmnist():
    """The real Fashion-MNIST (tests that use it are marked ``needs_fmnist``)."""
    from raydistill.data import load_dataset

    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def gen(tiny_model, fmnist):
    """The tiny model as a generator for Fashion-MNIST's labels: 50-step DDPM, on the CPU."""
    from raydistill.config import DistillConfig
    from raydistill.generator import load_generator

    dit, vae = tiny_model
    return load_generator(DistillConfig(model=str(dit), vae=str(vae)), fmnist.dit_labels, fmnist.image_size, "cpu")


@pytest.fixture(scope="module")
def ray_local():
    """A private loopback Ray (2 CPUs, no GPU) for the tests of one module."""
    from raydistill.orchestration.runtime import ray_session

    with ray_session(num_cpus=2, num_gpus=0):
        yield
