"""Datasets for training and evaluation: ImageFolder trees, Fashion-MNIST IDX files, synthetic.

Every dataset yields ``(image_tensor, label)`` through a timm transform, so the DeiT recipe
(RandAugment, random erasing, bicubic resize, ImageNet mean/std) applies the same way to all
three. Bad input raises :class:`DataError` naming the path or value and what is allowed.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DATASET_KINDS",
    "DataError",
    "default_normalization",
    "FashionMNIST",
    "ImageFolderDataset",
    "SyntheticDataset",
    "TransformConfig",
    "build_dataset",
    "count_classes",
    "build_transform",
    "read_idx",
]

DATASET_KINDS = ("imagefolder", "fashion-mnist", "synthetic")
SPLITS = ("train", "val", "test")
DEBIAN_FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
# The 10,000 test images (MIT licence, Zalando Research) ship with the package so the
# embedded models can be evaluated offline.
PACKAGED_FASHION_ROOT = os.path.join(os.path.dirname(__file__), "assets", "fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of the Fashion-MNIST training images (grayscale copied to 3 channels).
FASHION_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_STD = (0.3530, 0.3530, 0.3530)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


class DataError(ValueError):
    """A dataset path, file or option is missing, empty, corrupt or not allowed."""


@dataclass(frozen=True)
class TransformConfig:
    """Knobs of the timm transform. Defaults are the DeiT recipe (training) and the DeiT eval
    transform (resize to size/0.875, centre crop, bicubic); mean/std None = the dataset's."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    color_jitter: float = 0.3
    hflip: float = 0.5
    scale: tuple[float, float] | None = None  # None: timm's (0.08, 1.0)
    interpolation: str = "bicubic"
    crop_pct: float | None = None  # None: 0.875 (DeiT), 1.0 for Fashion-MNIST (nothing to crop)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class _ZeroBitPosterize:
    """timm's posterize op, except that keeping 0 bits gives a black image (old Pillow's answer;
    Pillow >= 11 raises ValueError). A class, not a closure, so loader workers can pickle it."""

    def __init__(self, original: Callable):
        self.original = original

    def __call__(self, img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return self.original(img, bits_to_keep, **kwargs)


def _posterize_zero_bits_compat(transform: Callable) -> None:
    """Let the RandAugment/AutoAugment/AugMix ops of ``transform`` posterize to 0 bits.

    DeiT's ``rand-m9-mstd0.5-inc1`` can draw magnitude 10, which timm maps to keeping 0 bits;
    newer Pillow raises ValueError for that and would end the run. Only the ops of this
    transform are changed: timm's global ``auto_augment.NAME_TO_OP`` table is left alone, so
    other users of timm in the process see timm's own behaviour.
    """
    from PIL import ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return  # this Pillow still accepts 0 bits
    except ValueError:
        pass
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize") and not isinstance(op.aug_fn, _ZeroBitPosterize):
            op.aug_fn = _ZeroBitPosterize(op.aug_fn)


def _augment_ops(transform: Any) -> list[Any]:
    """The timm ``AugmentOp`` objects inside a composed transform (RandAugment and AugMix keep
    them in ``ops``, AutoAugment in a ``policy`` of sub-policies)."""
    found = []
    for t in getattr(transform, "transforms", [transform]):
        found += list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:
            found += list(sub)
    return [op for op in found if hasattr(op, "aug_fn") and hasattr(op, "name")]


def build_transform(img_size: int, is_training: bool, cfg: TransformConfig | None = None,
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, crop_pct: float = 0.875) -> Callable:
    """The timm train or eval transform for square images of ``img_size`` pixels."""
    cfg = cfg or TransformConfig()
    if not isinstance(img_size, int) or img_size < 1:
        raise DataError(f"img_size={img_size!r} must be a positive integer")
    from timm.data import create_transform

    mean = tuple(cfg.mean or mean)
    std = tuple(cfg.std or std)
    if is_training:
        transform = create_transform(
            img_size, is_training=True, auto_augment=cfg.auto_augment or None,
            re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count,
            color_jitter=cfg.color_jitter, hflip=cfg.hflip,
            scale=tuple(cfg.scale) if cfg.scale else None, interpolation=cfg.interpolation,
            mean=mean, std=std)
        _posterize_zero_bits_compat(transform)
        return transform
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else crop_pct  # 0 is refused, not "default"
    if not 0 < crop_pct <= 1:
        raise DataError(f"crop_pct={crop_pct!r} must be in (0, 1]")
    return create_transform(img_size, is_training=False, crop_pct=crop_pct,
                            interpolation=cfg.interpolation, mean=mean, std=std)


# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` (the ImageNet train/val layout), classes sorted by name.

    A file that cannot be decoded is skipped with a warning (``self.skipped`` counts them)
    and the next image is returned instead, or raises :class:`DataError` with ``strict``.
    """

    def __init__(self, root: str, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, strict: bool = False):
        from timm.data.readers.img_extensions import get_img_extensions
        from timm.data.readers.reader_image_folder import find_images_and_targets

        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} does not exist or is not a directory")
        class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not class_dirs:
            raise DataError(f"image folder {root!r} is empty: expected one sub-folder per class "
                            "(root/<class>/<image>.jpg)")
        extensions = get_img_extensions(as_set=True)
        samples, _ = find_images_and_targets(root, types=extensions, class_to_idx=None)
        counts = {c: 0 for c in class_dirs}
        for path, _ in samples:
            top = os.path.relpath(path, root).split(os.sep)[0]
            counts[top] = counts.get(top, 0) + 1
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise DataError(f"class folder(s) with no images in {root!r}: {empty[:10]}; allowed image "
                            f"extensions: {sorted(extensions)}")
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(class_dirs)}
        unknown = sorted(set(class_dirs) - set(class_to_idx))
        if unknown:
            raise DataError(f"class folder(s) {unknown[:10]} in {root!r} are not among the "
                            f"{len(class_to_idx)} known classes")
        self.root = root
        self.classes = list(class_to_idx)
        self.class_to_idx = dict(class_to_idx)
        self.samples: list[tuple[str, int]] = []
        self.skipped = 0
        for path, _ in samples:
            if os.path.getsize(path) == 0:  # cheap to catch here, before any worker sees it
                if strict:
                    raise DataError(f"image {path!r} is an empty file")
                self._skip(path, "empty file")
                continue
            self.samples.append((path, self.class_to_idx[os.path.relpath(path, root).split(os.sep)[0]]))
        if not self.samples:
            raise DataError(f"image folder {root!r} has no readable images")
        self.transform = transform
        self.strict = strict

    def _skip(self, path: str, why: str) -> None:
        self.skipped += 1
        warnings.warn(f"skipping unreadable image {path!r} ({why}); {self.skipped} skipped so far",
                      stacklevel=3)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # Try the following images when one is corrupt, so a single bad file in a million does
        # not end a multi-day run; strict mode turns it into an error naming the file.
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except Exception as e:  # noqa: BLE001  (PIL raises many kinds for bad files)
                if self.strict:
                    raise DataError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from None
                self._skip(path, f"{type(e).__name__}: {e}")
                continue
            return (self.transform(img) if self.transform else img), target
        raise DataError(f"no image in {self.root!r} could be read")


# --------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------


def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array, checking its magic number and size."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"IDX file {path!r} does not exist")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path!r}: {e}") from None
    if len(data) < 4:
        raise DataError(f"IDX file {path!r} is truncated: {len(data)} bytes, no header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"IDX file {path!r} has magic number {found}, expected {magic} "
                        f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path!r} is truncated inside its header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DataError(f"IDX file {path!r} has {len(data)} bytes but its header {dims} needs "
                        f"{expected} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(root: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root!r}; expected "
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                    "t10k-labels-idx1-ubyte (gzipped or not), e.g. from the Debian package "
                    "dataset-fashion-mnist in /usr/share/datasets/fashion-mnist")


def fashion_val_count(num_train: int) -> int:
    """Images held out of the training file for validation: 5,000 of 60,000 (1/12), so knobs
    and epochs are chosen without ever looking at the test split."""
    return max(1, num_train // 12) if num_train > 1 else 0


def default_fashion_root(split: str = "test") -> str:
    """Where Fashion-MNIST is found when no folder is named: the Debian package's folder, else
    (test split only) the copy of the t10k files shipped inside this package."""
    if os.path.isdir(DEBIAN_FASHION_ROOT):
        return DEBIAN_FASHION_ROOT
    if split == "test" and os.path.isdir(PACKAGED_FASHION_ROOT):
        return PACKAGED_FASHION_ROOT
    raise DataError(f"no Fashion-MNIST folder given and {DEBIAN_FASHION_ROOT!r} does not exist; the "
                    f"{split!r} split needs the IDX files: 'apt-get install dataset-fashion-mnist' or "
                    "download them from github.com/zalandoresearch/fashion-mnist and pass their folder")


class FashionMNIST(Dataset):
    """Fashion-MNIST from its four IDX files in ``root``. Splits: ``train`` (the first 11/12 of
    the training file, 55,000 images), ``val`` (its last 1/12, 5,000 images, held out) and
    ``test`` (the 10,000 t10k images). Grayscale is copied to 3 channels so any ViT stem takes it."""

    classes = FASHION_CLASSES

    def __init__(self, root: str, split: str = "train", transform: Callable | None = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"Fashion-MNIST folder {root!r} does not exist")
        if split not in SPLITS:
            raise DataError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
        prefix = "t10k" if split == "test" else "train"
        images = read_idx(_idx_path(root, f"{prefix}-images-idx3-ubyte"), IDX_IMAGES_MAGIC)
        labels = read_idx(_idx_path(root, f"{prefix}-labels-idx1-ubyte"), IDX_LABELS_MAGIC)
        if images.ndim != 3:
            raise DataError(f"Fashion-MNIST images in {root!r} have shape {images.shape}; expected "
                            "(count, rows, cols)")
        if labels.ndim != 1:
            raise DataError(f"Fashion-MNIST labels in {root!r} have shape {labels.shape}; expected (count,)")
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {prefix} in {root!r}: {len(images)} images but "
                            f"{len(labels)} labels")
        if len(images) == 0:
            raise DataError(f"Fashion-MNIST {prefix} in {root!r} has no images")
        if labels.max() >= len(FASHION_CLASSES):
            raise DataError(f"Fashion-MNIST labels in {root!r} go up to {labels.max()}; allowed 0-9")
        if split != "test":
            cut = len(images) - fashion_val_count(len(images))
            part = slice(0, cut) if split == "train" else slice(cut, None)
            images, labels = images[part], labels[part]
        self.images = images
        self.targets = labels.astype(np.int64)
        self.root = root
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.targets[index])


# --------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Deterministic class-dependent images for tests and demos.

    Each class has a fixed random 4x4 colour layout (from ``seed``) upsampled to the image
    size; each sample adds its own noise and brightness jitter. A small ViT learns it in a few
    epochs, and the same ``(seed, index)`` always gives the same image.
    """

    def __init__(self, length: int = 512, num_classes: int = 10, img_size: int = 32, seed: int = 0,
                 transform: Callable | None = None, noise: float = 40.0, offset: int = 0):
        if length < 1 or num_classes < 1 or img_size < 4:
            raise DataError(f"synthetic dataset needs length>=1, num_classes>=1, img_size>=4; got "
                            f"{length}, {num_classes}, {img_size}")
        rng = np.random.default_rng(seed)
        layouts = rng.uniform(30, 225, size=(num_classes, 4, 4, 3))
        reps = -(-img_size // 4)
        self.layouts = np.repeat(np.repeat(layouts, reps, axis=1), reps, axis=2)[:, :img_size, :img_size]
        self.length, self.num_classes, self.seed, self.noise = length, num_classes, seed, noise
        self.offset = offset  # another offset draws other noise: a held-out split, same task
        self.classes = [f"class{i}" for i in range(num_classes)]
        self.targets = [i % num_classes for i in range(length)]
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        target = self.targets[index]
        rng = np.random.default_rng((self.seed, index + self.offset))
        img = self.layouts[target] * rng.uniform(0.8, 1.2) + rng.normal(0, self.noise, self.layouts.shape[1:])
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        return (self.transform(pil) if self.transform else pil), target


# --------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------


SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def split_dir(root: str, split: str) -> str:
    """The folder that holds ``split`` under ``root``: ``root/train``, ``root/val`` (or
    ``validation``), ``root/test``. A ``root`` with no split folders is itself a class tree and
    serves any one split (the caller says which folder it used); a missing split is an error,
    never another split under its name (ImageNet's test images have no labels: use ``val``)."""
    for name in SPLIT_FOLDERS[split]:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    names = [n for ns in SPLIT_FOLDERS.values() for n in ns]
    if os.path.isdir(root) and not any(os.path.isdir(os.path.join(root, n)) for n in names):
        return root
    hint = "; ImageNet-style data has no labelled test split, use --split val" if split == "test" else ""
    raise DataError(f"no {split!r} split in {root!r}: expected a sub-folder "
                    f"{' or '.join(SPLIT_FOLDERS[split])}{hint}")


def default_normalization(kind: str) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """(mean, std, eval crop fraction) that ``build_dataset`` uses for ``kind`` when the
    transform config sets none: Fashion-MNIST's own statistics and no crop (nothing to crop
    around a centred garment), ImageNet's and the DeiT crop (0.875) otherwise."""
    if kind == "fashion-mnist":
        return FASHION_MEAN, FASHION_STD, 1.0
    return IMAGENET_MEAN, IMAGENET_STD, 0.875


def build_dataset(kind: str, root: str | None = None, split: str = "train", img_size: int = 224,
                  train_transform: bool | None = None, transform_cfg: TransformConfig | None = None,
                  strict: bool = False, num_classes: int = 10, length: int | None = None,
                  seed: int = 0, class_to_idx: dict[str, int] | None = None) -> Dataset:
    """A dataset of ``kind`` ("imagefolder", "fashion-mnist", "synthetic") for ``split``.

    ``train_transform`` (default: ``split == "train"``) picks the augmenting DeiT transform over
    the eval transform. ``root`` is the ImageNet-style root with train/ and val/ (or a split
    folder itself), or the folder holding the Fashion-MNIST IDX files; synthetic data needs none.
    """
    _check_kind(kind)
    if split not in SPLITS:
        raise DataError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    is_training = split == "train" if train_transform is None else train_transform
    tf = build_transform(img_size, is_training, transform_cfg, *default_normalization(kind))
    if kind == "fashion-mnist":
        return FashionMNIST(root or default_fashion_root(split), split, transform=tf)
    if kind == "synthetic":
        # Train and val share the class layouts (same seed) but not the samples (other noise).
        length = length if length is not None else (512 if split == "train" else 128)  # 0 is refused
        offset = 0 if split == "train" else 1_000_003
        return SyntheticDataset(length, num_classes, img_size, seed, tf, offset=offset)
    return ImageFolderDataset(_folder_split(root, split), tf, class_to_idx, strict)


def _check_kind(kind: str) -> None:
    if kind not in DATASET_KINDS:
        raise DataError(f"dataset kind {kind!r}; allowed: {', '.join(DATASET_KINDS)}")


def _folder_split(root: str | None, split: str) -> str:
    if not root:
        raise DataError("dataset kind 'imagefolder' needs a root folder (with train/ and val/)")
    return split_dir(os.fspath(root), split)


def count_classes(kind: str, root: str | None = None, split: str = "train", num_classes: int = 10) -> int:
    """The number of classes ``build_dataset(kind, root, split, num_classes=num_classes)`` has,
    without reading an image: an image folder's class folders are only listed (building the
    dataset lists and checks every file, which a model sized to the data need not wait for)."""
    _check_kind(kind)
    if kind == "fashion-mnist":
        return len(FASHION_CLASSES)
    if kind == "synthetic":
        return num_classes
    folder = _folder_split(root, split)
    try:
        return sum(e.is_dir() for e in os.scandir(folder))
    except OSError as e:
        raise DataError(f"image folder {folder!r} cannot be listed: {e.strerror or e}") from None


def num_classes_of(ds: Dataset) -> int:
    """Number of classes of a dataset built here."""
    classes = getattr(ds, "classes", None)
    if classes is None:
        raise DataError(f"cannot tell the number of classes of {type(ds).__name__}")
    return len(classes)
