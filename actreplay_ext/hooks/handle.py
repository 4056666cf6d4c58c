"""`ReplayHandle`: the hooks one replay mode installs on a model, their
lifecycle, and the per-forward record they share.

Hooks on the model, all removed by `remove()`:
  * a forward pre-hook on the model starts the forward's `ForwardRecord` and
    decides what the forward is by what it brings (`_classify`): a multimodal
    prefill (visual placeholder tokens and their images or videos, no KV
    cache) is prepared there, before the model's forward starts, so that the
    library's own forwards never run inside it (where transformers' output
    collectors would record them); a forward hook (`always_call=True`) drops
    the record when the forward ends, also by an exception (the same pair
    on a PEFT tuner wrapping the model, whose forward runs the model's
    forward without calling the model);
  * a forward pre-hook on the vision tower records its calls (transformers 5.x
    encodes images in `generate` before the first forward and passes only the
    features, so the base model's pixels are recovered from here);
  * for families whose layer loop carries per-prefill state (Qwen3-VL's
    deepstack features, Gemma 3's per-type masks), a forward pre-hook on the
    module that receives it records it in the forward's record;
  * the mode's pre-hooks on decoder layers, which apply what was prepared.
Forwards the library runs itself (`core.internal_forward`) are left alone.
A model has at most one live handle: patching it again is an error. The
hooks are `InstalledHook`s: a copy of the model (deepcopy, torch.save) comes
out unpatched. The model's hooks hold the handle and nothing global does, so a
patched model dropped without remove() is freed with its handle and base.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Dict, Optional

import torch

from ..core import (
    Prefill,
    ReplayResult,
    capture_prefill,
    image_hashes,
    in_internal_forward,
    internal_forward,
    record_layer_loop,
    vision_dtype,
)
from ..models.calls import CACHE_KWARGS, bound_kwargs, cache_length
from ..models.registry import get_adapter
from ..models.wrappers import forward_entries
from .installed import InstalledHook
from .record import ForwardRecord, Records

__all__ = ["ReplayHandle", "with_hidden", "hidden_of"]

#: The live handle of each patched model, held weakly: the model's hooks hold the
#: handle, and a patched model dropped without remove() is freed with it.
_LIVE: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_LIVE_LOCK = threading.Lock()

#: Forward arguments that do not describe the prompt (a capture runs without a cache and outputs).
_NOT_PROMPT = (*CACHE_KWARGS, "use_cache", "cache_position", "logits_to_keep", "return_dict", "labels",
               "output_attentions", "output_hidden_states")


def hidden_of(args, kwargs) -> torch.Tensor:
    """The hidden-state input of a decoder layer's call."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args, kwargs, hidden):
    """A pre-hook's return value that replaces the layer's hidden-state input."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


class ReplayHandle:
    """The installed hooks of one patched model, active from construction until
    `remove()`; also a context manager that removes them on leaving the block.
    `last` is the ReplayResult (or note) of the latest prompt, and stays
    readable after `remove()`, which releases the rest: the base model, the
    remembered prompt's tensors, and the handle's hold on the model."""

    layers_of_result = 0  # replay layers, for the notes of prompts that are not replayed

    def __init__(self, model: torch.nn.Module):
        self.adapter = get_adapter(model, "model")
        inner = self.adapter.model  # torch.compile and PEFT wrappers unwrapped
        self._model = weakref.ref(inner)
        self._entries = [inner, *forward_entries(model)]
        self._described = f"{type(inner).__name__} at {id(inner):#x}"
        self.last: Optional[ReplayResult] = None
        self._records = Records()
        self._handles = []
        self._warned = set()

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"<{type(self).__name__} on {self._described}, {state}>"

    @property
    def model(self) -> Optional[torch.nn.Module]:
        """The patched model (the one inside a torch.compile or PEFT wrapper); None
        once the handle is removed and the model freed."""
        return self._model()

    # ------------------------------------------------------------ lifecycle
    def _install(self) -> "ReplayHandle":
        model = self.model
        with _LIVE_LOCK:
            ref = _LIVE.get(model)
            live = ref() if ref is not None else None
            if live is not None and live.active:
                raise RuntimeError(
                    f"actreplay_ext: this {type(model).__name__} already has a live replay handle, {live!r}; "
                    "call its remove() (or leave its with-block) before patch()/apply() again"
                )
            _LIVE[model] = weakref.ref(self)  # weak: the registry must not keep the handle, nor so the model, alive
        try:
            for entry in self._entries:  # the model, and wrappers that run its forward without calling it
                self._register(entry, self._begin, with_kwargs=True)
                self._register(entry, self._end, hook="forward", with_kwargs=True, always_call=True)
            tower = self.adapter.vision_tower()
            if tower is not None:
                self._register(tower, self._on_vision, with_kwargs=True)
            loop = record_layer_loop(self.adapter, self._on_layer_loop, lambda: self._current() is not None,
                                     wrap=InstalledHook)
            if loop is not None:
                self._handles.append(loop)
            self._install_mode(self.adapter.decoder_layers())
        except Exception:
            self.remove()
            raise
        return self

    def _install_mode(self, layers) -> None:
        """Hooks of the mode on the decoder layers."""

    def _hook(self, module: torch.nn.Module, fn) -> None:
        """A forward pre-hook of the mode (with kwargs) on `module`."""
        self._register(module, fn, with_kwargs=True)

    def _register(self, module: torch.nn.Module, fn, hook: str = "forward_pre", **options) -> None:
        register = module.register_forward_pre_hook if hook == "forward_pre" else module.register_forward_hook
        self._handles.append(register(InstalledHook(fn), **options))

    def remove(self) -> None:
        """Remove every hook (the model is exactly as before patch()) and release
        what the handle held for the replay; `last` stays. Calling it again does nothing."""
        for h in self._handles:
            h.remove()
        self._handles = []
        model = self.model
        with _LIVE_LOCK:
            ref = _LIVE.get(model) if model is not None else None
            if ref is not None and ref() in (self, None):
                del _LIVE[model]
        # a handle kept to read `last` must not keep the base model, the prompt's tensors or the model alive
        self._records = Records()
        self._release()
        self.adapter = None
        self._entries = []

    def _release(self) -> None:
        """What the mode drops at remove(): its base model, targets."""

    def reset(self) -> None:
        """Forget per-conversation state (recorded vision inputs, remembered prompts, `last`)."""
        self._records.forget()
        self.last = None

    def __enter__(self):
        if not self.active:
            # a removed handle has let go of its base model: re-entering cannot replay, and must not pass silently
            raise RuntimeError(
                f"actreplay_ext: {self!r} was removed (its with-block ended or remove() was called) and cannot be "
                "entered again; call actreplay_ext.patch(...) or apply(...) for a new handle"
            )
        self._entered = getattr(self, "_entered", 0) + 1
        return self

    def __exit__(self, *exc):
        # nested `with h:` blocks: the outermost one removes the hooks (an inner exit once unpatched the rest
        # of the outer block in silence)
        self._entered = getattr(self, "_entered", 1) - 1
        if self._entered <= 0:
            self.remove()
        return False

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # ---------------------------------------------------------------- hooks
    def _begin(self, module, args, kwargs):
        if in_internal_forward():
            return None
        # bound by the patched model's signature: a wrapper's forward may take (*args, **kwargs)
        kwargs = bound_kwargs(self.adapter.model.forward, args, kwargs)
        rec = ForwardRecord(kwargs, kwargs.get("input_ids"), cache_length(kwargs), [])
        self._records.begin(rec, claims=self.adapter.has_visual_input(kwargs, []),
                            encoded_calls=self.adapter.encoded_calls(kwargs))
        if self._classify(rec) == "prefill":
            self._prepare(rec)
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
        rec = self._current()
        if rec is not None:
            rec.between, rec.per_layer = between, per_layer

    def _current(self) -> Optional[ForwardRecord]:
        """The running forward's record, outside the library's own forwards."""
        return None if in_internal_forward() else self._records.current()

    # ------------------------------------------------------ what a forward is
    def _classify(self, rec: ForwardRecord) -> str:
        """"prefill" (replay it), "decode", or a prompt that is not replayed (with a note and, where something
        the user may not expect happened, one warning per handle and kind)."""
        ids = rec.input_ids
        if ids is None:
            if rec.cache_len:
                return "decode"
            # Without ids the visual positions are unknown: say so rather than generate without replay in silence.
            return self._skip("no input_ids: nothing replayed", warn="a prefill came without input_ids "
                              "(inputs_embeds only), so the visual positions are unknown and nothing was replayed; "
                              "pass input_ids")
        visual = self.adapter.visual_mask(ids)
        n = int(visual.sum())
        brings_images = self.adapter.has_visual_input(rec.kwargs, rec.vision_calls)
        if n == 0 or not brings_images:
            # Over a cache: a decode step, unless several new tokens hold visual ones (a prompt's rest over a
            # prefix cache, whose images transformers 4.57 generate does not even pass on).
            if rec.cache_len and (n == 0 or ids.shape[1] == 1):
                return "decode"
            if rec.cache_len:
                return self._over_cache(ids)
            note = "no visual tokens: nothing replayed" if n == 0 else \
                "visual placeholder tokens without images or videos (no pixels, features or vision-tower call): " \
                "nothing replayed"
            return self._skip(note, rows=ids.shape[0])
        encoded = self.adapter.encoded_visual_rows(rec.kwargs)
        recorded = self.adapter.recorded_visual_tokens(rec.vision_calls) if rec.vision_calls else None
        partial = (encoded is not None and encoded > n) or (bool(recorded) and (n < recorded or n % recorded))
        if rec.cache_len or partial:
            return self._over_cache(ids)
        return "prefill"

    def _over_cache(self, ids) -> str:
        return self._skip(
            "a multimodal prefill over a KV cache: nothing replayed",
            warn="a forward brought visual tokens over a non-empty KV cache or as one chunk of a longer "
                 "prompt (generate(prefill_chunk_size=...), prefix caching, or a continuation passed the "
                 "previous past_key_values), and the replay needs the whole prompt in one forward: nothing was "
                 "replayed; generate without prefill_chunk_size and pass the whole conversation without a cache",
            rows=ids.shape[0])

    def _skip(self, note: str, warn: Optional[str] = None, rows: int = 0) -> str:
        self.last = ReplayResult(torch.zeros(0, 0), [], [0] * self.layers_of_result, [0] * rows, {}, note=note)
        if warn is not None and warn not in self._warned:
            self._warned.add(warn)
            warnings.warn(f"actreplay_ext: {warn}", stacklevel=4)
        return "skip"

    def _prepare(self, rec: ForwardRecord) -> None:
        """The mode's work at a multimodal prefill, before the model's forward; it
        leaves what the decoder-layer hooks apply in `rec.pending`."""

    def _capture(self, rec: ForwardRecord) -> Prefill:
        """This forward's prefill, as the model is about to build it (a capture)."""
        inputs: Dict = {k: v for k, v in rec.kwargs.items() if k not in _NOT_PROMPT and v is not None}
        with internal_forward():
            pre = capture_prefill(self.adapter, inputs)
        if pre.images is None:
            pre.images = self._images(rec)
        return pre

    def _images(self, rec: ForwardRecord):
        """The hashes of this forward's pixels (core/images.py): from its arguments, or
        (transformers 5 encodes them before the forward) from the vision tower's calls."""
        dtype = vision_dtype(self.adapter)
        images = image_hashes(rec.kwargs, dtype)
        if images is None and rec.vision_calls:
            try:
                images = image_hashes(self.adapter.prompt_from_forward(rec.kwargs, rec.vision_calls), dtype)
            except RuntimeError:  # the calls cannot be matched to the rows: nothing to compare
                return None
        return images
