"""`ReplayHandle`: the hooks one replay mode installs on a model, their
lifecycle, and the per-forward record they share.

Hooks on the model, all removed by `remove()`:
  * a forward pre-hook on the model starts the forward's `ForwardRecord`
    (its prompt, and whether it is a prefill: an empty KV cache), and a forward
    hook (`always_call=True`) drops it when the forward ends, also by an exception;
  * a forward pre-hook on the vision tower records its calls (transformers 5.x
    encodes images in `generate` before the first forward and passes only the
    features, so the base model's pixels are recovered from here);
  * for families whose layer loop carries per-prefill state (Qwen3-VL's
    deepstack features, Gemma 3's per-type masks), a forward pre-hook on the
    module that receives it records it in the forward's record;
  * a forward pre-hook on decoder layer 0 hands each prefill's layer-0 input to
    the mode (`_at_prefill`), which may return it changed;
  * whatever else the mode needs (`_install_mode`).
Forwards the library runs itself (`core.internal_forward`) are left alone.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..core import Prefill, ReplayResult, in_internal_forward, layer_inputs, record_layer_loop
from ..models.calls import cache_length
from ..models.registry import get_adapter
from .record import ForwardRecord, Records

__all__ = ["ReplayHandle", "with_hidden", "hidden_of"]


def hidden_of(args, kwargs) -> torch.Tensor:
    """The hidden-state input of a decoder layer's call."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args, kwargs, hidden):
    """A pre-hook's return value that replaces the layer's hidden-state input."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


class ReplayHandle:
    """The installed hooks of one patched model. Use as a context manager or
    call `remove()`. `last` is the ReplayResult of the latest prompt."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.adapter = get_adapter(model, "model")
        self.last: Optional[ReplayResult] = None
        self._records = Records()
        self._handles = []

    # ------------------------------------------------------------ lifecycle
    def _install(self) -> "ReplayHandle":
        try:
            model = self.model
            self._handles.append(model.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._end, with_kwargs=True, always_call=True))
            tower = self.adapter.vision_tower()
            if tower is not None:
                self._handles.append(tower.register_forward_pre_hook(self._on_vision, with_kwargs=True))
            loop = record_layer_loop(self.adapter, self._on_layer_loop)
            if loop is not None:
                self._handles.append(loop)
            layer0 = self.adapter.decoder_layers()[0]
            self._handles.append(layer0.register_forward_pre_hook(self._on_layer0, with_kwargs=True))
            self._install_mode(self.adapter.decoder_layers())
        except Exception:
            self.remove()
            raise
        return self

    def _install_mode(self, layers) -> None:
        """Hooks of the mode beyond layer 0's."""

    def _hook(self, module: torch.nn.Module, fn) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before patch()."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records.clear()

    def reset(self) -> None:
        """Forget per-conversation state (recorded vision inputs, `last`)."""
        self._records.clear()
        self.last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # ---------------------------------------------------------------- hooks
    def _begin(self, module, args, kwargs):
        if in_internal_forward():
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._records.begin(ForwardRecord(kwargs, ids, cache_length(kwargs) == 0, []))
        return None

    def _end(self, module, args, kwargs, output):
        if not in_internal_forward():
            self._records.end()
        return None

    def _on_vision(self, module, args, kwargs):
        if not in_internal_forward():
            self._records.vision_call((args, dict(kwargs)))
        return None

    def _on_layer_loop(self, between, per_layer):
        rec = self._records.current()
        if rec is not None and not in_internal_forward():
            rec.between, rec.per_layer = between, per_layer

    def _on_layer0(self, module, args, kwargs):
        rec = self._records.current()
        if in_internal_forward() or rec is None or rec.handled or not rec.prefill:
            return None
        rec.handled = True
        if rec.input_ids is None:
            # Without ids the visual positions are unknown: say so rather than
            # generate without replay in silence.
            self.last = ReplayResult(torch.zeros(0, 0), [], [], [], {}, note="no input_ids: nothing replayed")
            warnings.warn("actreplay_ext: a prefill came without input_ids (inputs_embeds only), so the "
                          "visual positions are unknown and nothing was replayed; pass input_ids", stacklevel=2)
            return None
        new = self._at_prefill(rec, hidden_of(args, kwargs), kwargs)
        return None if new is None else with_hidden(args, kwargs, new)

    def _at_prefill(self, rec: ForwardRecord, hidden: torch.Tensor, kwargs) -> Optional[torch.Tensor]:
        """The mode's work at a prefill: the new layer-0 input, or None to keep it."""
        return None

    def _prefill(self, rec: ForwardRecord, hidden: torch.Tensor, kwargs) -> Prefill:
        """This forward's prefill, from its layer-0 call and its record."""
        return Prefill(hidden.detach(), layer_inputs(kwargs, rec.between, rec.per_layer), rec.input_ids,
                       self.adapter.visual_mask(rec.input_ids), rec.kwargs.get("attention_mask"))

    def _current(self) -> Optional[ForwardRecord]:
        """The running forward's record, outside the library's own forwards."""
        return None if in_internal_forward() else self._records.current()
