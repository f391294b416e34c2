"""The plain reference pipeline of the evaluation protocol (``DataLoader`` over a ``TensorDataset``, per-image
augmentation calls as in the IDC code, DSA on each batch as in DC's ``epoch``), only for the speed comparison of
``benchmarks/throughput.py`` (docs/BENCHMARKS.md): the library's :func:`raydistill.evaluate.train.evaluate_synthetic`
runs the same protocol on device tensors. Both share the per-net loop (:func:`raydistill.evaluate.train.run_nets`)."""

from __future__ import annotations

import time

import torch
from torch import nn

from raydistill.evaluate.augment import dsa_augment, idc_augment
from raydistill.evaluate.fit import EpochFn, ProgressFn, test_accuracy
from raydistill.evaluate.presets import EvalPreset
from raydistill.evaluate.train import EvalResult, _norm_stats, _resize, run_nets, setup


class _PerImageDataset(torch.utils.data.Dataset):
    """TensorDataset whose ``__getitem__`` augments one image at a time (IDC's ImageFolder + transform style)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        preset: EvalPreset,
        mean: torch.Tensor,
        std: torch.Tensor,
        gen: torch.Generator,
    ) -> None:
        self.x, self.y, self.preset, self.mean, self.std, self.gen = x, y, preset, mean, std, gen

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i : i + 1]
        if self.preset.augment == "idc":
            p = self.preset
            img = (idc_augment(img, self.gen, p.rrc_scale, p.jitter, p.lighting_std) - self.mean) / self.std
        return img[0], self.y[i]


def evaluate_synthetic_dataloader(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    preset: str | EvalPreset = "dc",
    net: str = "convnet",
    num_nets: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epochs: int | None = None,
    progress: ProgressFn | None = None,
    on_epoch: EpochFn | None = None,
    eval_every: int | None = None,
    test_batch_size: int = 256,
    progress_every_s: float = 60.0,
) -> EvalResult:
    """Reference pipeline with the same protocol as :func:`evaluate_synthetic`, structured like the original code.

    Data stay on the CPU in a ``TensorDataset``-like dataset; a shuffling ``DataLoader`` (``num_workers=0``) yields
    batches that are moved to the device per step. idc/igd augmentation runs per image inside ``__getitem__`` (as
    IDC's transforms do), DSA runs on each batch on the device (as DC's ``epoch`` does), and the test set is iterated
    by a ``DataLoader`` with batch 256 (DC's test loader). Random streams differ from the fast path, so accuracies
    agree statistically, not bit for bit. Arguments are those of :func:`evaluate_synthetic`.
    """
    t0 = time.perf_counter()
    cfg = setup(train_x, train_y, test_x, test_y, preset, net, num_nets, device, epochs, eval_every)
    p: EvalPreset = cfg["preset"]
    dev: torch.device = cfg["device"]
    size: int = cfg["size"]
    channels = int(cfg["tx"].shape[1])
    cpu = torch.device("cpu")
    mean_c, std_c = _norm_stats(p, channels, cpu)
    x = _resize(cfg["tx"].to(cpu, torch.float32), size)
    if p.augment != "idc":
        x = (x - mean_c) / std_c
    y = cfg["ty"].to(cpu)
    vx = (_resize(cfg["vx"].to(cpu, torch.float32), size) - mean_c) / std_c
    test_ds = torch.utils.data.TensorDataset(vx, cfg["vy"].to(cpu))

    def data(s: int, gen: torch.Generator):
        cpu_gen = torch.Generator().manual_seed(s)
        ds = _PerImageDataset(x, y, p, mean_c, std_c, cpu_gen)
        loader = torch.utils.data.DataLoader(ds, batch_size=p.batch_size, shuffle=True, num_workers=0,
                                             generator=cpu_gen)

        def batches():
            for xb, yb in loader:
                xb, yb = xb.to(dev), yb.to(dev)
                if p.augment == "dsa":
                    xb = dsa_augment(xb, gen, p.dsa_strategy)
                yield xb, yb

        def test_fn(m: nn.Module) -> float:
            tl = torch.utils.data.DataLoader(test_ds, batch_size=test_batch_size, shuffle=False, num_workers=0)
            return test_accuracy(m, ((a.to(dev), b.to(dev)) for a, b in tl), len(test_ds))

        return batches, test_fn

    return run_nets(cfg, net, num_nets, seed, data, progress, progress_every_s, on_epoch, "dataloader", t0)
