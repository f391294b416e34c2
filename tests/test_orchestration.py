"""Ray pipeline and MLflow tracking on a real local Ray (one session for the module) and a real sqlite store."""

from __future__ import annotations

import os

import psutil
import torch

from raydistill.config import DistillConfig
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist


def _tiny_cfg(tiny_model, out, **kw) -> DistillConfig:
    dit, vae = tiny_model
    base = dict(model=str(dit), vae=str(vae), classes=("0", "1", "2"), ipc=3, steps=6, batch_size=2,
                out=None if out is None else str(out), eval_epochs=2, num_evals=1, baselines=("random",))
    base.update(kw)
    return DistillConfig(**base)


def test_ray_pipeline_two_actors_matches_in_process(ray_local, tiny_model, tmp_path):
    from raydistill.distill import distill_local
    from raydistill.orchestration.pipeline import distill_ray
    from raydistill.outputs import verify_set

    local = distill_local(_tiny_cfg(tiny_model, tmp_path / "local"))
    res = distill_ray(_tiny_cfg(tiny_model, tmp_path / "ray"), pool_size=2, shard_size=2, cpus_per_actor=0.5,
                      threads_per_actor=1)
    assert res.shards_run == 6  # 3 classes x ceil(3 / 2)
    per_class = {}
    for row in res.rows:
        per_class.setdefault(row["class_name"], []).append(row["index"])
    assert {k: sorted(v) for k, v in per_class.items()} == {c: [0, 1, 2] for c in ("t-shirt_top", "trouser",
                                                                                    "pullover")}
    assert verify_set(tmp_path / "ray") == []
    for row in local.rows:
        assert (tmp_path / "ray" / row["path"]).read_bytes() == (tmp_path / "local" / row["path"]).read_bytes()
    again = distill_ray(_tiny_cfg(tiny_model, tmp_path / "ray"), pool_size=2, shard_size=2)
    assert again.shards_run == 0 and again.shards_skipped == 6


def test_main_job_tracks_params_metrics_artifacts_in_mlflow(ray_local, tiny_model, tmp_path):
    import mlflow

    from raydistill.orchestration.distill_job import format_table, run_main_job

    cfg = _tiny_cfg(tiny_model, None, ipc=2, classes=("0", "1"), cfg_interval=(80, 580))  # travels to the actors
    logs: list[str] = []
    reports = run_main_job(cfg, root=tmp_path, log=logs.append)
    assert [r.method for r in reports] == ["dit", "random"]
    # no --pool-size: one 1-thread sampler per CPU of the 2-CPU cluster, at most one per shard (2 classes)
    assert any("sampling 2 images per class" in m and "(2 sampler actor(s))" in m for m in logs), logs
    table = format_table(reports, "dc")
    assert "dit" in table and "random" in table and "+-" in table
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["raydistill"])
    assert len(runs) == 2
    by_method = {r["tags.method"]: r for _, r in runs.iterrows()}
    dit = by_method["dit"]
    assert dit["params.ipc"] == "2" and dit["params.method"] == "dit" and dit["params.eval_preset"] == "dc"
    assert dit["params.cfg_interval"] == "80,580" and by_method["random"]["params.cfg_interval"] == "80,580"
    assert 0.0 <= dit["metrics.acc_dc_convnet_mean"] <= 100.0
    assert dit["metrics.images_per_s"] > 0
    assert 0.0 <= dit["metrics.mode_coverage"] <= 1.0 and dit["metrics.mode_distance"] > 0
    assert reports[0].coverage["mode_coverage"] == dit["metrics.mode_coverage"]
    # generator metrics against the two classes' test images, next to a same-size real subset's
    assert dit["metrics.gen_n_generated"] == dit["metrics.gen_floor_n_generated"] == 4
    assert dit["metrics.gen_n_reference"] == 2000 and dit["metrics.gen_fid"] >= 0.0
    assert 0.0 <= dit["metrics.gen_recall"] <= 1.0 and 0.0 <= dit["metrics.gen_floor_precision"] <= 1.0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(dit["run_id"])}
    assert {"grid.png", "manifest.parquet", "metrics.json"} <= artifacts


