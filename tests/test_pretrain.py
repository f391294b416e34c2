"""Pretraining job: reused stages, EMA snapshots for the curve, exact resume, state outside the work tree."""

from __future__ import annotations

import json

import torch

from raydistill.pretrain import PretrainConfig, Pretrainer, default_work
from tests.conftest import make_tiny_model, needs_fmnist

pytestmark = needs_fmnist


def _cfg(tmp_path, steps: int) -> PretrainConfig:
    from safetensors.torch import save_file

    from raydistill.models.evalnets import build_eval_net

    if not (tmp_path / "tiny" / "vae").exists():
        make_tiny_model(tmp_path / "tiny")
        net = build_eval_net("convnet3", 1, 10, 28)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "clf.safetensors"))
    return PretrainConfig(dit_size="test", dit_steps=steps, dit_batch=8, dit_warmup=2, ckpt_every=2,
                          snapshot_every=2, log_every=2, train_limit=20, vae_from=str(tmp_path / "tiny" / "vae"),
                          classifier_from=str(tmp_path / "clf.safetensors"))


def _run(tmp_path, work: str, steps: int) -> Pretrainer:
    p = Pretrainer(_cfg(tmp_path, steps), tmp_path / work, tmp_path / f"out-{work}", log=lambda s: None)
    p.run("raydistill pretrain (test)")
    return p


