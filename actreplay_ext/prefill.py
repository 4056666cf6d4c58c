"""The prefill as the replay loop sees it: the input of decoder layer 0 (merged
text and vision embeddings) and the keyword arguments every decoder layer
receives (masks, rotary embeddings, position ids), captured once per prompt so
the loop can run the decoder layers alone (SPEC §5.1-5.3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Dict, Iterator, List, Optional

import torch

from .adapters import ModelAdapter

__all__ = ["Prefill", "LayerExtras", "capture_prefill", "prefix_layer_kwargs", "prefix_extras", "layer_output",
           "frozen_parameters", "record_extras"]


_internal = threading.local()


def in_internal_forward() -> bool:
    """True inside a forward pass that the library itself runs."""
    return getattr(_internal, "depth", 0) > 0


@contextlib.contextmanager
def internal_forward() -> Iterator[None]:
    """Marks forwards run by the library, so that patch() hooks stay out of them."""
    _internal.depth = getattr(_internal, "depth", 0) + 1
    try:
        yield
    finally:
        _internal.depth -= 1


#: Names the KV cache goes by in decoder-layer and model forwards across
#: transformers versions (5.24 renamed past_key_values to cache).
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def cache_length(kwargs: Dict) -> int:
    """Tokens already in the KV cache passed in `kwargs` (0 without a cache)."""
    for key in CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


class _StopForward(Exception):
    """Raised from a hook once the forward has produced what we need."""


class LayerExtras:
    """Per-prefill state that a model's own layer loop adds to the residual
    stream *between* decoder layers, which running the decoder layers alone
    must reproduce (Qwen3-VL adds its deepstack visual features after the first
    decoder layers). The adapter builds it from a recorded forward call
    (`ModelAdapter.extras_module` / `extras_from_call`); families without such
    state have none (`Prefill.extras is None`), and this base class adds nothing.

    The residual stream leaving decoder layer l, h_out(l), is what
    `after_layer(l, layer_output)` returns: the input of layer l + 1.

    The same record also carries what the model's layer loop passes to some
    layers but not to layer 0: the loop captures layer 0's keyword arguments
    only, and `layer_kwargs(l, kwargs)` turns them into layer l's (Gemma 3
    gives its sliding-window and full-attention layers different masks and
    rotary tables). The default: every layer gets layer 0's."""

    def layer_kwargs(self, layer: int, kwargs: Dict) -> Dict:
        """The keyword arguments of decoder layer `layer`, given layer 0's
        (`kwargs`, already cut to the prefix the loop runs on; this record's
        own tensors are cut by `prefix`). Not modified in place."""
        return kwargs

    def after_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [B, T, D], the return value of decoder layer `layer`, as the
        next layer receives it. Out of place (the loop differentiates through it)."""
        return hidden

    def prefix(self, P: int) -> "LayerExtras":
        """The extras of the prefix of the first P positions (SPEC §5.3)."""
        return self

    def rows(self, index: List[int]) -> "LayerExtras":
        """The extras of batch rows `index`, in that order."""
        return self

    def same_rows(self, a: int, b: int) -> bool:
        """Whether rows a and b carry equal extras (see `distinct_rows`)."""
        return True


@dataclasses.dataclass
class Prefill:
    hidden0: torch.Tensor  # [B, T, D] input of decoder layer 0
    layer_kwargs: Dict  # keyword arguments of decoder layer 0 in this forward (others: extras.layer_kwargs)
    input_ids: torch.Tensor  # [B, T]
    visual: torch.Tensor  # [B, T] bool, visual placeholder positions
    attention_mask: Optional[torch.Tensor] = None  # [B, T] 1 = token, 0 = padding
    extras: Optional[LayerExtras] = None  # what the layer loop adds between layers (None: nothing)

    @property
    def prefix_len(self) -> int:
        """Length of the prefix that ends at the last visual token of any row."""
        cols = self.visual.any(0).nonzero()
        return int(cols[-1]) + 1 if cols.numel() else 0

    def visual_rows(self) -> List[int]:
        return [int(n) for n in self.visual.sum(1)]


def layer_output(out):
    """Decoder layers return a tuple in transformers 4.57 and a tensor in 5.x."""
    return out[0] if isinstance(out, tuple) else out


def record_extras(adapter: ModelAdapter, store: Callable[[Optional[LayerExtras]], None]):
    """A forward pre-hook on the adapter's extras module that hands the
    extras of each of its calls to `store`; None when the family has none."""
    module = adapter.extras_module()
    if module is None:
        return None

    def hook(mod, args, kwargs):
        store(adapter.extras_from_call(args, kwargs))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def capture_prefill(adapter: ModelAdapter, inputs: Dict) -> Prefill:
    """Run `model(**inputs)` only as far as the input of decoder layer 0 (the
    vision tower and embedding merge run; no decoder layer does) and return it.
    The model's mutable state (e.g. Qwen's rope_deltas) is left as it was."""
    model = adapter.model
    fwd = adapter.forward_inputs(inputs)
    fwd.pop("use_cache", None)
    if fwd.get("input_ids") is None:
        raise ValueError(
            "actreplay_ext: argument 'inputs' needs 'input_ids' (the visual placeholder tokens "
            "locate the positions to replay); got keys " + ", ".join(sorted(inputs))
        )
    seen: Dict = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    state = adapter.model_state()
    handles = [adapter.decoder_layers()[0].register_forward_pre_hook(grab, with_kwargs=True)]
    try:
        handles.append(record_extras(adapter, lambda extras: seen.__setitem__("extras", extras)))
        with torch.no_grad(), internal_forward():
            model(**fwd, use_cache=False)
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
    return Prefill(seen["hidden"], seen["kwargs"], ids, adapter.visual_mask(ids), fwd.get("attention_mask"),
                   seen.get("extras"))


#: Rotary-table keywords of decoder layers: 4.57's Gemma 3 layers take a global
#: and a local table and pick by their attention type.
_ROTARY_KWARGS = ("position_embeddings", "position_embeddings_global", "position_embeddings_local")


def prefix_layer_kwargs(kwargs: Dict, P: int) -> Dict:
    """The decoder-layer kwargs of a full prefill, cut to its first P positions,
    without a KV cache. Under causal attention positions < P see only positions
    < P, so the prefix activations are unchanged (SPEC §5.3)."""
    out = dict(kwargs)
    for key in CACHE_KWARGS:
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    if "output_attentions" in out:
        out["output_attentions"] = False
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        out["attention_mask"] = mask[..., :P, :P] if mask.dim() == 4 else mask[..., :P]
    for key in _ROTARY_KWARGS:  # (cos, sin) rotary tables [..., T, d]
        pe = out.get(key)
        if isinstance(pe, (tuple, list)):
            out[key] = tuple(t[..., :P, :] for t in pe)
    for key in ("position_ids", "cache_position"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key][..., :P]
    return out


def prefix_extras(pre: Prefill, P: int) -> Optional[LayerExtras]:
    """The prefill's between-layer extras cut to its first P positions."""
    return None if pre.extras is None else pre.extras.prefix(P)


