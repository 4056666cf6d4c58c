"""Activation Replay (Xing et al., CVPR 2026) for HuggingFace vision-language
models, on fused C++/CUDA logit-lens operators."""

import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

try:
    from . import _C  # registers torch.ops.actreplay
except ModuleNotFoundError as e:  # pragma: no cover - a source tree without the build
    raise ImportError(
        "actreplay_ext: the compiled extension actreplay_ext._C is missing; install the package "
        "(pip install --no-build-isolation .) and import it from outside the source tree"
    ) from e
from . import ops, reference  # noqa: E402
from .adapters import get_adapter, register_adapter, supported_families
from . import llava  # noqa: E402,F401  (registers LlavaAdapter)
from . import llava_onevision  # noqa: E402,F401  (registers LlavaOnevisionAdapter)
from . import idefics3  # noqa: E402,F401  (registers Idefics3Adapter: Idefics3, SmolVLM)
from . import qwen3_vl  # noqa: E402,F401  (registers Qwen3VLAdapter)
from . import gemma3  # noqa: E402,F401  (registers Gemma3Adapter)
from .config import PRESETS, ReplayConfig
from .engine import ReplayResult, ReplayTargets, apply, compute_targets, optimize
from .patch import ReplayHandle, patch

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled extension was built: ``cuda`` (bool), ``cuda_version``,
    ``cuda_archs`` and the ``torch_version`` it was compiled against."""
    return dict(_C.build_info())


__all__ = [
    "PRESETS", "ReplayConfig", "ReplayHandle", "ReplayResult", "ReplayTargets", "apply", "build_info",
    "compute_targets", "get_adapter", "ops", "optimize", "patch", "reference", "register_adapter",
    "supported_families",
]
