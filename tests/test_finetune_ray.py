"""Minimax fine-tune phases as parallel Ray tasks (issue 22, item 3), on a real local Ray (2 CPUs) and a real sqlite
MLflow store: two phases run at once (their own time windows overlap), give bit-identical weights to the in-process
sequence, log their curves per phase, and a rerun after a lost phase redoes only that phase."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from raydistill.methods.minimax.finetune import FinetuneConfig, finetune
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist

# 4 classes, at most 2 per model: phases [0, 1] and [2, 3]; 8 images per phase = 1 step per epoch
TWO_PHASES = dict(steps=12, ckpt_every=4, log_every=3, finetune_ipc=4, memory_size=4, ema_decay=0.9, max_classes=2,
                  phase_size=2)
DATA = {"name": "fashion-mnist", "root": None, "image_size": None, "nclass": None, "phase": 0,
        "allow_other_split": False}
FILES = ("ema.safetensors", "model.safetensors")


def _same_tensors(a, b) -> bool:
    a, b = load_file(a), load_file(b)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def one_thread():
    """torch at one thread (each 1-CPU task's count: bitwise equal BLAS reductions), restored afterwards: a
    thread count left behind changes the numerics of every later test in the process (test_igd_twin's 1e-5)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_phases_run_at_once_match_the_sequence_and_resume_per_phase(ray_local, tiny_model, fmnist, tmp_path,
                                                                     one_thread):
    import mlflow

    from raydistill.orchestration.finetune_job import run_finetune_job

    dit, vae = tiny_model
    cfg = FinetuneConfig(**TWO_PHASES)
    seq = finetune(fmnist, dit, vae, tmp_path / "seq", cfg, labels=[0, 1, 2, 3], device="cpu")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logs: list[str] = []
    index, reports = run_finetune_job(DATA, str(dit), str(vae), None, str(tmp_path / "par"), cfg, [0, 1, 2, 3],
                                      {"steps": "12"}, tracking_uri=uri, log=logs.append)
    assert index["complete"] and index["phases"] == seq["phases"] and len(reports) == 2
    assert any("2 phase(s) of 2" in m and "1 CPU(s)" in m for m in logs), logs
    # both tasks trained, in two processes, and each one's window (taken inside the task) overlaps the other's
    assert all(r["trained"] for r in reports) and reports[0]["pid"] != reports[1]["pid"]
    assert max(r["start"] for r in reports) < min(r["end"] for r in reports), reports
    for ph in ("phase-00", "phase-01"):
        for name in FILES:
            assert _same_tensors(tmp_path / "seq" / ph / name, tmp_path / "par" / ph / name), (ph, name)
    # MLflow: one run, each phase's curve under its prefix, stepped by training step
    client = mlflow.MlflowClient(uri)
    run_id = json.loads((tmp_path / "par" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for pre in ("phase00_", "phase01_"):
        hist = client.get_metric_history(run_id, pre + "loss")
        assert sorted(m.step for m in hist) == [3, 6, 9, 12] and all(m.value > 0 for m in hist)
        assert run.data.metrics[pre + "seconds"] > 0
    log0 = json.loads((tmp_path / "par" / "phase-00" / "finetune.json").read_text())["log"]
    curve = sorted(client.get_metric_history(run_id, "phase00_loss"), key=lambda m: m.step)
    assert all(abs(m.value - r["loss"]) < 1e-5 for m, r in zip(curve, log0))  # finetune.json rounds to 6 places

    # phase 1 is lost (its task killed before its commit: no ema.safetensors, no state) -> the rerun trains only it
    kept = {n: (tmp_path / "par" / "phase-00" / n).stat().st_mtime_ns for n in FILES}
    for n in ("ema.safetensors", "finetune.json", "state.pt"):
        (tmp_path / "par" / "phase-01" / n).unlink()
    index, reports = run_finetune_job(DATA, str(dit), str(vae), None, str(tmp_path / "par"), cfg, [0, 1, 2, 3],
                                      {"steps": "12"}, tracking_uri=uri, log=logs.append)
    assert [r["trained"] for r in reports] == [False, True] and index["complete"]
    assert {n: (tmp_path / "par" / "phase-00" / n).stat().st_mtime_ns for n in FILES} == kept
    for name in FILES:
        assert _same_tensors(tmp_path / "seq" / "phase-01" / name, tmp_path / "par" / "phase-01" / name), name
    assert json.loads((tmp_path / "par" / "mlflow_run.json").read_text())["run_id"] == run_id  # same run continued
