"""The ImageNet split guard (issue 24 item 2): ImageNet's own images pass, the fastai layout is refused in one line.

Trees of tiny files in tmp_path: the guard counts files and decodes nothing, so most files are empty; the few that
a test loads are real PNGs.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from raydistill.cli import main
from raydistill.config import DistillConfig
from raydistill.data import load_dataset
from raydistill.data.split_guard import check_imagenet_counts
from raydistill.data.subsets import IMAGEWOOF_WNIDS
from raydistill.errors import UserError


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root: Path, train: list[int], val: list[int] | None, ext: str = ".JPEG") -> Path:
    """ImageWoof's wnids with ``train[k]`` / ``val[k]`` files in class k (file 0 of each class decodable)."""
    png = _png()
    for split, counts in (("train", train), ("val", val)):
        if counts is None:
            continue
        for wnid, n in zip(IMAGEWOOF_WNIDS, counts):
            d = root / split / wnid
            d.mkdir(parents=True)
            (d / f"{wnid}_0.png").write_bytes(png)
            for j in range(1, n):
                (d / f"{wnid}_{j}{ext}").touch()
    return root


FASTAI_TRAIN = [900 + 7 * k for k in range(10)]  # imagewoof2: 9,025 train and 3,929 val images
FASTAI_VAL = [385 + k for k in range(10)]


@pytest.fixture(scope="module")
def fastai_woof(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("fastai") / "imagewoof2", FASTAI_TRAIN, FASTAI_VAL)


@pytest.fixture(scope="module")
def imagenet_woof(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("imagenet") / "imagenet", [1300] * 9 + [1297], [50] * 10)


def test_imagenet_tree_passes_without_decoding(imagenet_woof: Path) -> None:
    ds = load_dataset("imagewoof", imagenet_woof, image_size=4)  # all but 20 files are empty: nothing was decoded
    assert ds.num_images("train") == 12997 and ds.num_images("test") == 500
    x, y = ds.load("train", label=3, limit=1)  # the index the guard listed is the one loading uses
    assert x.shape == (1, 3, 4, 4) and y.tolist() == [3] and int(x[0, 1, 0, 0]) == 200


def test_fastai_tree_is_refused_in_one_line(fastai_woof: Path) -> None:
    with pytest.raises(UserError) as e:
        load_dataset("imagewoof", fastai_woof)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{sum(FASTAI_TRAIN)} train (900-963 per class)" in msg
    assert f"{sum(FASTAI_VAL)} val (385-394 per class)" in msg
    assert "fastai imagenette2/imagewoof2 layout" in msg and "exactly 50 val" in msg
    assert "--allow-other-split" in e.value.fix


def test_allow_other_split_proceeds_and_is_a_param(fastai_woof: Path) -> None:
    ds = load_dataset("imagewoof", fastai_woof, image_size=4, allow_other_split=True)
    assert ds.num_images("test") == sum(FASTAI_VAL)
    cfg = DistillConfig(dataset="imagewoof", data_root=str(fastai_woof), allow_other_split=True)
    assert cfg.flat_params()["allow_other_split"] == "True"  # what the distill job logs to MLflow
    assert cfg.fingerprint() == cfg.with_(allow_other_split=False).fingerprint()  # same images, resumable


def test_cli_refuses_then_accepts_with_the_flag(fastai_woof: Path, tmp_path: Path, capsys) -> None:
    args = ["distill", "--dataset", "imagewoof", "--data-root", str(fastai_woof), "--method", "random",
            "--root", str(tmp_path / "runs"), "--eval-nets", "convnet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not ImageNet's own images" in err and "fastai" in err
    from raydistill.cli import _config, build_parser

    cfg = _config(build_parser().parse_args([*args, "--allow-other-split"]))
    assert cfg.allow_other_split is True and cfg.flat_params()["allow_other_split"] == "True"
    from raydistill.distill import open_dataset

    assert open_dataset(cfg).num_images("train") == sum(FASTAI_TRAIN)


@pytest.mark.parametrize("train, val, found, fastai", [
    ([1300] * 10, [50] * 9 + [49], "499 val (49-50 per class)", False),  # one val image lost
    ([1300] * 10, None, "and no val/ folder", False),
    ([1300] * 9 + [1350], [50] * 10, "13050 train (1300-1350 per class)", False),  # val merged into train?
    ([3] * 10, [2] * 10, "30 train (3 per class) and 20 val (2 per class)", False),  # a toy subsample
    ([950] * 10, [390] * 10, "9500 train (950 per class)", True),
])
def test_other_counts(train, val, found, fastai) -> None:
    with pytest.raises(UserError) as e:
        check_imagenet_counts("imagewoof", "/d", train, val)
    assert found in str(e.value) and ("fastai" in str(e.value)) == fastai


def test_imagenet_counts_pass() -> None:
    check_imagenet_counts("imagenette", "/d", [732, 1300, 1000], [50, 50, 50])  # ImageNet's fewest and most
