"""Models that ship inside the package: trained on Fashion-MNIST by ``studies/fashion_mnist.py``.

They let a new user see real accuracy and speed offline, right after install
(``imagepiece eval`` and ``imagepiece visualize`` with no model use them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "models")
CARD_FILE = "models.json"


class ZooError(ValueError):
    """A shipped model is missing, unknown or damaged."""


@dataclass(frozen=True)
class ShippedModel:
    """One shipped model: its weights file, how to build it, its plan and measured numbers."""

    name: str
    file: str
    model: str
    model_kwargs: dict[str, Any]
    method: str
    card: dict[str, Any]

    @property
    def path(self) -> str:
        return os.path.join(ASSET_DIR, self.file)

    @property
    def reference(self) -> str:
        """The unreduced model of this model's set, trained the same way: its speed-ups divide by it."""
        return str(self.card.get("reference", "baseline"))

    @property
    def img_size(self) -> int:
        """The square input size the model was trained at (Fashion-MNIST upscaled or native)."""
        return int(self.model_kwargs.get("img_size", self.card.get("img_size", 32)))


def shared_img_size(models: dict[str, ShippedModel]) -> int:
    """The one input size of all shipped models (they are evaluated on the same images)."""
    sizes = {m.img_size for m in models.values()}
    if len(sizes) != 1:
        raise ZooError(f"shipped models disagree on the input size: {sorted(sizes)}")
    return sizes.pop()


def shipped_models(asset_dir: str = ASSET_DIR) -> dict[str, ShippedModel]:
    """Name -> :class:`ShippedModel`, in the order of the card file."""
    path = os.path.join(asset_dir, CARD_FILE)
    if not os.path.isfile(path):
        raise ZooError(f"no shipped models: {path!r} is missing (a source checkout without the "
                       "study's export? run 'python studies/fashion_mnist.py --export')")
    try:
        with open(path) as f:
            cards = json.load(f)["models"]
    except (OSError, ValueError, KeyError) as e:
        raise ZooError(f"shipped model card {path!r} is unreadable: {e}") from None
    models = {c["name"]: ShippedModel(c["name"], c["file"], c["model"], dict(c["model_kwargs"]),
                                      c["method"], c) for c in cards}
    unknown = sorted({m.reference for m in models.values()} - set(models))
    if unknown:
        raise ZooError(f"shipped model card {path!r} names unknown reference model(s) {unknown}")
    return models


def load_shipped(name: str = "imagepiece", patched: bool = True) -> nn.Module:
    """The shipped model ``name`` in eval mode, with its plan applied when ``patched``.

    Its ``pretrained_cfg`` carries the Fashion-MNIST mean/std, so tools that read the input
    normalisation from the model (e.g. ``visualize``) prepare images the way it was trained.
    """
    import timm

    from .checkpoint import load_weights
    from .data import FASHION_MEAN, FASHION_STD
    from .patch import use_method

    models = shipped_models()
    if name not in models:
        raise ZooError(f"unknown shipped model {name!r}; allowed: {', '.join(models)}")
    m = models[name]
    size = m.img_size
    overlay = dict(mean=FASHION_MEAN, std=FASHION_STD, input_size=(3, size, size), crop_pct=1.0)
    model = timm.create_model(m.model, pretrained_cfg_overlay=overlay, **m.model_kwargs)
    load_weights(model, m.path, strict=True, adapt=False)
    use_method(model, m.method if patched else "none", registered=m.model.startswith("imagepiece_"))
    return model.eval()
