"""Behaviour pin: the bytes every method writes for one small configuration (tiny random DiT + VAE, scikit-learn
digits, classes 0 and 1, IPC 2, 4 sampling steps). The hashes were taken before the methods moved into
``raydistill.methods``; a refactor that changes a single pixel of any method fails here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from raydistill.config import DistillConfig
from raydistill.distill import distill_local
from raydistill.outputs import read_manifest
from tests.conftest import make_fake_trajectory

IGD = {"igd_epochs": [0, 2], "igd_window": [1, 2], "igd_scale": 5.0, "igd_gamma": 3.0, "igd_grad_ipc": 10}
MGD3 = {"mode_scale": 0.5, "t_stop": 1}
EXPECTED = {  # taken on the code before the move (commit 27d0dc5)
    "random": "388e4b50285c5333c52c30c7980d5b5f072389a6b4b66d70fb41c56c834cfc28",
    "herding": "976731297e7670bade764f7583dd99cc91822aa24a4918c27d9708aa5cd3316e",
    "dit": "678c1337d209a9c13852f9078b85d64ba8db6396ac5b4f6a6c8a7e6bbf28ad63",
    "mgd3": "6bacb22e81bf52e06ea6cdd828a8324b946226fec277907893c443a4dc1f6271",
    "igd": "9dbd4a6df2a1d0a13186e181514adeab886dbcb3f4d29b956f48909be3435bdb",
    "mgd3+igd": "8c3ca8b9bd07b6a19ab4b623162bc36c5e5b1689f1eb6787db015e04f4101788",
    "minimax": "193bb08dc789902960732737a21fa6a81fc724397c0d3b647a6102b97729ec8d",
    "minimax-igd": "0c4afbdcabdb3f9d397cbdadff038ca57efdfe2937c184052b2597405bacd1c8",
    "minimax+mgd3": "7ddbabc96254dd0797bf3ed1844f115565b212f3648222ae974c0d249bb2060d",
    "recon": "391ffc079695d63e238a021cc7dc821921346d313d047d72571124b9ee1bf441",  # taken when it was added
}


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory) -> dict:
    """The shared inputs: the tiny model, a fake surrogate on digits and a 2-step Minimax fine-tune of the model."""
    from raydistill.data import load_dataset
    from raydistill.methods.minimax.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("hashes")
    ds = load_dataset("digits")
    traj = make_fake_trajectory(root / "traj", ds)
    dit, vae = tiny_model
    finetune(ds, dit, vae, root / "ft", FinetuneConfig(steps=2, finetune_ipc=4, memory_size=4, ema_decay=0.9,
                                                       ckpt_every=2, log_every=1), labels=[0, 1], device="cpu")
    return {"root": root, "dit": str(dit), "vae": str(vae), "surrogate": str(traj.path), "finetune": str(root / "ft")}


def _extra(method: str, s: dict) -> dict:
    parts = set(method.replace("-", "+").split("+"))
    extra: dict = {}
    if "igd" in parts:
        extra.update(IGD, surrogate=s["surrogate"])
    if "mgd3" in parts:
        extra.update(MGD3)
    if "minimax" in parts:
        extra["finetune"] = s["finetune"]
    if method == "herding":
        extra["herding_pool"] = 40
    return extra


def set_digest(out: Path) -> str:
    """sha256 over the set's PNG files in manifest order (class, index), names included."""
    h = hashlib.sha256()
    for r in sorted(read_manifest(out), key=lambda r: (r["label"], r["index"])):
        h.update(r["path"].encode() + b"\0" + (out / r["path"]).read_bytes())
    return h.hexdigest()


METHODS = ["random", "herding", "recon", "dit", "mgd3", "igd", "mgd3+igd", "minimax", "minimax-igd", "minimax+mgd3"]


@pytest.mark.parametrize("method", METHODS)
def test_method_bytes_are_pinned(method: str, setup: dict) -> None:
    out = setup["root"] / method
    cfg = DistillConfig(dataset="digits", classes=("0", "1"), ipc=2, steps=4, seed=3, method=method,
                        model=setup["dit"], vae=setup["vae"], out=str(out), extra=_extra(method, setup))
    distill_local(cfg, device="cpu")
    assert set_digest(out) == EXPECTED[method]
