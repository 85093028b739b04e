"""timm-registered ``imagepiece_<base>`` models: a timm ViT with the local coherence bias and a
reduction plan, created with ``timm.create_model`` like any other timm model.

>>> timm.create_model("imagepiece_deit_small_patch16_224", keep_rate=0.7, coherence="stem")  # doctest: +SKIP

Knobs: ``plan`` (preset name, default ``"imagepiece"``), ``coherence`` (``"residual"`` by
default, ``"stem"`` or ``None``) and the plan's own knobs (``keep_rate``, ``r``, ``blocks``,
``locality``, ...); every other keyword goes to the timm base model. ``pretrained=True`` loads
the base model's timm weights before the coherence branch is added, so ``residual`` starts from
exactly the pretrained model; ``checkpoint_path=`` loads a state dict of the full model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import timm
from timm.models import register_model

from .coherence import add_coherence
from .patch import patch
from .plan import PRESETS

__all__ = ["BASE_MODELS", "fixed_input_size", "registered_models"]

#: timm models that get an ``imagepiece_`` twin (each architecture family is covered by tests).
BASE_MODELS = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_base_patch16_384",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit3_small_patch16_224",
    "deit3_base_patch16_224",
    "deit3_small_patch16_384",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_small_patch16_384",
    "vit_base_patch16_reg4_gap_256",
)

_PLAN_KNOBS = frozenset(
    name
    for factory in PRESETS.values()
    for name in inspect.signature(factory).parameters
    if name not in ("depth", "kw")
)


def _entrypoint(base: str) -> Callable:
    def create(pretrained: bool = False, plan: str = "imagepiece", coherence: str | None = "residual",
               **kwargs):
        # timm hands us its resolution of *our* name's pretrained cfg; the base name resolves
        # its own. An overlay (e.g. ``dict(file=...)`` for local weights) goes to the base.
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("cache_dir", None)
        if kwargs.get("pretrained_cfg_overlay") is None:
            kwargs.pop("pretrained_cfg_overlay", None)
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in _PLAN_KNOBS}
        features = _feature_request(kwargs)
        model = timm.create_model(base, pretrained=pretrained, **kwargs)
        add_coherence(model, coherence)
        patch(model, plan, **knobs)
        return model if features is None else _feature_net(model, features)

    create.__name__ = f"imagepiece_{base}"
    create.__qualname__ = create.__name__
    create.__module__ = __name__
    create.__doc__ = f"timm ``{base}`` with the local coherence bias and an ImagePiece plan."
    return create


def fixed_input_size(model) -> tuple[int, int] | None:
    """The (height, width) a timm model's patch embedding requires, None when it takes other
    sizes (``dynamic_img_size``) or has no patch embedding: checked by ``train`` and ``eval``
    before any work, instead of timm's assertion in the middle of it."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None or getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return None
    return tuple(size)


def _feature_request(kwargs: dict) -> dict | None:
    """Pop timm's ``features_only`` options: we build the model whole (so the coherence bias and
    the plan go where the patch embedding is) and wrap it as timm would, afterwards."""
    if not kwargs.pop("features_only", False):
        return None
    cls = kwargs.pop("feature_cls", "getter")
    if cls != "getter":
        raise ValueError(f"feature_cls={cls!r} is not supported for imagepiece_* models; "
                         "ViTs give features through 'getter' (forward_intermediates)")
    return dict(out_indices=kwargs.pop("out_indices", 3))


def _feature_net(model, features: dict):
    """timm's ``features_only`` wrapper of a ViT around our finished model."""
    from timm.models._builder import pretrained_cfg_for_features
    from timm.models._features import FeatureGetterNet

    traits = dict(getattr(model, "_traits", {}))
    in_chans = getattr(model, "in_chans", None)
    net = FeatureGetterNet(model, **features)
    net._traits = traits
    if in_chans is not None:
        net.in_chans = in_chans
    net.pretrained_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    net.default_cfg = net.pretrained_cfg
    return net


def registered_models() -> list[str]:
    """Names of the ``imagepiece_*`` models registered with timm."""
    return [f"imagepiece_{b}" for b in BASE_MODELS]


for _base in BASE_MODELS:
    globals()[f"imagepiece_{_base}"] = register_model(_entrypoint(_base))
del _base
