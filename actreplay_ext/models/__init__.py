"""Model families: `ModelAdapter` (base.py), the registry (registry.py), the
decoder-layer calling conventions (calls.py), input matching (matching.py),
offloaded weights (offload.py), torch.compile and PEFT wrappers (wrappers.py)
and one module per family. Importing this package imports every other module
in it, and each family module registers its adapter: adding a family is adding
its module."""

import importlib
import pkgutil

from .base import BetweenLayers, LayerKwargs, ModelAdapter, PrefillState
from .registry import check_pair, get_adapter, register_adapter, supported_families

__all__ = ["BetweenLayers", "LayerKwargs", "ModelAdapter", "PrefillState", "check_pair", "get_adapter",
           "register_adapter", "supported_families"]

#: The modules of this package that are not families.
SHARED_MODULES = ("base", "calls", "matching", "offload", "registry", "wrappers")

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")
