"""benchmarks/quality.py's bookkeeping: result files from parallel runs merge, nets group per set, the table prints
mean +- std per set and the plot draws one panel per (IPC, preset)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def _run(last: float) -> dict:
    return {"last": last, "best": last + 1.0, "report": "last", "seconds": 1.0, "epochs": 300}


def _write(folder: Path) -> None:
    """Two files as two parallel processes write them: nets 0-1 of a set in one, net 2 of it in the other."""
    a = {"runs": {"dit|ipc10|dc|convnet|epochsNone|set0|net0": _run(70.0),
                  "dit|ipc10|dc|convnet|epochsNone|set0|net1": _run(72.0),
                  "random|ipc1|dc|convnet|epochsNone|set0|net0": _run(45.0),
                  "random|ipc10|dsa|convnet|epochsNone|set0|net0": _run(74.0)},
         "coverage": {"dit|ipc10|set0": {"mode_coverage": 0.11, "mode_distance": 1.82, "gen_fid": 12.34,
                                         "gen_floor_fid": 2.38, "gen_precision": 0.97, "gen_recall": 0.58}}}
    b = {"runs": {"dit|ipc10|dc|convnet|epochsNone|set0|net2": _run(74.0)}, "coverage": {}}
    (folder / "quality.json").write_text(json.dumps(a))
    (folder / "quality-b.json").write_text(json.dumps(b))
    (folder / "throughput.json").write_text(json.dumps({"runs": {"x|ipc1|dc|convnet|epochsNone|set0|net0": 1}}))


def test_parallel_result_files_merge_and_group_per_set(quality, tmp_path: Path, capsys) -> None:
    _write(tmp_path)
    merged = quality.merged_results(tmp_path)
    assert len(merged["runs"]) == 5  # quality*.json only: throughput.json is not a quality result
    groups = quality._groups(merged)
    assert sorted(groups["dit|ipc10|dc|convnet|epochsNone|set0"]) == [70.0, 72.0, 74.0]
    quality.print_table(merged)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dit "))
    assert f"{statistics.mean([70, 72, 74]):6.2f} +- {statistics.pstdev([70, 72, 74]):4.2f}" in row
    assert "0.11" in row and row.split()[4] == "3"  # coverage joined, 3 nets
    assert row.split()[10:14] == ["12.34", "2.38", "0.97", "0.58"]  # the set's FID, its real floor, precision, recall


def test_plot_draws_one_panel_per_setting(quality, tmp_path: Path) -> None:
    _write(tmp_path)
    out = tmp_path / "quality.png"
    quality.plot(quality.merged_results(tmp_path), str(out))
    with Image.open(out) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert width == round(6.5 * 2 * 110)  # three settings -> two columns of panels
    assert height > 0.8 * 110


def test_results_file_of_any_name_is_in_the_table_and_shortened_runs_are_labelled(quality, tmp_path: Path,
                                                                                  capsys) -> None:
    _write(tmp_path)
    mine = tmp_path / "mine.json"  # --results need not match quality*.json
    mine.write_text(json.dumps({"runs": {"herding|ipc10|dc|convnet|epochs40|set0|net0": _run(60.0)}}))
    assert len(quality.merged_results(tmp_path)["runs"]) == 5
    merged = quality.merged_results(tmp_path, also=mine)
    assert len(merged["runs"]) == 6
    quality.print_table(merged)
    out = capsys.readouterr().out.splitlines()
    assert next(line for line in out if line.startswith("herding ")).split()[2] == "dc:40ep"
    assert next(line for line in out if line.startswith("dit ")).split()[2] == "dc"



def test_rename_results_carries_a_tagged_candidate_without_overwriting(tmp_path, monkeypatch):
    """benchmarks/rename_results.py: a candidate's tagged keys land under the built-in names; a net measured again
    in the target keeps its figure; a key without the tag stops the carry with one line and writes nothing."""
    import sys

    rename = load_benchmark("rename_results")
    src, dst = tmp_path / "src.json", tmp_path / "dst.json"
    src.write_text(json.dumps({"runs": {"mgd3-cool|ipc10|dc|convnet|epochsNone|set0|net0": _run(77.65),
                                        "mgd3-cool|ipc10|dc|convnet|epochsNone|set0|net1": _run(77.36)},
                               "coverage": {"mgd3-cool|ipc10|set0": {"mode_coverage": 0.6}}, "machine": "x"}))
    dst.write_text(json.dumps({"runs": {"mgd3|ipc10|dc|convnet|epochsNone|set0|net0": _run(77.0)}}))
    monkeypatch.setattr(sys, "argv", ["rename_results.py", str(src), str(dst), "--tag-from=-cool"])
    rename.main()
    out = json.loads(dst.read_text())
    assert out["runs"]["mgd3|ipc10|dc|convnet|epochsNone|set0|net0"]["last"] == 77.0  # measured again: kept
    assert out["runs"]["mgd3|ipc10|dc|convnet|epochsNone|set0|net1"]["last"] == 77.36  # carried
    assert out["coverage"] == {"mgd3|ipc10|set0": {"mode_coverage": 0.6}} and out["machine"] == "x"
    assert rename.rename({"runs": {"a-t|ipc1": 1}}, "-t", "-u") == {"runs": {"a-u|ipc1": 1}}
    before = dst.read_text()
    monkeypatch.setattr(sys, "argv", ["rename_results.py", str(src), str(dst), "--tag-from=-other"])
    with pytest.raises(SystemExit, match="does not carry the tag '-other'"):
        rename.main()
    assert dst.read_text() == before
