"""The ablations users of these methods ask for (issue 20 item 3), one table each, at one IPC and preset.

Each row is one ``benchmarks/quality.py`` run (a method, its ``--set`` parameters, a CFG scale and a tag that names
the variant), so every figure can be remade by the command this script prints; results go to one
``quality-ablations.json`` and rows already measured in any ``quality*.json`` beside it are not run again (the
default rows are the main tables' cells).

    python benchmarks/ablations.py --ipc 10 --nets 5 --threads 1                 # every table
    python benchmarks/ablations.py --tables igd-terms,cfg --dry-run              # the commands only
    python benchmarks/ablations.py --table-only                                  # the tables from the results

``--best YAML`` names the best method's preset for the CFG table (default: ``raydistill/presets/fmnist-default.yaml``,
the best measured preset on the shipped model). A best-method row with the preset's own parameters at CFG 4 is the
method's main-table cell, so it is read from there instead of being run again. ``--root`` is where the sets go
(``benchmarks/quality.py --root``).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BEST = HERE.parent / "raydistill" / "presets" / "fmnist-default.yaml"
DEFAULT_CFG = 4.0  # benchmarks/quality.py's --cfg-scale default: the CFG of the main tables' cells


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    extra: dict = field(default_factory=dict)
    cfg_scale: float = 4.0
    tag: str = ""  # the variant's suffix of the set folder and result keys ("" = the method's default cell)

    @property
    def name(self) -> str:
        return self.method + self.tag


def best_rows(best: Path) -> tuple[str, dict, float]:
    """(method, extra, CFG scale) of a preset YAML such as ``jobs/configs/fmnist-mgd3+igd-tuned.yaml``."""
    import yaml

    data = yaml.safe_load(best.read_text()) or {}
    return str(data["method"]), dict(data.get("extra") or {}), float(data.get("cfg_scale", 4.0))


def tables(best: Path = DEFAULT_BEST) -> dict[str, tuple[str, list[Row]]]:
    """Every ablation table: name -> (title, rows); the first row is the reference of the deltas."""
    method, extra, _ = best_rows(best)
    return {
        "igd-terms": ("IGD: influence and deviation guidance", [
            Row("influence + deviation (default)", "igd"),
            Row("influence only (gamma 0)", "igd", {"igd_gamma": 0.0}, tag="-gamma0"),
            Row("deviation only (k 0)", "igd", {"igd_scale": 0.0}, tag="-k0")]),
        "mgd3-stop": ("MGD3: stop guidance", [
            Row("guidance stops after t_stop 25 (default)", "mgd3"),
            Row("no stop (every step, t_stop -1)", "mgd3", {"t_stop": -1}, tag="-nostop")]),
        "mgd3-modes": ("MGD3: mode discovery", [
            Row("k-means (default)", "mgd3"),
            Row("diagonal GMM", "mgd3", {"mode_method": "gmm"}, tag="-gmm")]),
        "cfg": ("CFG scale: plain DiT and the best method", [
            Row("dit, CFG 4 (default)", "dit"),
            Row("dit, CFG 2", "dit", cfg_scale=2.0, tag="-cfg2.0"),
            Row("dit, CFG 1", "dit", cfg_scale=1.0, tag="-cfg1.0"),
            *[Row(f"{method} ({best.stem}), CFG {c:g}", method, extra, c,
                  tag="" if not extra and c == DEFAULT_CFG else f"-best-cfg{c:g}")  # "" = the main cell
              for c in (4.0, 2.0, 1.0)]]),
    }


def command(row: Row, ipc: int, preset: str, nets: int, results: Path, threads: int | None,
            root: str | None = None) -> list[str]:
    """The ``benchmarks/quality.py`` command line of one row."""
    cmd = [sys.executable, str(HERE / "quality.py"), "--methods", row.method, "--ipc", str(ipc), "--preset", preset,
           "--nets", str(nets), "--cfg-scale", f"{row.cfg_scale:g}", "--results", str(results)]
    if root:
        cmd += ["--root", root]
    if row.tag:
        cmd.append(f"--tag={row.tag}")
    for k, v in sorted(row.extra.items()):
        cmd += ["--set", f"{k}={v}"]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def accuracies(results: dict, row: Row, ipc: int, preset: str) -> list[float]:
    """The reported accuracies of a row's nets (default ``dc``-style keys of benchmarks/quality.py)."""
    prefix = f"{row.name}|ipc{ipc}|{preset}|convnet|epochsNone|set0|"
    return [r["last"] if r["report"] == "last" else r["best"] for k, r in sorted(results["runs"].items())
            if k.startswith(prefix)]


def format_table(title: str, rows: list[Row], results: dict, ipc: int, preset: str) -> str:
    """A markdown table: variant, nets, mean +- std, and the difference to the first row."""
    lines = [f"**{title}** (IPC {ipc}, `{preset}`)", "", "| variant | CFG | nets | accuracy (%) | vs first row |",
             "|---|---|---|---|---|"]
    first = accuracies(results, rows[0], ipc, preset)
    ref = statistics.mean(first) if first else None
    for i, row in enumerate(rows):
        accs = accuracies(results, row, ipc, preset)
        if not accs:
            lines.append(f"| {row.label} | {row.cfg_scale:g} | 0 | not measured | |")
            continue
        mean = statistics.mean(accs)
        sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        delta = "" if ref is None or i == 0 else f"{mean - ref:+.2f}"
        lines.append(f"| {row.label} | {row.cfg_scale:g} | {len(accs)} | {mean:.2f} +- {sd:.2f} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(HERE))
    from quality import merged_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", default="all", help="comma-separated table names, or all")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--preset", default="dc")
    ap.add_argument("--nets", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--root", default=None, help="where the sets go (benchmarks/quality.py --root)")
    ap.add_argument("--best", type=Path, default=DEFAULT_BEST, help="the best method's preset YAML (CFG table)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "quality-ablations.json")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args(argv)
    every = tables(a.best)
    names = list(every) if a.tables == "all" else a.tables.split(",")
    unknown = [n for n in names if n not in every]
    if unknown:
        sys.exit(f"ablations: unknown table {unknown[0]!r}; use one of {', '.join(every)}")
    for name in names:
        for row in every[name][1]:
            have = len(accuracies(merged_results(a.results.parent, also=a.results), row, a.ipc, a.preset))
            if a.table_only or have >= a.nets:
                continue
            cmd = command(row, a.ipc, a.preset, a.nets, a.results, a.threads, a.root)
            print("$ python " + shlex.join([str(Path(cmd[1]).relative_to(HERE.parent)), *cmd[2:]]), flush=True)
            if not a.dry_run:
                subprocess.run(cmd, check=True)
    merged = merged_results(a.results.parent, also=a.results)
    for name in names:
        print("\n" + format_table(*every[name], merged, a.ipc, a.preset))


if __name__ == "__main__":
    main()
