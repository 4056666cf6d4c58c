"""The state of one forward of a patched model. A `ForwardRecord` is created by
the model's forward pre-hook and dropped by its forward hook (which runs also
when the forward raises), so nothing of a finished or failed forward can reach
the next one. Records are per thread: two threads may run one patched model."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Dict, List, Optional

import torch

from ..models.base import BetweenLayers, LayerKwargs

__all__ = ["ForwardRecord", "Records"]


@dataclasses.dataclass
class ForwardRecord:
    kwargs: Dict  # the model forward's keyword arguments
    input_ids: Optional[torch.Tensor]
    prefill: bool  # an empty KV cache
    vision_calls: List  # (args, kwargs) of the vision-tower calls that encoded this prompt
    between: Optional[BetweenLayers] = None  # what the layer loop adds between layers in this forward
    per_layer: Optional[LayerKwargs] = None  # the arguments of layers that differ from layer 0's
    handled: bool = False  # layer 0 of this forward has been seen
    pending: Any = None  # mode-specific work for deeper layers of this forward (offsets, a direct plan)


class Records:
    """The current forward's record, and the vision-tower calls made outside any
    forward (transformers 5.x `generate` encodes images before the first one),
    which the next forward claims; both per thread."""

    def __init__(self):
        self._local = threading.local()

    def begin(self, record: ForwardRecord) -> None:
        record.vision_calls = self.unclaimed() + record.vision_calls
        self._local.unclaimed = []
        self._local.current = record  # replaces anything a BaseException left behind

    def end(self) -> None:
        self._local.current = None

    def current(self) -> Optional[ForwardRecord]:
        return getattr(self._local, "current", None)

    def unclaimed(self) -> List:
        return list(getattr(self._local, "unclaimed", []))

    def vision_call(self, call) -> None:
        rec = self.current()
        if rec is not None:
            rec.vision_calls.append(call)
        else:
            self._local.unclaimed = self.unclaimed() + [call]

    def clear(self) -> None:
        self._local.current = None
        self._local.unclaimed = []
