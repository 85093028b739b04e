"""The measuring instruments, one home for every tool that times or counts (``bench``,
``evaluate``, the studies): interleaved timing (:func:`time_interleaved`), GMAC counting
(:func:`count_gmacs`), a plan's limit (:class:`LimitViT`), busy-machine detection
(:class:`BusyMonitor`) and the backends a variant is timed through (eager, ``torch.compile``,
ONNX Runtime; :func:`build`).

Layering: this package uses the patch layer (for the limit) and nothing above it; the tools
import from here. Submodules: :mod:`.timing`, :mod:`.gmacs`, :mod:`.limit`, :mod:`.busy`,
:mod:`.backends`.
"""

from .backends import BACKENDS, DTYPES, MODES, build, check_dtype, inference_context, train_step
from .busy import BusyMonitor, BusyReport
from .gmacs import count_gmacs
from .limit import LimitViT
from .timing import (
    machine_info,
    paired_ratio_interval,
    peak_memory,
    quantiles,
    steady_allocator,
    time_interleaved,
)

__all__ = [
    "BACKENDS",
    "DTYPES",
    "MODES",
    "BusyMonitor",
    "BusyReport",
    "LimitViT",
    "build",
    "check_dtype",
    "count_gmacs",
    "inference_context",
    "machine_info",
    "paired_ratio_interval",
    "peak_memory",
    "quantiles",
    "steady_allocator",
    "time_interleaved",
    "train_step",
]
