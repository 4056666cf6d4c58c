"""The prefill as the replay loop sees it: the input of decoder layer 0 (merged
text and vision embeddings) and what every decoder layer receives
(`LayerInputs`), captured once per prompt so that the loop can run the
decoder layers alone (SPEC §5.1-5.3)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Dict, List, Optional

import torch

from ..models.base import BetweenLayers, LayerKwargs, ModelAdapter
from ..models.calls import CACHE_KWARGS, cache_length
from .images import image_hashes, vision_dtype
from .layers import LayerInputs
from .reentry import internal_forward
from .shared import evaluating, model_lock

__all__ = ["Prefill", "capture_prefill", "layer_inputs", "record_layer_loop"]


@dataclasses.dataclass
class Prefill:
    hidden0: torch.Tensor  # [B, T, D] input of decoder layer 0
    layers: LayerInputs  # what the decoder layers take besides the hidden state
    input_ids: torch.Tensor  # [B, T]
    visual: torch.Tensor  # [B, T] bool, visual placeholder positions
    attention_mask: Optional[torch.Tensor] = None  # [B, T] 1 = token, 0 = padding
    images: Optional[torch.Tensor] = None  # hashes of the pixels (images.image_hashes), None when unseen

    @property
    def prefix_len(self) -> int:
        """Length of the prefix that ends at the last visual token of any row."""
        cols = self.visual.any(0).nonzero()
        return int(cols[-1]) + 1 if cols.numel() else 0

    def visual_rows(self) -> List[int]:
        return [int(n) for n in self.visual.sum(1)]


def layer_inputs(kwargs: Dict, between: Optional[BetweenLayers] = None,
                 per_layer: Optional[LayerKwargs] = None) -> LayerInputs:
    """LayerInputs from a call of decoder layer 0 and the recorded layer-loop call."""
    return LayerInputs({k: v for k, v in kwargs.items() if k != "hidden_states"}, between, per_layer)


def record_layer_loop(adapter: ModelAdapter, store: Callable[[Optional[BetweenLayers], Optional[LayerKwargs]], None],
                      active: Callable[[], bool] = lambda: True, wrap: Callable = lambda hook: hook):
    """A forward pre-hook on the adapter's layer-loop module that hands what each
    of its calls carries to `store(between, per_layer)` whenever `active()`;
    None when the family has none. `wrap(hook)` is what is registered (a
    handle's hooks are wrapped to stay out of copies of the model)."""
    module = adapter.layer_loop_module()
    if module is None:
        return None

    def hook(mod, args, kwargs):
        if active():
            call = adapter.layer_loop_call(args, kwargs)
            store(adapter.between_layers_from_call(call), adapter.layer_kwargs_from_call(call))

    return module.register_forward_pre_hook(wrap(hook), with_kwargs=True)


class _StopForward(Exception):
    """Raised from a hook once the forward has produced what we need."""


def _check_no_cache(inputs: Dict) -> None:
    """The replay reads the prompt's activations from position 0: a prompt that continues from a
    KV cache would be read from the cache's positions on (offsets learned some 0.03 off)."""
    for key in CACHE_KWARGS:
        cache = inputs.get(key)
        if cache is None or (isinstance(cache, (tuple, list)) and not cache):
            continue
        n = cache_length({key: cache}) if hasattr(cache, "get_seq_length") else None
        if n != 0:  # a Cache holding positions, or a kind whose length cannot be told (legacy tuples)
            held = f"holds {n} cached positions" if n is not None else f"is a {type(cache).__name__}"
            raise ValueError(f"actreplay_ext: argument 'inputs' carries a KV cache ('{key}' {held}); the replay "
                             "reads the whole prompt from position 0: pass the prompt without it")


def capture_prefill(adapter: ModelAdapter, inputs: Dict) -> Prefill:
    """Run `model(**inputs)` only as far as the input of decoder layer 0 (the
    vision tower and embedding merge run; no decoder layer does) and return it.
    The model's mutable state (e.g. Qwen's rope_deltas) is left as it was."""
    _check_no_cache(inputs)
    fwd = adapter.forward_inputs(inputs)
    fwd.pop("use_cache", None)
    if fwd.get("input_ids") is None:
        raise ValueError(
            "actreplay_ext: argument 'inputs' needs 'input_ids' (the visual placeholder tokens "
            "locate the positions to replay); got keys " + ", ".join(sorted(inputs))
        )
    seen: Dict = {}
    me = threading.get_ident()  # the hooks act for this capture only, not another thread's forward

    def grab(module, args, kwargs):
        if threading.get_ident() == me:
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            seen["kwargs"] = kwargs
            raise _StopForward

    def store(between, per_layer):
        seen["loop"] = (between, per_layer)

    with model_lock(adapter.model), evaluating(adapter.model):
        state = adapter.model_state()
        # prepend: layer 0's input before any pre-hook of the user's, whose hooks then run once, when the
        # library's passes call the layer (as in the model's own forward), not once here and again there
        handles = [adapter.decoder_layers()[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)]
        try:
            handles.append(record_layer_loop(adapter, store, lambda: threading.get_ident() == me))
            with torch.no_grad(), internal_forward():
                adapter.model(**fwd, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                if handle is not None:
                    handle.remove()
            adapter.restore_state(state)
    if "hidden" not in seen:
        raise RuntimeError("actreplay_ext: the forward pass never reached decoder layer 0")
    ids = fwd["input_ids"]
    return Prefill(seen["hidden"], layer_inputs(seen["kwargs"], *seen.get("loop", ())), ids, adapter.visual_mask(ids),
                   fwd.get("attention_mask"), image_hashes(inputs, vision_dtype(adapter)))
