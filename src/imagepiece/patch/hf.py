"""The one place that knows Hugging Face ``transformers`` vision transformers.

Supported: ViT, DeiT (with its distillation token and teacher head), DINOv2 (LayerScale),
DINOv2 with registers and CLIP's vision tower, as laid out since ``transformers`` 5.18. Patching
swaps the class of the *tower* (the module holding embeddings, layers and final norm) for one
whose forward runs the layers through :func:`imagepiece.runtime.run_blocks`; heads that average
patch tokens (DINOv2 classifiers) weight them by size. Weights and parameter names are untouched.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import versions
from ..plan import ReductionPlan, make_plan
from ..runtime import (
    Controller,
    ModelInfo,
    ReducedModule,
    Taps,
    cut_blocks,
    original_class,
    pool_patches,
    run_blocks,
    swap_class,
)

MIN_VERSION = versions.SUPPORTED["transformers"][0]
INSTALL_HINT = (f'transformers models need the "hf" extra: pip install "imagepiece[hf]" '
                f"({versions.supported_range('transformers')})")

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(INSTALL_HINT) from e
# Before the imports below, which an older transformers may lack: name the versions, not a symbol.
versions.check("transformers", transformers.__version__)
try:
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
    from transformers.utils.generic import can_return_tuple
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(INSTALL_HINT) from e

__all__ = ["ReducedOutput", "SUPPORTED", "describe", "limit_forward", "load_pretrained", "patch"]

SUPPORTED = (
    f"transformers (>= {MIN_VERSION}, < {versions.SUPPORTED['transformers'][1]}) ViTModel, "
    "ViTForImageClassification, DeiTModel, "
    "DeiTForImageClassification, DeiTForImageClassificationWithTeacher, Dinov2Model, "
    "Dinov2ForImageClassification, Dinov2WithRegistersModel, "
    "Dinov2WithRegistersForImageClassification, CLIPVisionModel, CLIPVisionModelWithProjection"
)


@dataclass
class ReducedOutput(BaseModelOutputWithPooling):
    """The tower's usual output plus ``token_sizes`` ``(B, N)`` (``None`` while all are 1)."""

    token_sizes: torch.Tensor | None = None


# --------------------------------------------------------------------------------------
# How a layer computes attention and is laid out
# --------------------------------------------------------------------------------------


def _attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
    """A transformers q/k/v/o attention with the fused kernel, returning q and k too."""
    B, N, _ = x.shape
    q = attn.q_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    p = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=None if bias is None else bias.to(q.dtype),
        dropout_p=p if attn.training else 0.0,
        scale=_scale(attn),
    )
    out = out.transpose(1, 2).reshape(B, N, -1)
    proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return proj(out), q, k


def _scale(attn: nn.Module) -> float:
    return attn.scaling if hasattr(attn, "scaling") else attn.scale