def test_reused_stages_snapshots_and_export(tmp_path):
    from raydistill.models.dit_convert import load_dit

    p = _run(tmp_path, "w", 4)
    snaps = sorted(x.name for x in (tmp_path / "w" / "snapshots").iterdir())
    assert snaps == ["step-000002", "step-000004"]
    last = load_dit(tmp_path / "w" / "snapshots" / "step-000004")
    shipped = load_dit(tmp_path / "out-w" / "dit")  # the export is the same EMA, in fp16
    for a, b in zip(last.state_dict().values(), shipped.state_dict().values()):
        assert torch.allclose(a, b.float(), atol=1e-2)
    info = json.loads((tmp_path / "out-w" / "pretrain.json").read_text())
    assert any("vae: reused" in line for line in info["log"])
    assert any("classifier: reused" in line for line in info["log"])
    vae_cfg = json.loads((tmp_path / "out-w" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == 1.0  # the reused VAE's own scale, not re-estimated
    assert len(p.x) == 200  # train_limit: 20 per class


def test_resume_continues_exactly_and_keeps_old_snapshots(tmp_path):
    _run(tmp_path, "once", 6)
    _run(tmp_path, "split", 4)
    first = (tmp_path / "split" / "snapshots" / "step-000002" / "diffusion_pytorch_model.safetensors").stat()
    p = _run(tmp_path, "split", 6)  # a raised target resumes at step 4
    assert any("dit: resumed at step 4" in line for line in p.lines)
    again = (tmp_path / "split" / "snapshots" / "step-000002" / "diffusion_pytorch_model.safetensors").stat()
    assert (first.st_ino, first.st_mtime_ns) == (again.st_ino, again.st_mtime_ns)
    once = torch.load(tmp_path / "once" / "state.pt", weights_only=True)["dit_ema"]
    split = torch.load(tmp_path / "split" / "state.pt", weights_only=True)["dit_ema"]
    assert all(torch.equal(once[k], split[k]) for k in once)


def test_default_work_is_outside_the_tree(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYDISTILL_PRETRAIN_HOME", str(tmp_path))
    assert default_work("S/2") == tmp_path / "S_2"
    monkeypatch.delenv("RAYDISTILL_PRETRAIN_HOME")
    assert ".cache" in default_work("fmnist").parts


def test_export_step_ships_the_chosen_snapshot_and_names_the_ones_there(tmp_path):
    import dataclasses

    import pytest

    from raydistill.errors import UserError
    from raydistill.models.dit_convert import load_dit

    _run(tmp_path, "w", 4)  # snapshots at steps 2 and 4, state at 4
    cfg = dataclasses.replace(_cfg(tmp_path, 4), export_step=2)
    (tmp_path / "out2" / "minimax").mkdir(parents=True)  # assets an export must leave alone
    (tmp_path / "out2" / "minimax" / "minimax.json").write_text("{}")
    (tmp_path / "out2" / "teacher.json").write_text("{}")
    (tmp_path / "out2" / "dit").mkdir()
    (tmp_path / "out2" / "dit" / "stale.bin").write_text("old")  # an exported folder is replaced whole
    (tmp_path / "out2.tmp").mkdir()
    (tmp_path / "out2.tmp" / "junk").write_text("a killed export")
    p = Pretrainer(cfg, tmp_path / "w", tmp_path / "out2", log=lambda s: None)
    p.run("raydistill pretrain --export-step 2 (test)")
    assert (tmp_path / "out2" / "minimax" / "minimax.json").exists() and (tmp_path / "out2" / "teacher.json").exists()
    assert not (tmp_path / "out2" / "dit" / "stale.bin").exists() and not (tmp_path / "out2.tmp").exists()
    assert sorted(x.name for x in (tmp_path / "out2").iterdir()) == sorted(
        ["classifier.safetensors", "dit", "minimax", "pretrain.json", "teacher.json", "vae"])
    chosen = load_dit(tmp_path / "w" / "snapshots" / "step-000002").state_dict()
    last = load_dit(tmp_path / "w" / "snapshots" / "step-000004").state_dict()
    shipped = load_dit(tmp_path / "out2" / "dit").state_dict()
    assert all(torch.equal(shipped[k], chosen[k].half().float()) for k in chosen)  # step 2's EMA, in fp16
    assert not all(torch.equal(shipped[k], last[k].half().float()) for k in last)
    for part in ("dit", "vae"):  # loaded from a folder, exported without naming it
        assert "_name_or_path" not in json.loads((tmp_path / "out2" / part / "config.json").read_text())
    assert any("exporting the EMA snapshot of step 2" in line
               for line in json.loads((tmp_path / "out2" / "pretrain.json").read_text())["log"])
    bad = dataclasses.replace(cfg, export_step=3)
    with pytest.raises(UserError, match=r"no DiT snapshot of step 3 .*\(have: 2, 4\)"):
        Pretrainer(bad, tmp_path / "w", tmp_path / "out3", log=lambda s: None).run("test")
    assert not (tmp_path / "out3").exists()


def test_vae_only_trains_a_configured_vae_exports_it_scored_and_resumes(tmp_path):
    import dataclasses

    from raydistill.models.vae import load_vae

    cfg = PretrainConfig(vae_steps=2, vae_batch=4, vae_blocks="8,8", vae_latent_channels=2, vae_only=True,
                         train_limit=5, ckpt_every=2, log_every=1)
    p = Pretrainer(cfg, tmp_path / "w", tmp_path / "never", log=lambda s: None)
    p.run("raydistill pretrain --vae-only (test)")
    vae_dir = tmp_path / "w" / "vae"
    conf = json.loads((vae_dir / "config.json").read_text())
    assert conf["block_out_channels"] == [8, 8] and conf["scaling_factor"] != 1.0  # 1/std of its latents
    scores = json.loads((vae_dir / "scores.json").read_text())
    codec = load_vae(vae_dir, image_size=28)
    from raydistill.data import load_dataset
    from raydistill.models.vae import psnr_db, reconstruct_images

    x, _ = load_dataset("fashion-mnist").load("test", limit=100)
    assert scores["vae_step"] == 2  # the PSNR is the exported VAE's own round trip of the first 100 per class
    assert abs(scores["psnr_db"] - psnr_db(x, reconstruct_images(codec, x))) < 0.05
    assert codec.encode(torch.zeros(1, 1, 28, 28)).shape == (1, 2, 16, 16)  # two blocks: x2; 2 channels
    assert not (tmp_path / "never").exists() and not (tmp_path / "w" / "snapshots").exists()  # no DiT stage
    p2 = Pretrainer(dataclasses.replace(cfg, vae_steps=4), tmp_path / "w", tmp_path / "never", log=lambda s: None)
    p2.run("raydistill pretrain --vae-only --vae-steps 4 (test)")
    assert any("vae: resumed at step 2" in line for line in p2.lines)
    assert sum("latents:" in line for line in p2.lines) == 2  # the VAE trained on: its latents encoded again
    assert json.loads((vae_dir / "scores.json").read_text())["vae_step"] == 4


def test_dit_init_warm_starts_from_a_snapshot_and_counts_on_from_its_step(tmp_path):
    import dataclasses
    import shutil

    import pytest

    from raydistill.errors import UserError
    from raydistill.models.dit_convert import load_dit

    _run(tmp_path, "w", 4)
    carried = tmp_path / "carried" / "step-000004"  # what survives a lost machine: a copy of one snapshot
    shutil.copytree(tmp_path / "w" / "snapshots" / "step-000004", carried)
    cfg = dataclasses.replace(_cfg(tmp_path, 4), dit_init=str(carried))
    p = Pretrainer(cfg, tmp_path / "w2", tmp_path / "out2", log=lambda s: None)
    p.run("raydistill pretrain --dit-init (test)")  # already at the target: the export is the snapshot itself
    snap = load_dit(carried).state_dict()
    shipped = load_dit(tmp_path / "out2" / "dit").state_dict()
    assert all(torch.equal(shipped[k], snap[k].half().float()) for k in snap)
    assert any("initialised from" in line and "at step 4" in line for line in p.lines)
    p = Pretrainer(dataclasses.replace(cfg, dit_steps=6), tmp_path / "w2", tmp_path / "out2", log=lambda s: None)
    p.run("raydistill pretrain --dit-init --dit-steps 6 (test)")
    assert sorted(x.name for x in (tmp_path / "w2" / "snapshots").iterdir()) == ["step-000006"]
    trained = load_dit(tmp_path / "w2" / "snapshots" / "step-000006").state_dict()
    assert not all(torch.equal(trained[k], snap[k]) for k in snap)  # it trained on from there
    state = torch.load(tmp_path / "w2" / "state.pt", weights_only=True)
    assert state["dit_step"] == 6 and state["dit_init_step"] == 4
    with pytest.raises(UserError, match="not a DiT snapshot folder"):
        Pretrainer(dataclasses.replace(cfg, dit_init=str(tmp_path / "carried")), tmp_path / "w3",
                   tmp_path / "out3", log=lambda s: None).run("test")


def test_the_recorded_command_is_the_one_given(tmp_path, monkeypatch):
    """`raydistill pretrain ARGS` records `raydistill pretrain ARGS` (it once doubled the subcommand's name)."""
    from raydistill.pretrain import main

    _cfg(tmp_path, 2)  # the tiny VAE and classifier
    argv = ["--dit-size", "test", "--dit-steps", "2", "--dit-batch", "8", "--dit-warmup", "2", "--train-limit", "20",
            "--vae-from", str(tmp_path / "tiny" / "vae"), "--classifier-from", str(tmp_path / "clf.safetensors"),
            "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", ["raydistill", "pretrain", *argv])  # as the CLI sees it
    main(argv)
    assert json.loads((tmp_path / "out" / "pretrain.json").read_text())["command"] == " ".join(
        ["raydistill", "pretrain", *argv])


def test_fp32_export_ships_the_snapshot_bit_for_bit_and_a_bad_dtype_is_one_line(tmp_path):
    import dataclasses

    import pytest

    from raydistill.errors import UserError
    from raydistill.models.dit_convert import load_dit
    from raydistill.pretrain import main

    _run(tmp_path, "w", 4)  # snapshots at steps 2 and 4
    cfg = dataclasses.replace(_cfg(tmp_path, 4), export_step=2, dit_export_dtype="fp32")
    Pretrainer(cfg, tmp_path / "w", tmp_path / "out", log=lambda s: None).run("test")
    chosen = load_dit(tmp_path / "w" / "snapshots" / "step-000002").state_dict()
    shipped = load_dit(tmp_path / "out" / "dit").state_dict()
    assert all(torch.equal(shipped[k], chosen[k]) for k in chosen)  # no fp16 rounding
    assert not all(torch.equal(chosen[k], chosen[k].half().float()) for k in chosen)  # which fp16 would have lost
    with pytest.raises(UserError, match="--dit-export-dtype must be one of fp16, fp32, got 'bf16'"):
        main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "out4"), "--dit-export-dtype", "bf16"])
    assert not (tmp_path / "out4").exists()
