"""The core (everything but ``raydistill.orchestration``) works without Ray and MLflow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raydistill"


def core_modules() -> list[str]:
    """Every module of the package outside ``orchestration/``, derived from the files (none listed by hand)."""
    mods = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        if "orchestration" in rel.parts or rel.name == "__main__":
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods.append(".".join(parts))
    return mods


def test_core_module_list_is_complete():
    mods = core_modules()
    assert {"raydistill.distill", "raydistill.methods.igd.guidance", "raydistill.methods.mgd3.modes",
            "raydistill.methods.minimax.router", "raydistill.preflight", "raydistill.evaluate.coverage",
            "raydistill.cli"} <= set(mods)
    assert not any("orchestration" in m for m in mods)


def test_core_imports_neither_ray_nor_mlflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core_modules()) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_orchestration_mentions_ray_or_mlflow_imports():
    pattern = re.compile(r"^\s*(import|from)\s+(ray|mlflow)\b", re.M)
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if "orchestration" not in p.parts and pattern.search(p.read_text())]
    assert offenders == []
