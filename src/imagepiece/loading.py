"""Opening a model by the name a user types, for every tool (bench, eval, tune, analysis).

A name is a timm model (``deit_small_patch16_224``, ``imagepiece_*``; random weights unless
timm's pretrained ones or a checkpoint file are asked for), ``shipped:NAME`` (a model shipped
with the package, see :mod:`imagepiece.zoo`) or a transformers ``save_pretrained`` folder (or a
hub id already in the local cache). Each tool turns :class:`ModelLoadError` into its own error.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .patch import is_transformers_path, load_transformers, unpatch

__all__ = ["SHIPPED_PREFIX", "ModelLoadError", "OpenedModel", "check_model_name", "comes_with_config",
           "open_model"]

SHIPPED_PREFIX = "shipped:"


class ModelLoadError(ValueError):
    """A model name, weights file or option that cannot be opened (one line, no traceback)."""


@dataclass(frozen=True)
class OpenedModel:
    """An unpatched model in eval mode, its weights in words, and its transformers folder
    (``None`` for timm and shipped models)."""

    model: nn.Module
    weights: str
    folder: str | None = None


def comes_with_config(name: str) -> bool:
    """Whether the model ``name`` brings its own weights and config (a shipped model or a
    transformers folder), so timm's options (checkpoint, pretrained, model kwargs) do not apply."""
    return name.startswith(SHIPPED_PREFIX) or is_transformers_path(name)


def check_model_name(name: object) -> str:
    """``name`` when some model can be opened by it, else :class:`ModelLoadError` naming what is
    allowed (with the closest timm names)."""
    import timm

    if isinstance(name, str) and (name.startswith(SHIPPED_PREFIX) or timm.is_model(name)
                                  or is_transformers_path(name)):
        return name
    close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelLoadError(f"unknown model {name!r}; allowed: a timm name (timm.list_models(), e.g. "
                         f"deit_small_patch16_224, or imagepiece_*), {SHIPPED_PREFIX}NAME of a shipped "
                         f"model, or a transformers save_pretrained folder.{hint}")


def open_model(name: str, checkpoint: str | None = None, pretrained: bool = False,
               model_kwargs: dict[str, Any] | None = None, use_ema: bool = False, seed: int = 0
               ) -> OpenedModel:
    """The model ``name`` unpatched, in eval mode. A timm model gets random weights drawn after
    ``torch.manual_seed(seed)`` (the same for every call), timm's ``pretrained`` weights, or those
    of ``checkpoint`` (read safely, every key must fit; ``use_ema`` takes a run's EMA weights).
    ``checkpoint``, ``pretrained`` and ``model_kwargs`` apply to timm names only: a shipped or
    transformers model comes with its weights and config."""
    check_model_name(name)
    if comes_with_config(name):
        if checkpoint or pretrained or model_kwargs:
            raise ModelLoadError("--checkpoint, --pretrained and --model-arg apply to timm names; a "
                                 "shipped or transformers model comes with its weights and config")
        return _open_shipped(name) if name.startswith(SHIPPED_PREFIX) else _open_transformers(name)
    return _open_timm(name, checkpoint, pretrained, dict(model_kwargs or {}), use_ema, seed)


def _open_shipped(name: str) -> OpenedModel:
    from .zoo import load_shipped

    shipped = name[len(SHIPPED_PREFIX):]
    try:
        return OpenedModel(load_shipped(shipped, patched=False), f"shipped model {shipped!r}")
    except ValueError as e:  # ZooError: unknown name or missing cards
        raise ModelLoadError(str(e)) from None


def _open_transformers(path: str) -> OpenedModel:
    try:
        model = load_transformers(path)
    except ImportError as e:  # without the hf extra: the message has the install command
        raise ModelLoadError(str(e)) from None
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the transformers model {path!r} (a save_pretrained folder, or "
                             f"a hub id already in the local cache): {e}") from None
    return OpenedModel(model, f"transformers, from {path}", path)


def _open_timm(name: str, checkpoint: str | None, pretrained: bool, kwargs: dict[str, Any],
               use_ema: bool, seed: int) -> OpenedModel:
    import timm

    from .checkpoint import load_weights

    if name.startswith("imagepiece_"):
        # created under a plan, which is dropped below: none resolves nothing for no reason
        kwargs.setdefault("plan", "none")
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 (timm and the hub raise many kinds)
        if pretrained:
            raise ModelLoadError(f"cannot load timm's pretrained weights for {name!r} (no internet and "
                                 f"not cached?): {type(e).__name__}: {e}; leave out --pretrained for "
                                 "random weights, or pass --checkpoint FILE") from None
        raise ModelLoadError(f"cannot create timm model {name!r} with {kwargs}: {type(e).__name__}: {e}"
                             ) from None
    weights = "timm pretrained" if pretrained else "random"
    if checkpoint:
        try:
            load_weights(model, checkpoint, use_ema=use_ema, strict=True, adapt=False)
        except ValueError as e:  # CheckpointError: missing, unreadable, unsafe or not fitting
            raise ModelLoadError(str(e)) from None
        weights = f"checkpoint {checkpoint}" + (" (EMA)" if use_ema else "")
    # A registered imagepiece_* model is created under a plan: the network itself is unreduced.
    return OpenedModel(unpatch(model).eval(), weights)
