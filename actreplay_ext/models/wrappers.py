"""Supported models inside wrappers: torch.compile's `OptimizedModule` (the
model is its `_orig_mod`) and PEFT's `PeftModel` (its `get_base_model()`).

The adapters serve the model inside; hooks on it see every call the wrappers
make of it (an OptimizedModule calls it, compiled; PEFT's `generate` calls
it), except one: the forward of a PEFT tuner (`peft_model.base_model`, a
`BaseTuner` such as `LoraModel`) runs `model.forward` without calling the
model, so hooks on the model miss a forward made through the PeftModel.
`forward_entries` names those tuners, for hooks of their own."""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

__all__ = ["unwrap", "forward_entries", "describe"]


def _inside(module: nn.Module) -> Optional[nn.Module]:
    """The module a wrapper wraps; None for a module that is not a wrapper."""
    compiled = getattr(module, "_orig_mod", None)  # torch.compile(model)
    if isinstance(compiled, nn.Module):
        return compiled
    get_base_model = getattr(module, "get_base_model", None)  # peft.PeftModel (and its task subclasses)
    if callable(get_base_model) and hasattr(module, "peft_config"):
        inner = get_base_model()
        if isinstance(inner, nn.Module) and inner is not module:
            return inner
    return None


def unwrap(model: nn.Module) -> Tuple[nn.Module, List[nn.Module]]:
    """(the model inside any torch.compile and PEFT wrappers, the wrappers from the outside in)."""
    wrappers = []
    inner = _inside(model)
    while inner is not None:
        wrappers.append(model)
        model, inner = inner, _inside(inner)
    return model, wrappers


def forward_entries(model: nn.Module) -> List[nn.Module]:
    """The modules among `model`'s wrappers whose forward runs the wrapped
    model's forward without calling it: PEFT tuners (`BaseTuner.forward` is
    `self.model.forward(...)`)."""
    inner, wrappers = unwrap(model)
    entries = []
    for wrapper in wrappers:
        tuner = getattr(wrapper, "base_model", None) if hasattr(wrapper, "peft_config") else None
        if isinstance(tuner, nn.Module) and tuner is not inner and getattr(tuner, "model", None) is inner:
            entries.append(tuner)
    return entries


def describe(model: nn.Module) -> str:
    """'PeftModelForCausalLM wrapping a Foo': the model's class and what it wraps."""
    inner, wrappers = unwrap(model)
    return " wrapping a ".join(type(m).__name__ for m in (*wrappers, inner))
