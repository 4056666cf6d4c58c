"""Which adapter serves which model class: `register_adapter`, `get_adapter`,
`supported_families`, and `check_pair` for a base/RLVR pair. A model inside a
torch.compile or PEFT wrapper is served by its own family's adapter (wrappers.py)."""

from __future__ import annotations

from typing import Dict, List, Tuple, Type

from torch import nn

from .base import ModelAdapter
from .wrappers import describe, unwrap

__all__ = ["register_adapter", "get_adapter", "supported_families", "check_pair"]

_REGISTRY: Dict[str, Type[ModelAdapter]] = {}


def register_adapter(cls: Type[ModelAdapter]) -> Type[ModelAdapter]:
    for name in cls.model_classes:
        _REGISTRY[name] = cls
    return cls


def supported_families() -> List[str]:
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module, argument: str = "model") -> ModelAdapter:
    """The adapter of `model`, or of the model inside its torch.compile or PEFT wrappers."""
    inner, _ = unwrap(model)
    cls = _REGISTRY.get(type(inner).__name__)
    if cls is None:
        raise TypeError(
            f"actreplay_ext: argument '{argument}' is a {describe(model)}, which is not a supported model family; "
            f"supported: {', '.join(supported_families())} (see the README on adding an adapter)"
        )
    return cls(inner)


def check_pair(rlvr: ModelAdapter, base: ModelAdapter) -> None:
    """Base and RLVR models must share the architecture the method relies on:
    the same model class (a Qwen2-VL base does not pair with a Qwen2.5-VL RLVR
    model, however alike their sizes), widths, depth and visual token ids."""
    checks: List[Tuple[str, object, object]] = [
        ("model class", type(rlvr.model).__name__, type(base.model).__name__),
        ("hidden size", rlvr.hidden_size, base.hidden_size),
        ("vocabulary size", rlvr.vocab_size, base.vocab_size),
        ("number of decoder layers", rlvr.num_layers, base.num_layers),
        ("visual token ids", rlvr.visual_token_ids(), base.visual_token_ids()),
    ]
    for what, a, b in checks:
        if a != b:
            raise ValueError(
                f"actreplay_ext: the RLVR and base models differ in {what}: RLVR has {a}, base has {b}; "
                "Activation Replay needs a base model and the RLVR model post-trained from it"
            )