def _batch_dim(key: str, t: torch.Tensor) -> Optional[int]:
    """Batch dimension of a decoder-layer kwarg: attention masks [B, ...],
    position ids [B, T] or [3, B, T], rotary tables [B, T, d] or [3, B, T, d]."""
    if key == "attention_mask":
        return 0
    if key == "position_ids":
        return t.dim() - 2
    if key in _ROTARY_KWARGS:
        return t.dim() - 3
    return None


def _kwarg_tensors(kwargs: Dict):
    for key, v in kwargs.items():
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor):
                yield key, t


def distinct_rows(pre: Prefill):
    """(the prefill reduced to its distinct rows, for each row the index of its
    distinct row). Rows are the same when their ids, layer-0 inputs and layer
    kwargs are equal, as for Pass@K sampling, which expands one prompt K times
    (SPEC §5.7). A kwarg whose batch dimension is unknown disables the reduction."""
    B = pre.hidden0.shape[0]
    if B == 1:
        return pre, [0]
    tensors = list(_kwarg_tensors(pre.layer_kwargs))
    for key, t in tensors:
        if _batch_dim(key, t) is None and key not in ("cache_position",) and t.dim() and t.shape[0] == B:
            return pre, list(range(B))

    def same(a: int, b: int) -> bool:
        if not (torch.equal(pre.input_ids[a], pre.input_ids[b]) and torch.equal(pre.hidden0[a], pre.hidden0[b])):
            return False
        if pre.extras is not None and not pre.extras.same_rows(a, b):
            return False
        for key, t in tensors:
            d = _batch_dim(key, t)
            if d is not None and t.shape[d] == B and not torch.equal(t.select(d, a), t.select(d, b)):
                return False
        return True

    reps: List[int] = []
    row_map: List[int] = []
    for b in range(B):
        j = next((j for j, r in enumerate(reps) if same(b, r)), None)
        if j is None:
            reps.append(b)
            j = len(reps) - 1
        row_map.append(j)
    if len(reps) == B:
        return pre, row_map
    idx = torch.tensor(reps, device=pre.hidden0.device)

    def pick(key, t):
        d = _batch_dim(key, t)
        return t.index_select(d, idx.to(t.device)) if d is not None and t.shape[d] == B else t

    kwargs = {}
    for key, v in pre.layer_kwargs.items():
        if isinstance(v, torch.Tensor):
            kwargs[key] = pick(key, v)
        elif isinstance(v, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in v):
            kwargs[key] = type(v)(pick(key, t) for t in v)
        else:
            kwargs[key] = v
    mask = pre.attention_mask
    reduced = Prefill(pre.hidden0.index_select(0, idx), kwargs,
                      pre.input_ids.index_select(0, idx.to(pre.input_ids.device)),
                      pre.visual.index_select(0, idx.to(pre.visual.device)),
                      None if mask is None else mask.index_select(0, idx.to(mask.device)),
                      None if pre.extras is None else pre.extras.rows(reps))
    return reduced, row_map


@contextlib.contextmanager
def frozen_parameters(*models: torch.nn.Module) -> Iterator[None]:
    """Model weights take no part in autograd (SPEC §5.6); flags restored after."""
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
