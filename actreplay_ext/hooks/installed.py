"""What a handle puts into a model's hook dictionaries: `InstalledHook`, which
runs the handle's hook eagerly (torch.compile does not trace into a replay),
and becomes `detached_hook` (a no-op) in a copy of the model, so that
`copy.deepcopy(model)` and `torch.save(model)` of a patched model give an
unpatched copy while the original keeps its hooks."""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["InstalledHook", "detached_hook"]


def detached_hook(*args, **kwargs) -> None:
    """What a copied or unpickled model holds where the original holds a replay
    hook: it changes nothing. Its name is stable: saved models refer to it."""
    return None


class InstalledHook:
    """One hook of a handle, as registered on a model."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable):
        # compiled models (torch.compile) call it as a graph break, not traced
        self._fn = torch.compiler.disable(fn)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __reduce__(self):
        # deepcopy and pickle of the model reach the hook through the model's
        # hook dictionaries: the copy gets a no-op, and the handle (its
        # per-thread state, the base model) is neither copied nor pickled
        return functools.partial, (detached_hook,)
