"""benchmarks/ablations.py: each row is a quality.py command, measured rows are not run again, tables show deltas."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import load_benchmark

abl = load_benchmark("ablations")


def _run(last: float) -> dict:
    return {"last": last, "best": last + 1.0, "report": "last", "seconds": 1.0, "epochs": 300}


def test_rows_are_quality_commands_with_their_variant(tmp_path: Path) -> None:
    rows = dict(abl.tables())["igd-terms"][1]
    cmd = abl.command(rows[1], 10, "dc", 5, tmp_path / "q.json", 1)
    assert cmd[2:] == ["--methods", "igd", "--ipc", "10", "--preset", "dc", "--nets", "5", "--cfg-scale", "4",
                       "--results", str(tmp_path / "q.json"), "--tag=-gamma0", "--set", "igd_gamma=0.0",
                       "--threads", "1"]
    import yaml

    shipped = yaml.safe_load(abl.DEFAULT_BEST.read_text())  # the default job's preset (tuned MGD3 since 2026-12-07)
    best = [r for r in dict(abl.tables())["cfg"][1] if r.tag == "-best-cfg2"][0]
    assert (best.method, best.cfg_scale, best.extra) == (shipped["method"], 2.0, shipped.get("extra", {}))
    assert "--cfg-scale" in (c := abl.command(best, 10, "dc", 3, tmp_path / "q.json", None, "runs/m3")) and \
        c[c.index("--cfg-scale") + 1] == "2" and c[c.index("--root") + 1] == "runs/m3"
    assert [f"{k}={v}" for k, v in sorted(best.extra.items())] == [c[i + 1] for i, x in enumerate(c) if x == "--set"]
    # a preset with the method's defaults at CFG 4 is the method's main-table cell: read from there, not run again
    plain = tmp_path / "plain.yaml"
    plain.write_text("method: mgd3\ncfg_scale: 4.0\n")
    assert [r.name for r in dict(abl.tables(plain))["cfg"][1] if r.method == "mgd3"] == \
        ["mgd3", "mgd3-best-cfg2", "mgd3-best-cfg1"]
    tuned = Path(abl.HERE.parent / "jobs" / "configs" / "fmnist-mgd3+igd-tuned.yaml")
    assert [r.tag for r in dict(abl.tables(tuned))["cfg"][1] if r.method == "mgd3+igd"] == \
        ["-best-cfg4", "-best-cfg2", "-best-cfg1"]  # a preset with its own parameters is a row of its own
    assert {r.name for r in dict(abl.tables())["mgd3-stop"][1]} == {"mgd3", "mgd3-nostop"}


def test_measured_rows_are_skipped_and_tables_show_the_difference(tmp_path: Path, capsys) -> None:
    key = "igd{}|ipc10|dc|convnet|epochsNone|set0|net{}"
    runs = {key.format("", i): _run(70.0 + i) for i in range(5)}  # the default cell, 5 nets
    runs |= {key.format("-gamma0", i): _run(68.0) for i in range(2)}  # a variant with 2 of 5 nets
    (tmp_path / "quality-main.json").write_text(json.dumps({"runs": runs}))
    abl.main(["--tables", "igd-terms", "--dry-run", "--results", str(tmp_path / "quality-ablations.json")])
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--tag=-gamma0" in commands[0] and "--tag=-k0" in commands[1]
    assert "| influence + deviation (default) | 4 | 5 | 72.00 +- 1.41 |  |" in out
    assert "| influence only (gamma 0) | 4 | 2 | 68.00 +- 0.00 | -4.00 |" in out
    assert "| deviation only (k 0) | 4 | 0 | not measured | |" in out
    assert not (tmp_path / "quality-ablations.json").exists()  # a dry run runs nothing
