"""What the library changes on a model while it runs it, made safe for models
shared between threads (two patched models with one base, one model in two
threads): captures of one model are serialised (a forward may set state such
as Qwen's rope_deltas, which each capture restores), and the weights stay
frozen and the modules in eval mode until the last concurrent user is done."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator

import torch

__all__ = ["model_lock", "evaluating"]

_lock = threading.Lock()
_locks: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_scopes: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """A re-entrant lock of `model`, for work that saves and restores its state."""
    with _lock:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout; no HF gradient checkpointing, which runs
    only in training) with its weights out of autograd (SPEC §5.6), restored
    when the last of the threads that entered leaves."""
    with _lock:
        entry = _scopes.get(model)
        if entry is None:
            saved = ([(p, p.requires_grad) for p in model.parameters()], [(m, m.training) for m in model.modules()])
            for p, _ in saved[0]:
                p.requires_grad_(False)
            model.eval()
            entry = _scopes[model] = [0, saved]
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                params, modules = entry[1]
                for p, flag in params:
                    p.requires_grad_(flag)
                for m, flag in modules:
                    m.training = flag
                del _scopes[model]