def test_auto_pool_size_is_one_actor_per_gpu_else_per_cpu_at_most_one_per_shard():
    from raydistill.orchestration.distill_job import auto_pool_size

    assert auto_pool_size(cpus=2, gpus=0, n_shards=10) == 2
    assert auto_pool_size(cpus=64, gpus=8, n_shards=100) == 8
    assert auto_pool_size(cpus=16, gpus=0, n_shards=3) == 3
    assert auto_pool_size(cpus=0.5, gpus=0, n_shards=10) == 1


def test_local_ray_listens_on_loopback_only(ray_local):
    ray_procs = [p for p in psutil.process_iter(["cmdline"])
                 if any(k in " ".join(p.info["cmdline"] or []) for k in ("gcs_server", "raylet", "ray::",
                                                                          "dashboard", "runtime_env_agent"))]
    assert ray_procs, "no Ray processes found"
    listening = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in {p.pid for p in ray_procs}:
            listening.append(conn.laddr.ip)
    assert listening, "Ray opened no listening sockets?"
    assert set(listening) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening


def test_local_ray_workers_run_at_the_drivers_priority(ray_local):
    """Ray's default worker niceness (15) starves the job's own work beside any ordinary process; the local Ray that
    raydistill starts runs its workers at niceness 0 (the driver's, here)."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0) == 0


def test_surrogate_job_trains_and_selects_as_a_ray_task(ray_local, tmp_path):
    """`raydistill surrogate` on Ray: trajectory of epochs 0..2 written, selection run, resumable (nothing redone)."""
    import json

    from raydistill.methods.igd.surrogate import SurrogateConfig
    from raydistill.orchestration.surrogate_job import run_surrogate_job

    cfg = SurrogateConfig(epochs=2, images_per_epoch=256)
    data = {"name": "digits"}
    sel = run_surrogate_job(data, str(tmp_path / "traj"), cfg, grad_ipc=20, log=lambda m: None)
    assert sel["selected"][0] == 0 and len(sel["similarity_to_previous_epoch"]) == 2
    meta = json.loads((tmp_path / "traj" / "trajectory.json").read_text())
    assert meta["epochs_done"] == 2 and len(meta["log"]) == 2
    assert sorted(p.name for p in (tmp_path / "traj").glob("epoch_*")) == [f"epoch_00{e}.safetensors" for e in range(3)]
    mtime = (tmp_path / "traj" / "epoch_002.safetensors").stat().st_mtime_ns
    run_surrogate_job(data, str(tmp_path / "traj"), cfg, select=False, log=lambda m: None)  # rerun: resumes, no work
    assert (tmp_path / "traj" / "epoch_002.safetensors").stat().st_mtime_ns == mtime


def test_mode_discovery_ray_tasks_fill_the_cache_the_sampler_reads(ray_local, tiny_model, tmp_path):
    """One Ray task per class writes the modes; the in-process MGD3 term then computes nothing."""
    from raydistill.distill import open_dataset
    from raydistill.generator import load_generator
    from raydistill.methods.mgd3.guidance import class_modes_loader
    from raydistill.orchestration.modes_job import discover_modes_ray

    cfg = _tiny_cfg(tiny_model, tmp_path / "mgd3" / "set", method="mgd3", classes=("0", "1"), ipc=2,
                    extra={"t_stop": 2})  # within the 6 steps
    discover_modes_ray(cfg, log=lambda m: None)
    files = sorted((tmp_path / "mgd3" / ".modes").glob("modes-*.safetensors"))
    assert len(files) == 2
    ds = open_dataset(cfg)
    gen = load_generator(cfg, ds.dit_labels, ds.image_size, "cpu")
    load = class_modes_loader(cfg, ds, gen.codec, [0, 1])
    stamps = [f.stat().st_mtime_ns for f in files]
    modes = [load(c) for c in (0, 1)]
    assert all(m.shape == (2, 4, 8, 8) for m in modes) and not torch.equal(modes[0], modes[1])
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read from the cache, not recomputed
