"""``imagepiece train``: the DeiT recipe from timm's pieces, on one process or under torchrun.

Defaults are DeiT's (RandAugment m9, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, random
erasing 0.25, AdamW lr 5e-4 x global batch / 512, weight decay 0.05, cosine with 5 warm-up
epochs, drop path 0.1) and EViT's keep-rate warm-up (docs/methods.md). Every default is a field of
:class:`TrainConfig`, overridable from a YAML file and the command line; every value is type-
and range-checked before any work, and the resolved config is saved in the run directory. A
checkpoint is written after every epoch, and ``resume`` restores model, optimizer, scheduler,
EMA, AMP scaler, step counters and every process's RNG state, so a killed run continues with
the same data order and ends with the same weights. A run folder is locked while a run uses it
and is never silently reused.

The package splits by concern: :mod:`.config` (options), :mod:`.build` (model, data,
optimisation), :mod:`.run_folder` (claim, lock, config and log), :mod:`.resume` (exact
continuation) and :mod:`.loop` (the recipe).
"""

from ..distributed import DistInfo, setup_distributed
from .build import create_model
from .config import FIXED_ON_RESUME, ConfigError, TrainConfig, parse_set, resolve_config, resume_config
from .loop import train

__all__ = ["FIXED_ON_RESUME", "ConfigError", "DistInfo", "TrainConfig", "create_model", "parse_set",
           "resolve_config", "resume_config", "setup_distributed", "train"]
