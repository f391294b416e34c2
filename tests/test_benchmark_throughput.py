"""benchmarks/throughput.py's GPU section: its FLOP count and its code path (on tiny CPU stand-ins, as
``--gpu-smoke`` runs it), so the section works the first time a GPU is lent."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def throughput():
    return load_benchmark("throughput")


def test_dit_xl2_flops_are_twice_the_papers_multiply_adds(throughput) -> None:
    gflops = throughput.dit_forward_gflops("XL/2", 256)  # meta device: no memory, no compute
    assert gflops == pytest.approx(2 * 118.6, rel=0.005)  # DiT Table 4 counts multiply-adds
    assert throughput.dit_forward_gflops("XL/2", 512) > 4 * gflops  # 4x the tokens, attention grows faster


def test_gpu_section_runs_plain_and_guided_sampling_on_stand_ins(throughput) -> None:
    res = throughput.gpu_section([1], smoke=True)
    assert res["device"] == "cpu (smoke)" and res["dit_gflops_per_forward"] > 0
    assert res["plain_b1_images_per_s"] > 0 and res["igd_fast_b1_images_per_s"] > 0
    assert res["igd_vs_plain_b1"] > 1.0  # guidance adds a surrogate backward per step
    expected = res["plain_b1_images_per_s"] * 50 * 2 * res["dit_gflops_per_forward"] / 1000
    assert res["plain_b1_dit_tflops"] == pytest.approx(expected)
    if not torch.cuda.is_available():
        assert throughput.gpu_section([1]) == {"skipped": "no GPU"}
