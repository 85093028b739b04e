"""Model-family integrations and the one entry point, :func:`patch`, that dispatches to them.

Each family lives in one module that only says how its blocks compute attention and are laid
out: timm's ViT in ``timm.py``, Hugging Face ``transformers`` models in ``hf.py`` (optional
extra ``imagepiece[hf]``). Everything a method does is in :mod:`imagepiece.runtime`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from ..plan import ReductionPlan, parse_method, split_spec
from ..runtime import BlockTrace, Controller, ModelInfo, is_patched, original_class, unpatch
from . import timm as _timm

__all__ = ["BlockTrace", "Controller", "describe", "is_patched", "is_transformers_model",
           "is_transformers_path", "limit_forward",
           "load_transformers", "patch", "set_grad_checkpointing", "supported_models", "unpatch",
           "use_method"]


def supported_models() -> str:
    """Human-readable description of the architectures :func:`patch` accepts, both families."""
    return f"{_timm.SUPPORTED}; and {_hf_supported()}"


def _hf_supported() -> str:
    try:
        from . import hf
    except ImportError as e:
        return f"transformers ViT, DeiT, DINOv2 (with registers) and CLIP vision models ({e})"
    return hf.SUPPORTED


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` (patched or not) is a transformers model."""
    return original_class(model).__module__.startswith("transformers.")


def _family(model: nn.Module) -> ModuleType:
    """The adapter module of ``model``'s family; ``TypeError`` naming what is supported."""
    if _timm.is_timm_vit(model):
        return _timm
    if is_transformers_model(model):
        from . import hf  # ImportError with the install command when transformers is missing

        return hf
    raise TypeError(f"{type(model).__name__} is not supported; supported: {supported_models()}")


def patch(model: nn.Module, plan: str | ReductionPlan | None = "imagepiece", **knobs: Any) -> nn.Module:
    """Apply a reduction plan to a supported timm or ``transformers`` model in place; return it.

    ``plan`` is a preset name (``"tome"``, ``"evit"``, ``"imagepiece"``, ``"imagepiece+tome"``,
    ``"imagepiece-discard"``, ``"none"``) with its knobs, a method spec as the CLI takes it
    (``"tome:r=8"``, ``"imagepiece:keep_rate=0.5"``), or a :class:`ReductionPlan`.
    Patching a patched model only replaces its plan.
    """
    plan, knobs = split_spec(plan, knobs)
    if not is_patched(model):
        _family(model).patch(model, plan, **knobs)
    model.imagepiece.set_plan(plan, **knobs)  # remembers the preset and knobs (``model.r``)
    return model


def use_method(model: nn.Module, spec: str, registered: bool = False) -> nn.Module:
    """Put ``model`` under the plan of a method spec (``"evit:keep_rate=0.5"``). ``none``
    unpatches a plain model (the exact original); a ``registered`` ``imagepiece_*`` model,
    created patched, gets the zero plan. Raises ``ValueError``/``TypeError`` when the spec or
    its plan does not fit the model."""
    name, knobs = parse_method(spec)
    if name == "none" and not registered:
        return unpatch(model)
    return patch(model, name, **knobs)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Turn recomputation of block activations in the backward pass on or off, through the
    family's own switch (timm's ``set_grad_checkpointing``; transformers'
    ``activation_checkpointing_enable``, called ``gradient_checkpointing_enable`` up to 5.18);
    patched or not, the reduced forward honours it."""
    if not is_transformers_model(model):
        model.set_grad_checkpointing(enable)
    elif hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def is_transformers_path(name: object) -> bool:
    """Whether the tools should read ``name`` as a transformers model: a ``save_pretrained``
    folder, or an ``owner/name`` hub id (from the local cache) that is not a timm name."""
    import os

    import timm

    return isinstance(name, str) and (os.path.isdir(name) or ("/" in name and not timm.is_model(name)))


def load_transformers(path: str) -> nn.Module:
    """A supported transformers model from a ``save_pretrained`` folder or a cached hub id, in
    eval mode, offline. ``ImportError`` (with the install command) without the ``hf`` extra;
    ``OSError``/``ValueError``/``TypeError`` when the folder holds nothing supported."""
    from . import hf

    return hf.load_pretrained(path)


def describe(model: nn.Module) -> ModelInfo:
    """Depth, native input size, channels and token count of a supported model."""
    return _family(model).describe(model)


def limit_forward(model: nn.Module, x: torch.Tensor, tokens: Sequence[tuple[int, int]]) -> Any:
    """An unpatched supported model run with its blocks on sequences cut to ``tokens`` (entering,
    leaving each block) without any selection work: the limit of a plan with those counts."""
    return _family(model).limit_forward(model, x, tokens)
