"""Old import paths (before the package was laid out as models/, core/, hooks/,
reference/) keep working with a DeprecationWarning, or fail with an
ImportError that names the new place. Installed on `sys.meta_path` by the
package's __init__; imports nothing until an old path is used."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__all__ = ["install"]

#: Old module -> its new module, for modules that moved whole.
MODULES = {f"actreplay_ext.{m}": f"actreplay_ext.models.{m}"
           for m in ("llava", "llava_onevision", "idefics3", "qwen3_vl", "gemma3")}

#: Old module -> {name: "new.module:name", or an explanation of what replaced it}.
NAMES = {
    "actreplay_ext.adapters": {
        **{n: f"actreplay_ext.models.registry:{n}" for n in ("get_adapter", "register_adapter",
                                                             "supported_families", "check_pair")},
        "ModelAdapter": "actreplay_ext.models.base:ModelAdapter",
        "QwenVLAdapter": "actreplay_ext.models.qwen2_vl:QwenVLAdapter",
        "equality_classes": "actreplay_ext.models.matching:equality_classes",
        "encoded_order": "actreplay_ext.models.matching:encoded_order",
    },
    "actreplay_ext.engine": {
        **{n: f"actreplay_ext.core:{n}" for n in ("ReplayTargets", "ReplayResult", "compute_targets", "optimize",
                                                  "targets_from_prefill", "optimize_from_prefill",
                                                  "AUTO_CHECKPOINT_TOKENS")},
        "apply": "actreplay_ext.hooks:apply",
        "add_offsets": "actreplay_ext.hooks.offsets:add_offsets",
        "_run_layers": "!actreplay_ext.core.run_layers(adapter, hidden, LayerInputs, start, stop, visit) "
                       "replaced it (the kwargs and extras are one LayerInputs, e.g. Prefill.layers.prefix(P))",
    },
    "actreplay_ext.prefill": {
        **{n: f"actreplay_ext.core:{n}" for n in ("Prefill", "capture_prefill", "distinct_rows",
                                                  "internal_forward", "in_internal_forward")},
        **{n: f"actreplay_ext.models.calls:{n}" for n in ("layer_output", "prefix_layer_kwargs", "cache_length",
                                                          "CACHE_KWARGS")},
        "LayerExtras": "!LayerExtras was split into actreplay_ext.models.BetweenLayers (what a layer loop adds "
                       "between layers) and actreplay_ext.models.LayerKwargs (the arguments of layer l)",
        "prefix_extras": "!use Prefill.layers.prefix(P) (actreplay_ext.core.LayerInputs)",
        "frozen_parameters": "!use actreplay_ext.core.loop_autograd(model)",
        "record_extras": "!use actreplay_ext.core.record_layer_loop",
    },
    "actreplay_ext.direct": {n: f"actreplay_ext.core.direct:{n}" for n in ("DirectPlan", "plan_direct", "substitute")},
}

#: Old modules whose names are gone.
GONE = {
    "actreplay_ext.patch": "the module actreplay_ext.patch moved to actreplay_ext.hooks (actreplay_ext.patch is "
                           "the function; ReplayHandle is actreplay_ext.ReplayHandle)",
}


def _shim(old: str) -> types.ModuleType:
    module = types.ModuleType(old, f"Moved: see actreplay_ext.moved ({old}).")
    table = NAMES[old]

    def __getattr__(name):
        where = table.get(name)
        if where is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved; see actreplay_ext.moved)")
        if where.startswith("!"):
            raise ImportError(f"{old}.{name} is gone: {where[1:]}")
        mod, attr = where.split(":")
        return getattr(importlib.import_module(mod), attr)

    module.__getattr__ = __getattr__
    module.__all__ = [n for n, w in table.items() if not w.startswith("!")]
    return module


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in GONE:
            raise ImportError(f"{name}: {GONE[name]}", name=name)
        if name in MODULES or name in NAMES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = MODULES.get(spec.name, "its new modules")
        warnings.warn(f"{spec.name} is deprecated; import from {new} (see actreplay_ext.moved)", DeprecationWarning,
                      stacklevel=2)
        if spec.name in MODULES:
            return importlib.import_module(MODULES[spec.name])
        return _shim(spec.name)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
