"""Tests for raydistill.data: Fashion-MNIST, digits, ImageNet subsets, folders, class-name safety."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydistill.data import DATASET_NAMES, load_dataset, resolve_classes, safe_class_name
from raydistill.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
from raydistill.data.subsets import imagenet_wnids, subset_classes
from raydistill.errors import UserError
from tests.conftest import needs_fmnist

# Spec §0.3, transcribed: wnid (ImageNet index).
SPEC_NETTE = [
    ("n01440764", 0), ("n02102040", 217), ("n02979186", 482), ("n03000684", 491), ("n03028079", 497),
    ("n03394916", 566), ("n03417042", 569), ("n03425413", 571), ("n03445777", 574), ("n03888257", 701),
]  # fmt: skip
SPEC_WOOF = [
    ("n02096294", 193), ("n02093754", 182), ("n02111889", 258), ("n02088364", 162), ("n02086240", 155),
    ("n02089973", 167), ("n02087394", 159), ("n02115641", 273), ("n02099601", 207), ("n02105641", 229),
]  # fmt: skip
SPEC_IDC = [
    ("n02869837", 452), ("n01749939", 64), ("n02488291", 374), ("n02107142", 236), ("n13037406", 993),
    ("n02091831", 176), ("n04517823", 882), ("n04589890", 904), ("n03062245", 503), ("n01773797", 74),
]  # fmt: skip
_SPEC_100_TEXT = """
452,64,374,236,993,176,882,904,503,74,57,959,953,508,872,228,122,421,599,858,157,449,994,608,151,209,15,876,246,766,
455,857,131,119,234,90,45,936,479,272,665,653,659,158,960,765,908,703,407,560,317,938,724,748,331,619,120,267,155,708,
368,772,167,494,180,431,342,854,305,54,268,667,166,277,662,798,313,498,299,222,682,593,775,674,592,137,758,717,606,281,
796,211,620,830,544,275,242,570,99,169"""
SPEC_100 = [int(x) for x in _SPEC_100_TEXT.replace("\n", "").strip().split(",")]


# ---------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fmnist_shapes_counts_and_labels() -> None:
    ds = load_dataset("fmnist")
    assert (ds.name, ds.num_classes, ds.channels, ds.image_size) == ("fashion-mnist", 10, 1, 28)
    assert ds.class_names[0] == "t-shirt_top" and ds.human_names[0] == "T-shirt/top"
    assert ds.dit_labels == list(range(10))
    assert ds.num_images("train") == 60000 and ds.num_images("test") == 10000
    assert all(ds.num_images("train", c) == 6000 for c in range(10))
    x, y = ds.load("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).tolist() == [1000] * 10


@needs_fmnist
def test_fmnist_first_n_is_deterministic() -> None:
    ds = load_dataset("fashion-mnist")
    x1, y1 = ds.load("train", label=3, limit=200)
    x2, y2 = FashionMNIST().load("train", label=3, limit=200)
    assert x1.shape == (200, 1, 28, 28) and bool((y1 == 3).all())
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the first 200 of class 3 are the first 200 class-3 records of the IDX file
    xa, ya = ds.load("train")
    assert torch.equal(x1, xa[ya == 3][:200])
    # per-class limit without label: 5 of each class, natural order preserved
    xl, yl = ds.load("train", limit=5)
    assert torch.bincount(yl).tolist() == [5] * 10
    assert torch.equal(xl[yl == 7], xa[ya == 7][:5])
    # loads are copies: mutating them does not touch the cache
    x1.zero_()
    assert torch.equal(ds.load("train", label=3, limit=200)[0], x2)


@needs_fmnist
def test_fmnist_resize() -> None:
    x, _ = load_dataset("fmnist", image_size=32).load("test", limit=2)
    assert x.shape == (20, 1, 32, 32) and x.dtype == torch.uint8


@needs_fmnist
def test_fmnist_corrupt_file(tmp_path: Path) -> None:
    for name in Path(DEFAULT_ROOT).iterdir():
        shutil.copy(name, tmp_path / name.name)
    # truncated gzip
    data = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    ds = FashionMNIST(tmp_path)
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        ds.load("test")
    # valid gzip, truncated IDX payload
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(gzip.decompress(data)[:1000])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz.*bytes"):
        FashionMNIST(tmp_path).load("test")
    # wrong magic (images restored, labels broken)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(data)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + bytes(8))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz has IDX magic"):
        FashionMNIST(tmp_path).num_images("test")


def test_fmnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fmnist", root=tmp_path / "nope")
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        load_dataset("fmnist", root=tmp_path)


# ---------------------------------------------------------------- digits


def test_digits() -> None:
    ds = load_dataset("digits")
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, 8)
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.num_images("train") == 1500 and ds.num_images("test") == 297
    x, y = ds.load("train")
    assert x.shape == (1500, 1, 8, 8) and x.dtype == torch.uint8 and int(x.max()) == 255
    assert set(y.tolist()) == set(range(10))
    x16, _ = load_dataset("digits", image_size=16).load("test", label=0)
    assert x16.shape[1:] == (1, 16, 16)
    assert resolve_classes(ds, ["3", 5]) == [3, 5]
    with pytest.raises(UserError, match=r"class '3' \(3\) is selected twice"):
        resolve_classes(ds, ["3", 5, "3"])


# ---------------------------------------------------------------- subsets


def test_subset_lists_match_spec() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and wnids[0] == "n01440764"
    for subset, spec in (("imagenette", SPEC_NETTE), ("imagewoof", SPEC_WOOF), ("imageidc", SPEC_IDC)):
        assert subset_classes(subset) == [w for w, _ in spec]
        assert [wnids.index(w) for w, _ in spec] == [i for _, i in spec], subset
    assert [wnids.index(w) for w in subset_classes("imagenet-100")] == SPEC_100
    assert subset_classes("imagenet-100")[:10] == subset_classes("imageidc")
    assert subset_classes("imagenet-1k") == list(wnids)
    assert subset_classes("imagenet-100", nclass=20, phase=2) == [wnids[i] for i in SPEC_100[40:60]]
    assert len(subset_classes("imagenet-1k", nclass=300, phase=3)) == 100
    with pytest.raises(UserError, match="phase"):
        subset_classes("imagenette", nclass=5, phase=2)
    with pytest.raises(UserError, match="nclass"):
        subset_classes("imagenette", nclass=0)


# ---------------------------------------------------------------- ImageNet folders


def _write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    img = Image.new("RGB", size, color)
    img.save(path, format="JPEG" if path.suffix.lower() in (".jpeg", ".jpg") else "PNG")


@pytest.fixture
def fake_imagenet(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    for split, n in (("train", 3), ("val", 2)):
        for k, (wnid, _) in enumerate(SPEC_NETTE):
            d = root / split / wnid
            d.mkdir(parents=True)
            for j in range(n):
                ext = ".JPEG" if j % 2 == 0 else ".png"
                _write_image(d / f"{wnid}_{j}{ext}", (40 + 7 * j, 30), (20 * k, 5 * j, 100))
    return root


def test_imagenet_subset_loads(fake_imagenet: Path) -> None:
    ds = load_dataset("imagenette", root=fake_imagenet, image_size=16, allow_other_split=True)
    assert ds.class_names == [w for w, _ in SPEC_NETTE]
    assert ds.dit_labels == [i for _, i in SPEC_NETTE]
    assert ds.human_names[0] == "tench" and ds.human_names[1] == "English springer"
    assert ds.num_images("train") == 30 and ds.num_images("test") == 20
    x, y = ds.load("train")
    assert x.shape == (30, 3, 16, 16) and x.dtype == torch.uint8
    assert y.tolist() == [k for k in range(10) for _ in range(3)]
    # the red channel encodes the class (JPEG is lossy: allow a small error)
    assert (x[:, 0].float().mean(dim=(1, 2)) - 20 * y.float()).abs().max() < 6
    xv, yv = ds.load("test", label=4, limit=1)
    assert xv.shape == (1, 3, 16, 16) and yv.tolist() == [4]
    names = [p.name for p in ds.paths("train", label=2, limit=2)]
    assert names == sorted(names) and len(names) == 2
    assert resolve_classes(ds, ["n03888257", "tench", 3]) == [9, 0, 3]
    with pytest.raises(UserError, match="n01440764"):
        resolve_classes(ds, ["not-a-class"])


def test_imagenet_phase(fake_imagenet: Path) -> None:
    ds = load_dataset("imagenette", root=fake_imagenet, image_size=8, nclass=4, phase=1,
                      allow_other_split=True)
    assert ds.class_names == [w for w, _ in SPEC_NETTE[4:8]] and ds.dit_labels == [497, 566, 569, 571]
    assert ds.load("train")[1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_imagenet_corrupt_image(fake_imagenet: Path) -> None:
    bad = fake_imagenet / "train" / SPEC_NETTE[1][0] / "zz_bad.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    ds = load_dataset("imagenette", root=fake_imagenet, image_size=8, allow_other_split=True)
    ds.load("train", label=0)  # other classes are fine
    with pytest.raises(UserError, match="zz_bad.JPEG"):
        ds.load("train", label=1)
    good = fake_imagenet / "train" / SPEC_NETTE[2][0] / f"{SPEC_NETTE[2][0]}_0.JPEG"
    good.write_bytes(good.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(UserError, match=good.name):
        ds.load("train", label=2)


def test_imagenet_missing_class(fake_imagenet: Path) -> None:
    shutil.rmtree(fake_imagenet / "train" / SPEC_NETTE[3][0])
    shutil.rmtree(fake_imagenet / "train" / SPEC_NETTE[5][0])
    with pytest.raises(UserError, match=f"2 of 10 .*first: {SPEC_NETTE[3][0]}"):
        load_dataset("imagenette", root=fake_imagenet)
    with pytest.raises(UserError, match="train/"):
        load_dataset("imagewoof", root=fake_imagenet / "train")
    with pytest.raises(UserError, match="data root"):
        load_dataset("imagenette")


# ---------------------------------------------------------------- folder, names, errors


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".hidden", "", "..", "a\\b", "x\x00y", "C:foo"])
def test_safe_class_name_rejects(name: str) -> None:
    with pytest.raises(UserError):
        safe_class_name(name)


def test_safe_class_name_accepts() -> None:
    for name in ("cat", "n01440764", "t-shirt_top", "0", "class 1"):
        assert safe_class_name(name) == name


def test_folder_dataset(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for k, cls in enumerate(["dog", "cat"]):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for j in range(n):
                _write_image(d / f"{j}.png", (12, 20), (200 * k, 0, 0))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    ds = load_dataset("folder", root=tmp_path, image_size=10)
    assert ds.class_names == ["cat", "dog"] and ds.dit_labels == [0, 1] and ds.channels == 3
    x, y = ds.load("train")
    assert x.shape == (6, 3, 10, 10) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.num_images("test") == 2
    assert int(x[0, 0].float().mean()) == 200 and int(x[3, 0].float().mean()) == 0  # cat=200, dog=0
    gray = load_dataset("folder", root=tmp_path, image_size=10, channels=1)
    assert gray.load("test")[0].shape == (2, 1, 10, 10)
    (tmp_path / "train" / "..bad").mkdir()
    (tmp_path / "train" / "a..b").mkdir()
    with pytest.raises(UserError, match="a..b"):
        load_dataset("folder", root=tmp_path)
    with pytest.raises(UserError, match="data root"):
        load_dataset("folder")


def test_unknown_dataset_and_bad_args() -> None:
    with pytest.raises(UserError, match="fashion-mnist") as info:
        load_dataset("cifar-10")
    assert all(n in str(info.value) for n in DATASET_NAMES)
    ds = load_dataset("digits")
    with pytest.raises(UserError, match="split"):
        ds.load("validation")
    with pytest.raises(UserError, match="out of range"):
        ds.load("train", label=10)
    with pytest.raises(UserError, match="limit"):
        ds.load("train", limit=0)
    with pytest.raises(UserError, match="nclass"):
        load_dataset("digits", nclass=5)
    with pytest.raises(UserError, match="out of range"):
        resolve_classes(ds, [12])
    assert np.array_equal(resolve_classes(ds, None), np.arange(10))
