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
    kwargs: Dict  # the model forward's arguments, positionals bound to their names
    input_ids: Optional[torch.Tensor]
    cache_len: int  # tokens already in the KV cache passed in
    vision_calls: List  # (args, kwargs) of the vision-tower calls that encoded this prompt
    between: Optional[BetweenLayers] = None  # what the layer loop adds between layers in this forward
    per_layer: Optional[LayerKwargs] = None  # the arguments of layers that differ from layer 0's
    pending: Any = None  # what the mode prepared for this forward's layers (offsets, a direct plan)


@dataclasses.dataclass
class Remembered:
    """The latest replayed prompt of a thread. A forward without a cache that
    extends it with text (`generate(use_cache=False)`: every step is the whole
    sequence) gets the same offsets without a new replay; a forward that
    passes the same encoded features again (the prompt once more, an assistant
    model's pass) finds the vision-tower calls that made them here."""

    input_ids: torch.Tensor  # [B, T]
    hidden0: torch.Tensor  # [B, P, D] its layer-0 input up to the last visual token
    result: Any  # the ReplayResult (mode='tokens') or DirectPlan (mode='direct')
    vision_calls: List  # the vision-tower calls of its prompt
    encoded: Any = None  # the encoded features its forward was given (transformers 5.x), by identity

    def encodes(self, encoded) -> bool:
        """`encoded` holds the very feature tensors the remembered prompt's forward was given
        (generate hands a copy of its dict to each forward, and to an assistant model)."""
        if not isinstance(encoded, dict) or not isinstance(self.encoded, dict) or set(encoded) != set(self.encoded):
            return False

        def tensors(out):
            pooled = getattr(out, "pooler_output", out)
            return list(pooled) if isinstance(pooled, (list, tuple)) else [pooled]

        for key, out in encoded.items():
            a, b = tensors(out), tensors(self.encoded[key])
            if len(a) != len(b) or any(x is not y for x, y in zip(a, b)):
                return False
        return True

    def extended_by(self, ids: torch.Tensor, hidden0: torch.Tensor, visual: torch.Tensor) -> bool:
        """`ids` is longer than the remembered prompt and starts with it, its
        layer-0 input starts with the remembered one, and it has no visual
        tokens after them."""
        B, T = self.input_ids.shape
        P = self.hidden0.shape[1]
        return (ids.shape[0] == B and ids.shape[1] > T and hidden0.shape[1] >= P
                and not bool(visual[:, P:].any())
                and torch.equal(ids[:, :T].to(self.input_ids.device), self.input_ids)
                and torch.equal(hidden0[:, :P].to(self.hidden0.device), self.hidden0))


class Records:
    """Per thread: the current forward's record, the vision-tower calls made
    outside any forward (transformers 5.x `generate` encodes images before the
    first one), which the next forward claims, and the latest replayed prompt."""

    def __init__(self):
        self._local = threading.local()
        self._epoch = 0  # forget(): memories of every thread from before are void

    def begin(self, record: ForwardRecord, claims: bool, encoded_calls: int = 0) -> None:
        """Start `record`. A forward that brings visual input (`claims`) takes the
        `encoded_calls` latest vision-tower calls made before it (those that encoded
        the features it was given; 0 when it encodes its own pixels) and drops the
        rest: calls of a generate that failed after encoding, or the user's own
        vision-tower calls, belong to no prompt. An assistant model's text-only pass
        claims nothing and leaves them for the forward they were made for."""
        if claims:
            made_before = self.unclaimed()
            record.vision_calls = (made_before[-encoded_calls:] if encoded_calls > 0 else []) + record.vision_calls
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

    @property
    def remembered(self) -> Optional[Remembered]:
        epoch, memory = getattr(self._local, "remembered", (None, None))
        return memory if epoch == self._epoch else None

    def remember(self, memory: Optional[Remembered]) -> None:
        self._local.remembered = (self._epoch, memory)

    def forget(self) -> None:
        """Drop the remembered prompts of every thread, and this thread's pending state."""
        self._epoch += 1
        self._local.current = None
        self._local.unclaimed = []
