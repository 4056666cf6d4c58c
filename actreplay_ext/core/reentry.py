"""The re-entry guard: forwards the library runs itself (the base pass, the
replay loop, prefill captures) are marked, per thread, so that the hooks
`patch()` installs stay out of them."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["internal_forward", "in_internal_forward"]

_internal = threading.local()


def in_internal_forward() -> bool:
    """True inside a forward pass that the library itself runs (in this thread)."""
    return getattr(_internal, "depth", 0) > 0


@contextlib.contextmanager
def internal_forward() -> Iterator[None]:
    """Marks forwards run by the library, so that patch() hooks stay out of them."""
    _internal.depth = getattr(_internal, "depth", 0) + 1
    try:
        yield
    finally:
        _internal.depth -= 1