@dataclass(frozen=True)
class _Layout:
    """Attribute names of one layer class: pre-norms, attention, and what follows each branch
    (dropout, LayerScale, drop path) before it is added to the residual stream."""

    norm1: str
    attn: str
    after_attn: tuple[str, ...]
    norm2: str
    after_mlp: tuple[str, ...]

    def attend(self, blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
        out, q, k = _attention(getattr(blk, self.attn), getattr(blk, self.norm1)(x), bias)
        for name in self.after_attn:
            out = getattr(blk, name)(out)
        return x + out, q, k

    def mlp(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = blk.mlp(getattr(blk, self.norm2)(x))
        for name in self.after_mlp:
            h = getattr(blk, name)(h)
        return x + h

    def whole(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return blk(x, None)

    def scale(self, blk: nn.Module) -> float:
        return _scale(getattr(blk, self.attn))


_VIT_LAYOUT = _Layout("layernorm_before", "attention", ("dropout",), "layernorm_after", ("dropout",))
_DINO_LAYOUT = _Layout("norm1", "attention", ("layer_scale1", "drop_path"), "norm2",
                       ("layer_scale2", "drop_path"))
_CLIP_LAYOUT = _Layout("layer_norm1", "self_attn", (), "layer_norm2", ())


# --------------------------------------------------------------------------------------
# Towers: embeddings -> layers -> final norm, per family
# --------------------------------------------------------------------------------------


def _grid(config: Any, images: torch.Tensor) -> tuple[int, int]:
    p = config.patch_size
    ph, pw = (p, p) if isinstance(p, int) else tuple(p)
    return images.shape[-2] // ph, images.shape[-1] // pw


def _reject(bool_masked_pos, attention_mask, kwargs: dict) -> None:
    if bool_masked_pos is not None or attention_mask is not None:
        raise ValueError("masks (bool_masked_pos, attention_mask) are not supported on a token-reduced "
                         "model")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not supported on a token-reduced model (token counts "
                         "change between layers); read model.imagepiece.trace instead")


class _Kind(NamedTuple):
    """One tower class: its layer layout, where its layers are, its embedding and its ending."""

    layout: _Layout
    layers: Callable[[nn.Module], nn.ModuleList]
    embed: Callable[[nn.Module, torch.Tensor, bool], torch.Tensor]  # (tower, images, interpolate)
    finish: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _vit_finish(tower: nn.Module, x: torch.Tensor):
    x = tower.layernorm(x)
    return x, tower.pooler(x) if tower.pooler is not None else None


def _dino_finish(tower: nn.Module, x: torch.Tensor):
    x = tower.layernorm(x)
    return x, x[:, 0]


_VIT = _Kind(_VIT_LAYOUT, lambda t: t.layers,
             lambda t, images, interp: t.embeddings(images, interpolate_pos_encoding=interp),
             _vit_finish)
_DINO = _Kind(_DINO_LAYOUT, lambda t: t.encoder.layer, lambda t, images, interp: t.embeddings(images),
              _dino_finish)
_CLIP = _Kind(_CLIP_LAYOUT, lambda t: t.encoder.layers,
              lambda t, images, interp: t.pre_layrnorm(t.embeddings(images, interpolate_pos_encoding=interp)),
              lambda t, x: (x, t.post_layernorm(x[:, 0])))


def _embed(tower: nn.Module, kind: _Kind, images: torch.Tensor, interpolate: bool | None) -> torch.Tensor:
    images = images.to(next(tower.embeddings.parameters()).dtype)
    return kind.embed(tower, images, bool(interpolate))


def _checkpointing(tower: nn.Module, layers: nn.ModuleList) -> bool:
    return (tower.training and torch.is_grad_enabled()
            and any(getattr(layer, "gradient_checkpointing", False) for layer in layers))


class _ReducedTransformers(ReducedModule):
    """Base of the transformers mixins: ``save_pretrained`` records the original class in the
    config's ``architectures``, so a folder saved from a patched model loads (unpatched) with
    ``from_pretrained``/``AutoModel`` like any other."""

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        patched = type(self)
        self.__class__ = original_class(self)
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched


class _ReducedClassifier(_ReducedTransformers):
    """A classifier whose head reads only the class token: the original forward, swapped so that
    the model itself answers ToMe's ``model.r`` and pickles patched."""


class _ReducedTower(_ReducedTransformers):
    """The tower's forward: its embedding, the layers through the runtime, its ending."""

    imagepiece: Controller
    _kind: _Kind

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, bool_masked_pos=None, interpolate_pos_encoding=None,
                attention_mask=None, **kwargs) -> ReducedOutput:
        _reject(bool_masked_pos, attention_mask, kwargs)
        kind = self._kind
        x = _embed(self, kind, pixel_values, interpolate_pos_encoding)
        layers = kind.layers(self)
        hidden = kwargs.get("output_hidden_states")
        if hidden is None:
            hidden = getattr(self.config, "output_hidden_states", False)
        taps = Taps(frozenset(range(len(layers)))) if hidden else None
        run = run_blocks(kind.layout, layers, x, _grid(self.config, pixel_values), self.imagepiece,
                         _checkpointing(self, layers), taps)
        states = _full_grid_states(x, run.taps, self.imagepiece.num_prefix) if hidden else None
        out, pooled = kind.finish(self, run.x)
        return ReducedOutput(last_hidden_state=out, pooler_output=pooled, token_sizes=run.size,
                             hidden_states=states)


def _full_grid_states(embedded: torch.Tensor, taps: list, num_prefix: int) -> tuple[torch.Tensor, ...]:
    """transformers' ``hidden_states`` on the full grid: the embeddings, then every layer's output
    as ``[prefix | one feature per patch]`` (merged groups broadcast to their members, EViT's
    fused token to the patches it absorbed), as long as the unpatched model's."""
    return (embedded, *(torch.cat(t.unmerge(num_prefix), dim=1) for t in taps))


class _ReducedViTModel(_ReducedTower):
    """ViTModel / DeiTModel: ``layers``, final ``layernorm``, optional ``pooler``."""

    _kind = _VIT


class _ReducedDinov2Model(_ReducedTower):
    """Dinov2Model / Dinov2WithRegistersModel: ``encoder.layer``, ``layernorm``, class-token pool."""

    _kind = _DINO


class _ReducedCLIPVision(_ReducedTower):
    """CLIPVisionModel: ``pre_layrnorm``, ``encoder.layers``, ``post_layernorm`` on the class token."""

    _kind = _CLIP


class _ReducedDinov2Classifier(_ReducedTransformers):
    """DINOv2 classifiers: [class token | size-weighted mean of the patch tokens] -> linear.
    ``return_dict`` (argument or config) is honoured as by the unpatched model: a tuple when off."""

    imagepiece: Controller

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, labels=None, attention_mask=None,
                **kwargs) -> ImageClassifierOutput:
        tower = getattr(self, self.base_model_prefix)
        out = tower(pixel_values, attention_mask=attention_mask, return_dict=True, **kwargs)
        seq = out.last_hidden_state
        pooled = pool_patches(seq, out.token_sizes, self.imagepiece.num_prefix)
        logits = self.classifier(torch.cat([seq[:, 0], pooled], dim=1))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class _Tower(NamedTuple):
    attr: str  # where the tower sits in the model ("" = the model itself)
    mixin: type  # the reduced forward of the tower's class
    head: type | None  # the classifier's mixin (a reduced head forward where it pools patch tokens)


_TOWERS: dict[str, _Tower] = {
    "ViTModel": _Tower("", _ReducedViTModel, None),
    "ViTForImageClassification": _Tower("vit", _ReducedViTModel, _ReducedClassifier),
    "DeiTModel": _Tower("", _ReducedViTModel, None),
    "DeiTForImageClassification": _Tower("deit", _ReducedViTModel, _ReducedClassifier),
    "DeiTForImageClassificationWithTeacher": _Tower("deit", _ReducedViTModel, _ReducedClassifier),
    "Dinov2Model": _Tower("", _ReducedDinov2Model, None),
    "Dinov2ForImageClassification": _Tower("dinov2", _ReducedDinov2Model, _ReducedDinov2Classifier),
    "Dinov2WithRegistersModel": _Tower("", _ReducedDinov2Model, None),
    "Dinov2WithRegistersForImageClassification": _Tower("dinov2_with_registers", _ReducedDinov2Model,
                                                        _ReducedDinov2Classifier),
    "CLIPVisionModel": _Tower("", _ReducedCLIPVision, None),
    "CLIPVisionModelWithProjection": _Tower("vision_model", _ReducedCLIPVision, _ReducedClassifier),
}

_TOWER_CLASSES = {"ViTModel", "DeiTModel", "Dinov2Model", "Dinov2WithRegistersModel", "CLIPVisionModel"}


def _tower(model: nn.Module) -> tuple[nn.Module, _Tower]:
    """The tower of a supported model, checked layer by layer; ``TypeError`` otherwise
    (``UnsupportedVersionError`` when the installed transformers is outside the supported range)."""
    versions.check("transformers", transformers.__version__)
    cls = original_class(model)
    name = cls.__name__
    spec = _TOWERS.get(name)
    if spec is None or not cls.__module__.startswith("transformers."):
        raise TypeError(f"{name} is not supported; supported: {SUPPORTED}")
    tower = getattr(model, spec.attr) if spec.attr else model
    if original_class(tower).__name__ not in _TOWER_CLASSES:
        raise TypeError(f"{name}.{spec.attr} is {type(tower).__name__}; supported: {SUPPORTED}")
    for i, layer in enumerate(spec.mixin._kind.layers(tower)):
        attn = getattr(layer, spec.mixin._kind.layout.attn, None)
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim")):
            raise TypeError(f"layer {i} of {name} has no q_proj/k_proj/v_proj attention (transformers "
                            f"older than {MIN_VERSION}?); supported: {SUPPORTED}")
    return tower, spec


def _num_prefix(tower: nn.Module) -> int:
    emb = tower.embeddings
    return (1 + int(getattr(emb, "distillation_token", None) is not None)
            + int(getattr(getattr(emb, "register_tokens", None), "shape", (0, 0))[1]))


def patch(model: nn.Module, plan: str | ReductionPlan | None = "imagepiece", **knobs: Any) -> nn.Module:
    """Apply a reduction plan to an unpatched transformers model in place and return it."""
    tower, spec = _tower(model)
    depth = len(spec.mixin._kind.layers(tower))
    ctl = Controller(make_plan(plan, depth, **knobs), depth=depth, num_prefix=_num_prefix(tower),
                     has_class_token=True, family="transformers")
    swap_class(tower, spec.mixin)
    tower.imagepiece = ctl
    if spec.head is not None:
        swap_class(model, spec.head)
    model.imagepiece = ctl
    return model


def describe(model: nn.Module) -> ModelInfo:
    """Depth, native input size and token count of a supported model (for the tools)."""
    tower, spec = _tower(model)
    cfg = tower.config
    size = cfg.image_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    gh, gw = _grid(cfg, torch.empty(0, 0, *hw))
    return ModelInfo(len(spec.mixin._kind.layers(tower)), hw, cfg.num_channels, _num_prefix(tower) + gh * gw,
                     (hw[0] // gh, hw[1] // gw))


def limit_forward(model: nn.Module, images: torch.Tensor, tokens: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The limit of a plan on an unpatched model: its tower with the layers on sequences cut to
    ``tokens``; returns the tower's pooled output (the classifier, one linear layer, is left out)."""
    tower, spec = _tower(model)
    kind = spec.mixin._kind
    x = _embed(tower, kind, images, False)
    layers = kind.layers(tower)
    x = cut_blocks(kind.layout, layers, x, tokens, _checkpointing(tower, layers))
    x, pooled = kind.finish(tower, x)
    return x[:, 0] if pooled is None else pooled


def load_pretrained(path: str) -> nn.Module:
    """A supported model from a ``save_pretrained`` folder or a hub id already in the local cache
    (offline): the class named in its config's ``architectures``, in eval mode."""
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = [n for n in (getattr(config, "architectures", None) or []) if n in _TOWERS]
    if not names:
        raise TypeError(f"{path}: architectures {getattr(config, 'architectures', None)} are not "
                        f"supported; supported: {SUPPORTED}")
    cls = getattr(transformers, names[0])
    try:
        return cls.from_pretrained(path, local_files_only=True).eval()
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused, nothing ran
        found = re.search(r"GLOBAL ([\w.]+)|([\w.]+) was not an allowed global", str(e))
        if found is None:  # not a refused class: the bytes are no pickle
            raise ValueError(f"{path}: corrupt or unreadable weights ({type(e).__name__})") from None
        what = found.group(1) or found.group(2)
        raise ValueError(f"{path}: its weights hold Python objects that torch.load(weights_only=True) "
                         f"refuses to unpickle ({what}); imagepiece never runs unsafe pickle. Re-save "
                         "the model with save_pretrained (safetensors)") from None
