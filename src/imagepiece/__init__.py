"""imagepiece: ImagePiece, EViT and ToMe token reduction for timm and transformers Vision Transformers.

>>> import timm, imagepiece
>>> model = timm.create_model("deit_small_patch16_224")
>>> imagepiece.patch(model, "imagepiece", keep_rate=0.7)  # doctest: +SKIP
"""

from . import models  # noqa: F401  (registers the imagepiece_* names with timm)
from .coherence import add_coherence
from .patch import BlockTrace, Controller, is_patched, patch, supported_models, unpatch
from .plan import (
    PRESETS,
    Merge,
    Prune,
    ReductionPlan,
    Retokenize,
    keep_rate_warmup,
    make_plan,
    tome_schedule,
)


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagepiece")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "PRESETS",
    "BlockTrace",
    "Controller",
    "Merge",
    "Prune",
    "ReductionPlan",
    "Retokenize",
    "add_coherence",
    "is_patched",
    "keep_rate_warmup",
    "make_plan",
    "patch",
    "supported_models",
    "tome_schedule",
    "unpatch",
]
