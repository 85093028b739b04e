"""What ``imagepiece bench`` times for one variant: a backend (eager PyTorch, ``torch.compile``,
ONNX Runtime's CPU provider) and a mode (an inference call or a full training step).

:func:`build` returns the callable and the seconds its preparation took (compiling or
exporting, and the first call, which is where ``torch.compile`` compiles); it is never part of
the timing. A failure is returned as a one-line reason, so one variant that does not compile or
export does not stop the others.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BACKENDS", "MODES", "build", "inference_context", "train_step"]

BACKENDS = ("eager", "compile", "onnxruntime")

#: The dtypes a variant can be timed in (autocast), by the names every tool accepts.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16"}


def check_dtype(dtype: str) -> str:
    """The canonical name of ``dtype`` (``ValueError`` naming the allowed ones otherwise)."""
    d = str(dtype).strip().lower()
    d = _DTYPE_ALIASES.get(d, d)
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return d
MODES = ("inference", "train")

#: Learning rate of the timed AdamW steps: small, so that random-label steps keep the weights
#: (and so the work per step) sane over many rounds.
TRAIN_LR = 1e-5


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:300]


def _onnxruntime(module: nn.Module, x: torch.Tensor, threads: int) -> Callable:
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, opset_version=17, dynamo=False,
                          input_names=["images"], output_names=["out"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle sessions must not spin on the cores while the next variant runs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor):
        return session.run(None, {"images": images.numpy()})

    return run


def _compile(module: nn.Module, compile_backend: str) -> Callable:
    import torch._dynamo.config as dc

    # Every variant has its own guards on the same forward code: dynamo's default limit of
    # recompilations would silently run the later variants eagerly.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 256))
    return torch.compile(module, backend=compile_backend)


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput: logits (or embeddings) first
        out = out.to_tuple()[0]
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 2 and out.shape[1] > 1:
        return F.cross_entropy(out.float(), target % out.shape[1])
    return out.float().square().mean()


def train_step(module: nn.Module, forward: Callable, autocast: Callable,
               dtype: torch.dtype) -> Callable[[torch.Tensor], None]:
    """One training step of ``module`` through ``forward``: forward under ``autocast()``,
    cross-entropy against fixed random labels, backward (through a GradScaler for fp16), AdamW
    step. ``module`` is put in training mode."""
    from timm.optim import create_optimizer_v2

    module.train()
    opt = create_optimizer_v2(module, opt="adamw", lr=TRAIN_LR, weight_decay=0.05)
    device = next(module.parameters()).device.type
    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    targets: dict[int, torch.Tensor] = {}

    def step(x: torch.Tensor) -> None:
        target = targets.get(x.shape[0])
        if target is None:
            gen = torch.Generator().manual_seed(x.shape[0])
            target = targets[x.shape[0]] = torch.randint(0, 2**20, (x.shape[0],), generator=gen).to(x.device)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = _loss(forward(x), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return step


def build(module: nn.Module, backend: str, mode: str, x: torch.Tensor, threads: int,
          autocast: Callable, dtype: torch.dtype, compile_backend: str = "inductor",
          ) -> tuple[Callable | None, float, str | None]:
    """``(fn, prep_seconds, None)`` with ``fn(x)`` the timed call, or ``(None, seconds, reason)``.

    The first call runs here, in the same context as the timing (inference mode and autocast
    for inference; gradients for training), so compilation never lands in a timed round.
    """
    t0 = time.perf_counter()
    try:
        if backend == "onnxruntime":
            fn: Callable = _onnxruntime(module.eval(), x, threads)
        else:
            fn = _compile(module, compile_backend) if backend == "compile" else module
        if mode == "train":
            fn = train_step(module, fn, autocast, dtype)
            ctx: Any = contextlib.nullcontext()
        else:
            module.eval()
            ctx = inference_context(autocast)
        with ctx:
            fn(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    except Exception as e:  # noqa: BLE001 (compilers and exporters raise anything)
        return None, time.perf_counter() - t0, _reason(e)
    return fn, time.perf_counter() - t0, None


@contextlib.contextmanager
def inference_context(autocast: Callable):
    """``torch.inference_mode()`` and ``autocast()``: the context of timed inference calls."""
    with torch.inference_mode(), autocast():
        yield
