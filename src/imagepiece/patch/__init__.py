"""Model-family integrations. Each family lives in one module; timm's ViT is in ``timm.py``."""

from .timm import BlockTrace, Controller, is_patched, patch, supported_models, unpatch

__all__ = ["BlockTrace", "Controller", "is_patched", "patch", "supported_models", "unpatch"]
