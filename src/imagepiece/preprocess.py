"""Each model's own input preprocessing: size, crop, interpolation, mean and std.

A model is only scored correctly on images prepared the way it was trained: an augreg ViT or a
transformers ViT expects mean/std 0.5, not ImageNet's, and a wrong normalisation lowers top-1
without any error. So the tools read the preprocessing from the model itself:

- a timm model: its ``pretrained_cfg`` through ``timm.data.resolve_data_config`` (the shipped
  models carry their Fashion-MNIST mean/std there, from their card);
- a transformers ``save_pretrained`` folder: its ``preprocessor_config.json``;
- the weights of an ``imagepiece train`` run: the eval transform of the data it was trained on
  (Fashion-MNIST's mean/std for a Fashion-MNIST run, ImageNet's otherwise, the run's crop and
  interpolation);

with the model's actual input size (a timm model created with ``img_size=32`` keeps its
pretrained_cfg's 224). Explicit overrides (``--mean``, ``--std``, ``--crop-pct``,
``--interpolation``, ``--img-size``) win, and :meth:`Preprocessing.summary` says what was used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any

import torch.nn as nn

from .data import IMAGENET_MEAN, IMAGENET_STD, TransformConfig, default_normalization

__all__ = ["INTERPOLATIONS", "Preprocessing", "PreprocessError", "check_overrides", "from_run", "from_timm",
           "from_transformers_folder", "resolve_preprocessing"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
#: PIL's resample codes, as transformers' preprocessor_config.json stores them
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class PreprocessError(ValueError):
    """A preprocessing value that is not allowed, or a config that cannot be read."""


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: resize to ``img_size / crop_pct``, centre-crop
    ``img_size``, normalise with ``mean``/``std``. ``source`` says where the values came from."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    source: str

    def transform_config(self) -> TransformConfig:
        """The eval-transform settings for :func:`imagepiece.data.build_dataset`."""
        return TransformConfig(interpolation=self.interpolation, crop_pct=self.crop_pct,
                               mean=self.mean, std=self.std)

    def summary(self) -> str:
        def fmt(v: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
        return (f"{self.img_size} px, crop {self.crop_pct:g}, {self.interpolation}, mean {fmt(self.mean)}, "
                f"std {fmt(self.std)} [{self.source}]")


def _model_size(model: nn.Module) -> int | None:
    """The square input size the model was built for (None when it takes any size)."""
    from .patch import describe

    try:
        h, w = describe(model).image_size
    except (TypeError, AttributeError):
        return None
    return int(h) if h == w else None


def from_timm(model: nn.Module, source: str | None = None) -> Preprocessing:
    """The data config of a timm model (``pretrained_cfg`` via ``resolve_data_config``)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = _model_size(model) or int(cfg["input_size"][-1])
    return Preprocessing(size, tuple(cfg["mean"]), tuple(cfg["std"]), str(cfg["interpolation"]),
                         float(cfg.get("crop_pct") or 1.0), source or "the model's timm pretrained_cfg")


def from_run(meta: dict[str, Any], model: nn.Module | None = None) -> Preprocessing:
    """The eval transform of the data a training run used (``meta`` is its checkpoint's
    ``meta.json``, see :func:`imagepiece.checkpoint.run_meta`), with the normalisation
    ``build_dataset`` gave that data (:func:`imagepiece.data.default_normalization`)."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    dataset = cfg.get("dataset") or "imagefolder"
    mean, std, crop = default_normalization(dataset)
    size = meta.get("img_size") or cfg.get("img_size") or (_model_size(model) if model is not None else None)
    return Preprocessing(int(size or 224), mean, std, str(cfg.get("interpolation") or "bicubic"),
                         float(cfg.get("crop_pct") or crop), f"the training run's data ({dataset})")


def _edge(value: Any) -> int | None:
    """A transformers size entry (int, {"height", "width"} or {"shortest_edge"}) as one edge."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if isinstance(value.get(key), int):
                return value[key]
    return None


def from_transformers_folder(path: str, model: nn.Module | None = None) -> Preprocessing:
    """The preprocessing in ``path/preprocessor_config.json`` (ImageNet's defaults, said so,
    when the folder has none)."""
    file = os.path.join(path, "preprocessor_config.json")
    size = _model_size(model) if model is not None else None
    if not os.path.isfile(file):
        return Preprocessing(size or 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875,
                             f"ImageNet defaults: {path!r} has no preprocessor_config.json")
    try:
        with open(file) as f:
            cfg = json.load(f)
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean", IMAGENET_MEAN))
            std = tuple(float(v) for v in cfg.get("image_std", IMAGENET_STD))
    except (OSError, ValueError, TypeError) as e:
        raise PreprocessError(f"cannot read {file!r}: {e}") from None
    resize = _edge(cfg.get("size"))
    crop = _edge(cfg.get("crop_size")) if cfg.get("do_center_crop") else None
    img_size = size or crop or resize or 224
    crop_pct = float(cfg["crop_pct"]) if isinstance(cfg.get("crop_pct"), (int, float)) else (
        crop / resize if crop and resize and resize >= crop else 1.0)
    interpolation = _PIL_RESAMPLE.get(cfg.get("resample"), "bilinear")
    return Preprocessing(img_size, mean, std, interpolation, crop_pct, f"{file}")


def _check_triple(name: str, value: Any, positive: bool) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) not in (1, 3) or (positive and min(out) <= 0):
        need = "positive numbers" if positive else "numbers"
        raise PreprocessError(f"{name}={value!r} is not allowed; expected 1 or 3 {need}, e.g. 0.5,0.5,0.5")
    return out * 3 if len(out) == 1 else out


def check_overrides(mean: Any = None, std: Any = None, crop_pct: Any = None, interpolation: Any = None,
                    img_size: Any = None) -> dict[str, Any]:
    """The given overrides (None: not given), checked and normalised; :class:`PreprocessError`
    names the first bad one."""
    forced = {}
    if mean is not None:
        forced["mean"] = _check_triple("mean", mean, positive=False)
    if std is not None:
        forced["std"] = _check_triple("std", std, positive=True)
    if crop_pct is not None:
        if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise PreprocessError(f"crop_pct={crop_pct!r} is not allowed; expected a value in (0, 1]")
        forced["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise PreprocessError(f"interpolation={interpolation!r} is not allowed; allowed: "
                                  f"{', '.join(INTERPOLATIONS)}")
        forced["interpolation"] = interpolation
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise PreprocessError(f"img_size={img_size!r} is not allowed; expected a positive integer")
        forced["img_size"] = img_size
    return forced


def resolve_preprocessing(model: nn.Module, folder: str | None = None, *, run: dict[str, Any] | None = None,
                          source: str | None = None, mean: Any = None, std: Any = None,
                          crop_pct: float | None = None, interpolation: str | None = None,
                          img_size: int | None = None) -> Preprocessing:
    """The preprocessing of ``model``: its training run's data for weights of a run (``run``, the
    run's ``meta.json``), ``folder``'s ``preprocessor_config.json`` for a transformers model,
    else timm's data config; the given values override it."""
    from .patch import is_transformers_model

    if run:
        prep = from_run(run, model)
    elif folder is not None or is_transformers_model(model):
        prep = from_transformers_folder(folder, model) if folder else Preprocessing(
            _model_size(model) or 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875,
            "ImageNet defaults: no transformers folder given")
    else:
        prep = from_timm(model, source)
    forced = check_overrides(mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
                             img_size=img_size)
    if forced:
        prep = replace(prep, **forced, source=f"{prep.source}; overridden: {', '.join(sorted(forced))}")
    return prep
