"""Activation Replay (Xing et al., CVPR 2026) for HuggingFace vision-language
models, on fused C++/CUDA logit-lens operators.

The package, with imports running one way (tools -> hooks -> core -> models -> ops):
    ops.py, config.py   the operators' Python face; ReplayConfig and presets
    reference/          plain-PyTorch oracles of the ops; ports of the published loops
    models/             ModelAdapter, the registry, one module per family
    core/               results, validation, the layer runner, prefill capture,
                        batching, targets, the optimisation loop, direct mode
    hooks/              patch() and apply(): one handle per mode, per-forward records
    tiny.py             tiny random models from HF configs, for tests and demos
    tools/              the tools around the library: the CLI, Pass@K, ablation,
                        analysis, data files, answer checking (they import the library,
                        never the other way)
    integrations/       lmms-eval's model
"""

import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

try:
    from . import _C  # registers torch.ops.actreplay
except ImportError as e:  # a source tree without the build, whichever ImportError Python raises for it
    import os as _os

    from ._source_tree import import_installed_instead as _import_installed_instead

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _built = any(f.startswith("_C.") for f in _os.listdir(_here))
    # `python -m` from the repository root: the installed package replaces this module in
    # sys.modules (the rest of this file then binds the installed modules, harmlessly)
    if _built or not _import_installed_instead(__name__, _here):
        raise ImportError(
            "actreplay_ext: the compiled extension actreplay_ext._C cannot be imported "
            + (f"({type(e).__name__}: {e}); " if _built else "(it is not built in this source tree); ")
            + "install the package (pip install --no-build-isolation .) and import it from outside the source tree, "
            "or build it in place (python setup.py build_ext --inplace)"
        ) from None
    from . import _C

from . import ops, reference
from .config import PRESETS, ReplayConfig
from .core import ReplayResult, ReplayTargets, compute_targets, optimize
from .hooks import ReplayHandle, apply, patch
from .models import get_adapter, register_adapter, supported_families

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled extension was built: ``cuda`` (bool), ``cuda_version``,
    ``cuda_archs`` and the ``torch_version`` it was compiled against."""
    return dict(_C.build_info())


def __getattr__(name):
    if name == "tiny":  # imported on first use: it needs transformers' model classes
        import importlib

        return importlib.import_module(".tiny", __name__)
    raise AttributeError(f"module 'actreplay_ext' has no attribute {name!r}")


__all__ = [
    "PRESETS", "ReplayConfig", "ReplayHandle", "ReplayResult", "ReplayTargets", "apply", "build_info",
    "compute_targets", "get_adapter", "ops", "optimize", "patch", "reference", "register_adapter",
    "supported_families", "tiny",
]
