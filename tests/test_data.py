"""Datasets: synthetic, Fashion-MNIST IDX files, ImageFolder trees, and every bad-input error."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from imagepiece.data import (
    PACKAGED_FASHION_ROOT,
    DataError,
    FashionMNIST,
    ImageFolderDataset,
    SyntheticDataset,
    TransformConfig,
    build_dataset,
    build_transform,
    count_classes,
    fashion_val_count,
    read_idx,
)

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array: np.ndarray, magic: int, gz: bool = False, cut: int = 0) -> str:
    """A tiny IDX file: magic, dims, uint8 data (``cut`` bytes removed from the end)."""
    data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    data += array.astype(np.uint8).tobytes()
    data = data[: len(data) - cut]
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(data)
    return str(path)


def fashion_dir(tmp_path, n_train=6, n_test=4, gz=False, **bad):
    ext = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 255, (n, 28, 28)),
                  bad.get("image_magic", 2051), gz, bad.get("cut", 0))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{ext}",
                  np.arange(bad.get("n_labels", n)) % 10, bad.get("label_magic", 2049), gz)
    return tmp_path


# --------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_class_dependent():
    a = SyntheticDataset(length=20, num_classes=4, img_size=16, seed=3)
    b = SyntheticDataset(length=20, num_classes=4, img_size=16, seed=3)
    x0 = np.asarray(a[0][0], dtype=np.float32)
    assert np.array_equal(x0, np.asarray(b[0][0], dtype=np.float32))
    assert [a[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    # same class closer than other classes on average
    same = np.abs(x0 - np.asarray(a[4][0], dtype=np.float32)).mean()
    other = np.abs(x0 - np.asarray(a[1][0], dtype=np.float32)).mean()
    assert same < other


def test_build_synthetic_splits_differ_but_share_classes():
    train = build_dataset("synthetic", split="train", img_size=16, length=8)
    val = build_dataset("synthetic", split="val", img_size=16, length=8)
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    assert not torch.equal(train[0][0], val[0][0]) and val[0][1] == 0


@pytest.mark.parametrize("kw, match", [
    (dict(kind="mnist"), "kind 'mnist'"),
    (dict(kind="synthetic", split="dev"), "split='dev'"),
    (dict(kind="synthetic", img_size=0), "img_size=0"),
    (dict(kind="imagefolder"), "needs a root"),
])
def test_build_dataset_bad_options(kw, match):
    with pytest.raises(DataError, match=match):
        build_dataset(**kw)


def test_train_transform_deit_recipe_runs_on_every_draw():
    # rand-m9-mstd0.5-inc1 can draw posterize to 0 bits, which newer Pillow refuses.
    tf = build_transform(32, True, TransformConfig())
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for _ in range(200):
        assert tf(img).shape == (3, 32, 32)
    assert build_transform(32, False)(img).shape == (3, 32, 32)


# ------------------------------------------------------------------------------ fashion-mnist


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx(tmp_path, gz):
    root = fashion_dir(tmp_path, gz=gz)
    ds = build_dataset("fashion-mnist", str(root), "train", img_size=16, train_transform=False)
    assert len(ds) == 5  # the last of the 6 training images is held out for validation
    x, y = ds[1]
    assert x.shape == (3, 16, 16) and y == 1
    assert torch.equal(x[0], x[1])  # grayscale copied to 3 channels
    val = build_dataset("fashion-mnist", str(root), "val", img_size=16)
    assert len(val) == 1 and val[0][1] == 5
    assert len(build_dataset("fashion-mnist", str(root), "test", img_size=16)) == 4


def test_fashion_val_split_is_disjoint_one_twelfth():
    assert fashion_val_count(60000) == 5000 and fashion_val_count(1) == 0


def test_packaged_test_split_is_the_real_one():
    ds = FashionMNIST(PACKAGED_FASHION_ROOT, "test")
    assert len(ds) == 10000 and ds.targets[0] == 9  # the first test image is an ankle boot
    if os.path.isdir(FASHION_DIR):
        assert np.array_equal(ds.images, FashionMNIST(FASHION_DIR, "test").images)


@pytest.mark.parametrize("bad, match", [
    (dict(image_magic=2049), "magic number 2049, expected 2051"),
    (dict(label_magic=2051), "magic number 2051, expected 2049"),
    (dict(cut=5), "truncated or corrupt"),
    (dict(n_labels=5), "6 images but 5 labels"),
])
def test_fashion_mnist_bad_files(tmp_path, bad, match):
    root = fashion_dir(tmp_path, **bad)
    with pytest.raises(DataError, match=match):
        FashionMNIST(str(root), "train")


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FashionMNIST(str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[.gz\] not found"):
        FashionMNIST(str(tmp_path))


def test_read_idx_header_only(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="no header"):
        read_idx(str(path), 2051)
    path.write_bytes(struct.pack(">I", 2051) + b"\x00\x00")
    with pytest.raises(DataError, match="inside its header"):
        read_idx(str(path), 2051)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="Debian package dataset-fashion-mnist absent")
def test_real_fashion_mnist():
    ds = build_dataset("fashion-mnist", FASHION_DIR, "test", img_size=32)
    assert len(ds) == 10000 and len(ds.classes) == 10
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 9  # the first test image is an ankle boot


# -------------------------------------------------------------------------------- imagefolder


def image_tree(root, classes=("cat", "dog"), per_class=2, size=12):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_imagefolder_layout(tmp_path):
    image_tree(tmp_path / "train")
    image_tree(tmp_path / "val", per_class=1)
    train = build_dataset("imagefolder", str(tmp_path), "train", img_size=16)
    val = build_dataset("imagefolder", str(tmp_path), "val", img_size=16,
                        class_to_idx=train.class_to_idx)
    assert len(train) == 4 and len(val) == 2 and train.classes == ["cat", "dog"]
    x, y = val[1]
    assert x.shape == (3, 16, 16) and y == 1


def test_count_classes_agrees_with_the_built_dataset_without_reading_images(tmp_path, monkeypatch):
    image_tree(tmp_path / "train")
    image_tree(tmp_path / "train" / "emu", classes=("a",))  # a class folder with sub-folders counts once
    built = {kind: build_dataset(kind, str(tmp_path) if kind == "imagefolder" else None, "test" if kind
                                 == "fashion-mnist" else "train", img_size=8, num_classes=7)
             for kind in ("imagefolder", "fashion-mnist", "synthetic")}
    import imagepiece.data as D

    monkeypatch.setattr(D, "ImageFolderDataset", None)  # counting must not build (scan every file of) it
    monkeypatch.setattr(D, "FashionMNIST", None)
    for kind, ds in built.items():
        split = "test" if kind == "fashion-mnist" else "train"
        root = str(tmp_path) if kind == "imagefolder" else None
        assert count_classes(kind, root, split, num_classes=7) == len(ds.classes), kind
    assert count_classes("imagefolder", str(tmp_path), "train") == 3
    with pytest.raises(DataError, match="needs a root folder"):
        count_classes("imagefolder", None, "train")
    with pytest.raises(DataError, match="no 'val' split"):
        count_classes("imagefolder", str(tmp_path), "val")
    with pytest.raises(DataError, match="dataset kind 'coco'; allowed"):
        count_classes("coco")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        ImageFolderDataset(str(tmp_path / "empty"))
    root = image_tree(tmp_path / "tree")
    (root / "bird").mkdir()
    (root / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"no images .*\['bird'\]"):
        ImageFolderDataset(str(root))
    with pytest.raises(DataError, match="no 'val' split"):
        build_dataset("imagefolder", str(tmp_path / "x"), "val")


def test_imagefolder_corrupt_image_skipped_or_strict(tmp_path):
    root = image_tree(tmp_path)
    bad = root / "cat" / "0bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty.jpg"):
        ds = ImageFolderDataset(str(root))
    assert len(ds) == 5 and ds.skipped == 1
    i = [os.path.basename(p) for p, _ in ds.samples].index("0bad.jpg")
    with pytest.warns(UserWarning, match="0bad.jpg"):
        img, y = ds[i]  # the corrupt file; the next image of the list comes instead
    assert img.size == (12, 12) and y == 0 and ds.skipped == 2
    with pytest.raises(DataError, match="empty.jpg"):
        ImageFolderDataset(str(root), strict=True)
    os.remove(root / "dog" / "empty.jpg")
    ds = ImageFolderDataset(str(root), strict=True)
    with pytest.raises(DataError, match="cannot read image .*0bad.jpg"):
        ds[i]


def test_zero_is_refused_not_read_as_the_default():
    with pytest.raises(DataError, match="crop_pct=0"):
        build_dataset("synthetic", split="val", img_size=32, transform_cfg=TransformConfig(crop_pct=0.0))
    with pytest.raises(DataError, match="length>=1"):
        build_dataset("synthetic", split="val", img_size=32, length=0)
