"""benchmarks/gpu_check.py's smoke mode on the CPU: the same code path as on the GPU, tiny sizes, real JSON."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import load_benchmark


def test_smoke_mode_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    res = load_benchmark("gpu_check").main(["--smoke", "--sections", "dit,igd,eval", "--results", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res)) and data["smoke"] is True and data["device"].startswith("cpu")
    dit = data["dit"]
    assert dit["steps_per_image"] == 50 and dit["steps_timed"] == 2 and dit["extrapolated"] is True
    assert dit["tflop_per_image"] == 100 * dit["dit_gflops_per_forward"] / 1000
    for b in data["batch_sizes"]:
        for prec in ("fp32", "tf32", "bf16"):
            row = dit[f"b{b}_{prec}"]
            assert row["step_s"] > 0 and row["images_per_s"] < row["dit_images_per_s"]  # the decode costs time
        assert "skipped" in dit[f"b{b}_bf16_compiled"]
        igd = data["igd"][f"b{b}"]
        assert igd["guided_step_s"] > igd["plain_step_s"] > 0 and igd["igd_vs_plain"] > 1
    for prec in ("fp32", "tf32", "bf16"):
        assert data["eval"][f"{prec}_images_per_s"] > 0
    assert "share_of_bf16_ceiling" not in dit["b2_fp32"]  # no peak known for a CPU


def test_dit_xl2_flops_are_twice_the_papers_multiply_adds() -> None:
    gflops = load_benchmark("gpu_check").dit_forward_gflops
    assert abs(gflops("XL/2", 256) - 2 * 118.6) < 0.005 * 2 * 118.6  # DiT Table 4 counts multiply-adds
    assert gflops("XL/2", 512) > 4 * gflops("XL/2", 256)  # 4x the tokens, attention grows faster
