"""Multi-formation (IDC): the decode is IDC's, packing is its inverse up to the resolution, packed sets evaluate
decoded."""

from __future__ import annotations

import json
from math import ceil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydistill.config import DistillConfig
from raydistill.errors import UserError
from raydistill.formation import decode_zoom, formation_of, pack, pack_set
from tests.conftest import needs_fmnist


def _idc_decode_zoom(img, target, factor, size=-1):
    """IDC's ``decode_zoom`` as its ``common.py`` has it (the reference the implementation must match)."""
    if size == -1:
        size = img.shape[-1]
    resize = nn.Upsample(size=size, mode="bilinear")
    h = img.shape[-1]
    remained = h % factor
    if remained > 0:
        img = F.pad(img, pad=(0, factor - remained, 0, factor - remained), value=0.5)
    s_crop = ceil(h / factor)
    n_crop = factor ** 2
    cropped = []
    for i in range(factor):
        for j in range(factor):
            h_loc = i * s_crop
            w_loc = j * s_crop
            cropped.append(img[:, :, h_loc:h_loc + s_crop, w_loc:w_loc + s_crop])
    cropped = torch.cat(cropped)
    data_dec = resize(cropped)
    target_dec = torch.cat([target for _ in range(n_crop)])
    return data_dec, target_dec


@pytest.mark.parametrize("shape, factor", [((5, 1, 28, 28), 2), ((3, 3, 32, 32), 4), ((2, 3, 224, 224), 2)])
def test_decode_zoom_is_idcs(shape, factor):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(shape, generator=g), torch.arange(shape[0])
    got, want = decode_zoom(x, y, factor), _idc_decode_zoom(x, y, factor)
    assert got[0].shape == (shape[0] * factor ** 2, *shape[1:])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert decode_zoom(x, y, 1)[0] is x  # factor 1: the set as stored


def test_decode_of_pack_is_each_image_at_a_lower_resolution_in_idcs_order():
    x = torch.randint(0, 256, (8, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack(x, 2)
    assert packed.shape == (2, 1, 28, 28) and packed.dtype == torch.uint8
    decoded, labels = decode_zoom(packed.float(), torch.tensor([7, 9]), 2)
    small = F.interpolate(x.float(), size=(14, 14), mode="area").round()
    expected = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    order = [g * 4 + p for p in range(4) for g in range(2)]  # crop-major: every image's crop 0, then crop 1, ...
    assert torch.allclose(decoded, expected[order], atol=1e-4)
    assert labels.tolist() == [7, 9] * 4
    assert torch.equal(packed[1, :, :14, 14:], small[5].to(torch.uint8))  # image 5 = group 1, row 0, column 1


def test_bad_factors_are_one_line():
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(UserError, match="factor 3 does not divide the image size 28"):
        pack(torch.zeros(9, 1, 28, 28, dtype=torch.uint8), 3)
    with pytest.raises(UserError, match="3 images do not fill whole groups of 4"):
        pack(x[:3], 2)
    with pytest.raises(UserError, match="positive integer"):
        decode_zoom(x.float(), torch.zeros(4), 0)


@needs_fmnist
def test_pack_set_writes_a_set_that_evaluates_decoded(tmp_path, capsys):
    from raydistill.cli import main
    from raydistill.data import load_dataset
    from raydistill.distill import distill_local, evaluate_images, load_distilled
    from raydistill.evaluate.train import evaluate_synthetic
    from raydistill.outputs import read_manifest, verify_set

    src, out = tmp_path / "src", tmp_path / "packed"
    made = distill_local(DistillConfig(method="random", ipc=8, classes=("0", "1"), out=str(src)))
    rows = pack_set(src, out, 2)
    assert [(r["label"], r["index"], r["seed"]) for r in rows] == [(c, g, 4 * g) for c in (0, 1) for g in (0, 1)]
    assert verify_set(out) == [] and formation_of(out) == 2 and formation_of(src) == 1
    assert json.loads((out / "run.json").read_text())["settings"]["packed_from_fingerprint"] == \
        json.loads((src / "run.json").read_text())["fingerprint"]
    ds = load_dataset("fashion-mnist")
    x_src, _ = load_distilled(src, ds, [0, 1])
    x_packed, y_packed = load_distilled(out, ds, [0, 1])
    by_index = {(r["label"], r["index"]): r["seed"] for r in made.rows}  # real training positions
    real = ds.read("train", [by_index[(c, k)] for c in (0, 1) for k in range(8)])
    assert torch.equal(x_packed, pack(real, 2)) and x_src.shape == (16, 1, 28, 28)
    before = (out / "manifest.parquet").stat().st_mtime_ns
    assert pack_set(src, out, 2) == read_manifest(out) and (out / "manifest.parquet").stat().st_mtime_ns == before

    # evaluation trains on the decoded parts: the same net as training on decode_zoom's images directly
    r = evaluate_images(x_packed, y_packed, ds, "dc", "convnet", 1, epochs=2, formation=2)
    test_x = torch.cat([ds.load("test", label=c)[0] for c in (0, 1)]).float() / 255
    test_y = torch.cat([torch.full((len(ds.load("test", label=c)[0]),), c) for c in (0, 1)])
    dx, dy = decode_zoom(x_packed.float() / 255, y_packed, 2)
    direct = evaluate_synthetic(dx, dy, test_x, test_y, preset="dc", net="convnet", num_nets=1, seed=0, epochs=2,
                                device="cpu")
    assert r.reported_mean == direct.reported_mean
    assert main(["evaluate", str(out), "--classes", "0,1", "--eval-epochs", "1", "--num-evals", "1"]) == 0
    assert "4 images, 2 classes, (1, 28, 28) (packed, multi-formation factor 2: 16 training images)" in \
        capsys.readouterr().out

    with pytest.raises(UserError, match="already a packed set"):
        pack_set(out, tmp_path / "twice", 2)
    odd = tmp_path / "odd"
    distill_local(DistillConfig(method="random", ipc=3, classes=("0",), out=str(odd)))
    with pytest.raises(UserError, match="has 3 images, not a multiple of 4"):
        pack_set(odd, tmp_path / "x", 2)
    assert main(["pack", str(odd), "--out", str(tmp_path / "y"), "--factor", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
