"""The core (data, models, diffusion, guidance, evaluate, outputs, distill) works without Ray and MLflow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raydistill"
CORE_MODULES = ["raydistill.data", "raydistill.models.dit", "raydistill.models.dit_convert", "raydistill.models.vae",
                "raydistill.models.evalnets", "raydistill.diffusion.sampler", "raydistill.guidance.base",
                "raydistill.evaluate.train", "raydistill.outputs", "raydistill.distill", "raydistill.generator",
                "raydistill.config", "raydistill.pretrain", "raydistill.consistency", "raydistill.modes",
                "raydistill.guidance.mode"]


def test_core_imports_neither_ray_nor_mlflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE_MODULES) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_orchestration_mentions_ray_or_mlflow_imports():
    pattern = re.compile(r"^\s*(import|from)\s+(ray|mlflow)\b", re.M)
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if "orchestration" not in p.parts and pattern.search(p.read_text())]
    assert offenders == []
