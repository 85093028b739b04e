"""Checkpoints: our training checkpoints, timm checkpoints and the official ToMe/EViT releases.

Our checkpoint is a directory written atomically (a temporary sibling directory renamed into
place), holding

- ``model.safetensors``: the weights (and ``ema.safetensors`` with an EMA),
- ``state.pt``: optimizer, scheduler, AMP scaler and RNG states for an exact resume, saved with
  ``torch.save`` but only ever read back with ``torch.load(weights_only=True)``,
- ``meta.json``: epoch, step, metrics and anything else small.

Foreign weights are read with safetensors or ``torch.load(weights_only=True)`` only: a file that
needs arbitrary pickle is refused with an error rather than executed.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_state_dict",
    "find_checkpoint",
    "load_weights",
    "run_meta",
    "run_weights_metadata",
    "save_checkpoint",
    "save_weights",
]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
#: safetensors metadata key under which a weights file exported from a training run keeps that
#: run's ``meta.json`` (JSON), so the file alone says how its inputs were prepared.
RUN_META_KEY = "imagepiece.run"
# Keys under which checkpoints nest their state dict, in the order they are tried: timm train
# scripts (state_dict, state_dict_ema), DeiT/EViT/ToMe releases (model, model_ema), others.
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
_KEYS = ("state_dict", "model", "module", "net")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` reads back from one of our checkpoint directories."""

    path: str
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    state: dict[str, Any] = field(default_factory=dict)


