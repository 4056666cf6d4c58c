"""Model families: `ModelAdapter` (base.py), the registry (registry.py), the
decoder-layer calling conventions (calls.py), input matching (matching.py)
and one module per family. Importing this package registers every family."""

from . import gemma3, idefics3, llava, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401  (each registers itself)
from .base import BetweenLayers, LayerKwargs, ModelAdapter, PrefillState
from .registry import check_pair, get_adapter, register_adapter, supported_families

__all__ = ["BetweenLayers", "LayerKwargs", "ModelAdapter", "PrefillState", "check_pair", "get_adapter",
           "register_adapter", "supported_families"]