def _tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies: what safetensors accepts."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()
            if isinstance(v, torch.Tensor)}


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (no partial file on error)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix or os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_csv(path: str, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """A CSV of ``rows`` (one column per name in ``fields``), written through :func:`atomic_write`."""
    import csv

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def atomic_savefig(fig: Any, path: str, dpi: int = 120) -> None:
    """Save a matplotlib figure through :func:`atomic_write` (file type from the extension) and
    close it, written or not."""
    import matplotlib.pyplot as plt

    fmt = os.path.splitext(path)[1].lower().lstrip(".") or None
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_weights(path: str, state_dict: Mapping[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Write a state dict as one safetensors file, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    atomic_write(path, lambda tmp: save_file(_tensors(state_dict), tmp, metadata=metadata), ".safetensors")
    return path


def save_checkpoint(directory: str, model: nn.Module | Mapping[str, torch.Tensor], *,
                    meta: dict[str, Any] | None = None, state: dict[str, Any] | None = None,
                    ema: nn.Module | Mapping[str, torch.Tensor] | None = None) -> str:
    """Write a checkpoint directory atomically and return its path.

    Everything goes to a temporary sibling first; the old directory is moved aside and the new
    one renamed into place, so a crash at any moment leaves either the old or the new checkpoint
    complete (``load_checkpoint`` also finds one left aside by a crash between the two renames).
    Temporary folders of earlier killed saves are removed.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(directory)
    tmp = tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(directory))
    point = f"save:{os.path.basename(directory)}"
    try:
        weights = model.state_dict() if isinstance(model, nn.Module) else model
        save_weights(os.path.join(tmp, MODEL_FILE), weights)
        kill_point(f"{point}:weights")
        if ema is not None:
            save_weights(os.path.join(tmp, EMA_FILE), ema.state_dict() if isinstance(ema, nn.Module) else ema)
        if state:
            torch.save(state, os.path.join(tmp, STATE_FILE))
        written = [n for n in (MODEL_FILE, EMA_FILE, STATE_FILE) if os.path.isfile(os.path.join(tmp, n))]
        meta = dict(meta or {}, sha256={n: _sha256(os.path.join(tmp, n)) for n in written})
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
        _swap_into_place(tmp, directory, point)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _swap_into_place(tmp: str, directory: str, point: str) -> None:
    """Rename the complete ``tmp`` to ``directory``, keeping one complete checkpoint at all times.

    ``directory.old`` is only deleted while ``directory`` is complete: when a crash left the
    ``.old`` copy alone, it is the only checkpoint there is, so it is renamed back first.
    """
    old = directory + ".old"
    if not os.path.isdir(directory) and os.path.isdir(old):
        os.replace(old, directory)
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(directory):
        os.replace(directory, old)
    kill_point(f"{point}:renames")
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _tmp_prefix(directory: str) -> str:
    return f".{os.path.basename(directory)}.tmp-"


def _remove_stale_temporaries(directory: str) -> None:
    """Delete ``.NAME.tmp-*`` folders that killed saves of ``directory`` left behind (a run
    folder is locked by one training process, so no other save is writing them)."""
    parent, prefix = os.path.dirname(directory), _tmp_prefix(directory)
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(directory: str, meta: Mapping[str, Any], names: tuple[str, ...]) -> None:
    """Each of ``names`` that ``meta.json`` records a checksum for still has it. Checkpoints
    written before checksums were recorded have none, and load as before."""
    recorded = meta.get("sha256")
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise CheckpointError(f"corrupt {os.path.join(directory, META_FILE)!r}: 'sha256' is not a mapping")
    for name in names:
        path = os.path.join(directory, name)
        if name in recorded and os.path.isfile(path) and _sha256(path) != recorded[name]:
            raise CheckpointError(f"{path!r} does not match the sha256 recorded in {META_FILE} when it was "
                                  "written (the file is corrupt or was changed); restore it from a copy")
        if name in recorded and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {directory!r} has no {name}, which {META_FILE} records")


def find_checkpoint(directory: str) -> str | None:
    """``directory`` when it is a checkpoint, else its ``.old`` copy left by a crash between the
    two renames of :func:`save_checkpoint`, else None."""
    directory = os.path.abspath(os.fspath(directory))
    for candidate in (directory, directory + ".old"):
        if os.path.isdir(candidate):
            return candidate
    return None


def run_meta(path: str | None) -> dict[str, Any]:
    """The ``meta.json`` of an imagepiece training run: model name, kwargs, input size, classes
    and the run's config. Found for a run folder or one of its checkpoint folders, a weights file
    inside a checkpoint folder, and a weights file exported with the run's meta
    (:data:`RUN_META_KEY`). Empty for anything else (foreign weights or folders). Reading only,
    no checksum work."""
    if not path:
        return {}
    if os.path.isfile(path):
        beside = os.path.join(os.path.dirname(path), META_FILE)
        return _read_meta(beside) if os.path.isfile(beside) else _embedded_meta(path)
    if not os.path.isdir(path):
        return {}
    for sub in ("", "checkpoints/best", "checkpoints/last"):
        meta = os.path.join(path, sub, META_FILE)
        if os.path.isfile(meta):
            return _read_meta(meta)
    return {}


def _read_meta(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path!r}: {e}") from None
    return found if isinstance(found, dict) else {}


def _embedded_meta(path: str) -> dict[str, Any]:
    """The run meta a ``.safetensors`` file carries in its header ({} when none or not one)."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(RUN_META_KEY)
    except Exception:  # noqa: BLE001  (not readable here: loading the weights reports it)
        return {}
    try:
        found = json.loads(text) if text else {}
    except ValueError as e:
        raise CheckpointError(f"{path!r}: its {RUN_META_KEY!r} metadata is not JSON: {e}") from None
    return found if isinstance(found, dict) else {}


def run_weights_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata for :func:`save_weights` that keeps a run's ``meta.json``."""
    return {RUN_META_KEY: json.dumps(meta, sort_keys=True)}


_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process the ``N``-th time it reaches
    ``name`` when the environment holds ``IMAGEPIECE_KILL_AT=name@N`` (``@N`` defaults to 1).

    A real kill, so no ``finally`` block or buffered write gets a chance to tidy up.
    """
    spec = os.environ.get("IMAGEPIECE_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise CheckpointError(f"corrupt or unreadable safetensors file {path!r}: "
                              f"{type(e).__name__}: {e}") from None


def _check_zip(path: str) -> None:
    """A ``torch.save`` file (a zip archive) whose entries fail their CRC-32 is corrupt: torch
    itself reads flipped bytes without a word. Older non-zip ``.pth`` files have no CRC."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path!r}: {type(e).__name__}: {e}") from None
    if bad is not None:
        raise CheckpointError(f"corrupt checkpoint {path!r}: its entry {bad!r} fails the CRC-32 check "
                              "(damaged or changed bytes); restore it from a copy")


def _torch_load(path: str) -> Any:
    _check_zip(path)
    try:
        # DeiT/EViT training scripts store their argparse options next to the weights; a
        # Namespace only holds plain values, so it is allowed alongside tensors and builtins.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a refused class: the bytes are not a pickle
            raise CheckpointError(f"corrupt or unreadable checkpoint {path!r}: {_last_line(e)}") from None
        raise CheckpointError(
            f"{path!r} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
            f"({_refused_global(e)}); imagepiece never runs "
            "unsafe pickle. Re-save it as a plain state dict or as .safetensors") from None
    except Exception as e:  # noqa: BLE001  (zip/pickle readers raise many kinds)
        raise CheckpointError(f"corrupt or unreadable checkpoint {path!r}: {type(e).__name__}: {e}") from None


def _last_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip() and "documentation" not in line]
    return lines[-1].strip() if lines else type(e).__name__


def _refused_global(e: Exception) -> str:
    """The class torch refused, e.g. ``__main__.Unsafe was not an allowed global``."""
    import re

    found = re.search(r"([\w.]+ was not an allowed global)", str(e))
    return found.group(1) if found else "unsafe pickle"


def load_checkpoint(directory: str, with_state: bool = True) -> Checkpoint:
    """Read one of our checkpoint directories (``run_dir/checkpoints/last`` or ``best``)."""
    found = find_checkpoint(directory)  # or the .old copy a crash between two renames left
    if found is None:
        raise CheckpointError(f"checkpoint directory {os.path.abspath(directory)!r} does not exist")
    directory = found
    meta_path = os.path.join(directory, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory!r} is not an imagepiece checkpoint: no {META_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {meta_path!r}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt {meta_path!r}: not a JSON object")
    model_path = os.path.join(directory, MODEL_FILE)
    if not os.path.isfile(model_path):
        raise CheckpointError(f"checkpoint {directory!r} has no {MODEL_FILE}")
    ema_path = os.path.join(directory, EMA_FILE)
    state_path = os.path.join(directory, STATE_FILE)
    _verify(directory, meta, (MODEL_FILE, EMA_FILE, STATE_FILE) if with_state else (MODEL_FILE, EMA_FILE))
    state: dict[str, Any] = {}
    if with_state and os.path.isfile(state_path):
        state = _torch_load(state_path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{state_path!r} holds {type(state).__name__}, expected a dict")
    return Checkpoint(
        path=directory, meta=meta, model=_read_safetensors(model_path),
        ema=_read_safetensors(ema_path) if os.path.isfile(ema_path) else None, state=state)


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` of DDP-wrapped saves and the ``_orig_mod.`` of torch.compile."""
    from timm.models import clean_state_dict

    return clean_state_dict(state_dict)


def load_state_dict(path: str, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Model weights from any supported checkpoint as a flat state dict.

    Accepts one of our checkpoint directories (or its run directory), ``.safetensors``, and
    ``.pth``/``.pth.tar``/``.pt``/``.bin`` files holding either a bare state dict or a dict with
    ``state_dict``/``state_dict_ema`` (timm), ``model``/``model_ema`` (DeiT, EViT and ToMe
    releases) entries. ``use_ema`` picks the EMA weights and is an error when there are none.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, META_FILE)):
            for sub in ("checkpoints/best", "checkpoints/last"):
                if find_checkpoint(os.path.join(path, sub)):
                    path = os.path.join(path, sub)
                    break
        ckpt = load_checkpoint(path, with_state=False)
        if use_ema:
            if ckpt.ema is None:
                raise CheckpointError(f"checkpoint {path!r} has no EMA weights ({EMA_FILE})")
            return ckpt.ema
        return ckpt.model
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        if use_ema:
            raise CheckpointError(f"{path!r} is a single safetensors state dict with no EMA weights")
        return _strip_prefix(_read_safetensors(path))
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, expected a state dict or a dict "
                              f"with one of the keys {_KEYS + _EMA_KEYS}")
    keys = _EMA_KEYS if use_ema else _KEYS
    nested = next((k for k in keys if isinstance(obj.get(k), dict)), None)
    if nested is not None:
        obj = obj[nested]
    elif use_ema:
        raise CheckpointError(f"{path!r} has no EMA weights under any of {_EMA_KEYS}; found keys "
                              f"{sorted(obj)[:10]}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path!r} holds no tensors; top-level keys: {sorted(obj)[:10]}")
    return _strip_prefix(tensors)


def load_weights(model: nn.Module, path: str, use_ema: bool = False, strict: bool = True,
                 adapt: bool = True, new_head: bool = False) -> dict[str, list[str]]:
    """Load a checkpoint's weights into ``model`` and report missing/unexpected/dropped keys.

    ``strict`` refuses a checkpoint of another architecture (tensors missing, unexpected or of
    another shape), naming them in a few lines: loading it anyway would leave the missing blocks
    random and give plausible-looking but meaningless numbers. Keys a checkpoint cannot have
    (the zero-initialised local coherence branch of an ``imagepiece_*`` model) may be missing.
    ``new_head`` (fine-tuning to other classes) lets the classifier differ: its tensors of
    another shape are dropped with a warning and keep their initialisation. With ``adapt`` a
    ViT's position embedding is first resampled to the model's grid with timm's
    ``checkpoint_filter_fn``. Always an error when nothing at all matches.
    """
    state = load_state_dict(path, use_ema=use_ema)
    if adapt:
        state = _adapt(model, state)
    own = model.state_dict()
    if not set(state) & set(own):
        raise CheckpointError(f"no weight of {path!r} matches {type(model).__name__}: checkpoint keys "
                              f"{sorted(state)[:5]}..., model keys {sorted(own)[:5]}...")
    heads = _classifier_keys(model, own) if new_head else set()
    reshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
    dropped = [f"{k} {tuple(state[k].shape)}->{tuple(own[k].shape)}" for k in reshaped if k in heads]
    for k in reshaped:
        if k in heads:
            del state[k]
    if dropped:
        warnings.warn(f"not loading {len(dropped)} classifier tensor(s) of another shape from {path!r} "
                      f"(new_head): {dropped}", stacklevel=2)
    missing, unexpected, shapes = _misfit(state, own)
    if strict:
        _refuse_misfit(path, model, state, own, missing, unexpected, heads)
    elif shapes:
        _refuse_misfit(path, model, state, own, [], [], heads)  # load_state_dict cannot load them
    model.load_state_dict(state, strict=False)
    return {"missing": missing, "unexpected": unexpected, "dropped": dropped}


def _classifier_keys(model: nn.Module, own: Mapping[str, torch.Tensor]) -> set[str]:
    """The state-dict keys of the model's classifier(s) (``head``, ``head_dist``, ...)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in own if any(k == n or k.startswith(n + ".") for n in names)}


def _refuse_misfit(path: str, model: nn.Module, state: Mapping[str, torch.Tensor],
                   own: Mapping[str, torch.Tensor], missing: list[str], unexpected: list[str],
                   heads: set[str]) -> None:
    """A few readable lines naming what does not fit, instead of torch's one line per tensor."""
    allowed_missing = {k for k in missing if ".branch." in k or k in heads}
    missing = [k for k in missing if k not in allowed_missing]
    shapes = _misfit(state, own)[2]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint {path!r} does not fit this {type(model).__name__} (another architecture?):"]
    if missing:
        lines.append(f"  {len(missing)} tensor(s) missing: {_summarize(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected: {_summarize(unexpected)}")
    if shapes:
        lines.append(f"  {len(shapes)} of another shape (checkpoint vs model): {_summarize(shapes, 3)}")
    only_head = not (missing or unexpected) and all(s.split(" ")[0] in _classifier_keys(model, own)
                                                    for s in shapes)
    if shapes and only_head and not heads:
        lines.append("  only the classifier differs: to fine-tune to new classes, set finetune_new_head=true")
    raise CheckpointError("\n".join(lines))


def _misfit(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
            ) -> tuple[list[str], list[str], list[str]]:
    """(keys ``state`` lacks, keys the model lacks, ``key (shape) vs (shape)`` of the others that
    differ) between a state dict and a model's state dict ``own``: the one comparison."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and own[k].shape != state[k].shape]
    return missing, unexpected, shapes


def misfit_summary(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """One phrase on how ``state`` differs from a model's state dict ``own``, None when it fits."""
    missing, unexpected, shapes = _misfit(state, own)
    parts = [f"{len(missing)} tensor(s) missing: {_summarize(missing, 3)}" if missing else "",
             f"{len(unexpected)} unexpected: {_summarize(unexpected, 3)}" if unexpected else "",
             f"{len(shapes)} of another shape: {_summarize(shapes, 2)}" if shapes else ""]
    return "; ".join(p for p in parts if p) or None


def _summarize(keys: list[str], limit: int = 6) -> str:
    """``blocks.2.attn.qkv.weight, blocks.2.mlp...`` -> ``blocks.2.*``; at most ``limit`` items."""
    import re

    items: list[str] = []
    for k in keys:
        short = re.sub(r"^(blocks\.\d+)\.\S+", r"\1.*", k)
        if short not in items:
            items.append(short)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _adapt(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter for ViTs (position-embedding resampling, old layouts)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        return state
    try:
        return checkpoint_filter_fn(dict(state), model)
    except Exception as e:  # noqa: BLE001  (a filter failure should name the checkpoint)
        raise CheckpointError(f"cannot adapt the checkpoint to {type(model).__name__}: "
                              f"{type(e).__name__}: {e}") from None
