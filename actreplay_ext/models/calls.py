"""How HuggingFace decoder layers are called, across transformers 4.57.x and
5.x: the names of their cache keyword, what they return, which dimension of
each keyword argument is the batch, and how a prefill's arguments are cut to a
prefix of its positions (SPEC §5.3)."""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ["CACHE_KWARGS", "ROTARY_KWARGS", "cache_length", "layer_output", "prefix_layer_kwargs", "batch_dim",
           "kwarg_tensors", "bound_kwargs"]

#: Names the KV cache goes by in decoder-layer and model forwards across
#: transformers versions (5.24 renamed past_key_values to cache).
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")

#: Rotary-table keywords of decoder layers: 4.57's Gemma 3 layers take a global
#: and a local table and pick by their attention type.
ROTARY_KWARGS = ("position_embeddings", "position_embeddings_global", "position_embeddings_local")


def cache_length(kwargs: Dict) -> int:
    """Tokens already in the KV cache passed in `kwargs` (0 without a cache)."""
    for key in CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def layer_output(out):
    """Decoder layers return a tuple in transformers 4.57 and a tensor in 5.x."""
    return out[0] if isinstance(out, tuple) else out


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
    for key in ROTARY_KWARGS:  # (cos, sin) rotary tables [..., T, d]
        pe = out.get(key)
        if isinstance(pe, (tuple, list)):
            out[key] = tuple(t[..., :P, :] for t in pe)
    for key in ("position_ids", "cache_position"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key][..., :P]
    return out


def batch_dim(key: str, t: torch.Tensor) -> Optional[int]:
    """Batch dimension of a decoder-layer kwarg: attention masks [B, ...],
    position ids [B, T] or [3, B, T], rotary tables [B, T, d] or [3, B, T, d];
    None when unknown."""
    if key == "attention_mask":
        return 0
    if key == "position_ids":
        return t.dim() - 2
    if key in ROTARY_KWARGS:
        return t.dim() - 3
    return None


def kwarg_tensors(kwargs: Dict) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, tensor) for every tensor among `kwargs`' values, inside tuples too."""
    for key, v in kwargs.items():
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor):
                yield key, t


def bound_kwargs(forward: Callable, args: tuple, kwargs: Dict) -> Dict:
    """A call's arguments as keywords (positionals bound by `forward`'s signature)."""
    if not args:
        return dict(kwargs)
    params = inspect.signature(forward).parameters
    bound = dict(inspect.signature(forward).bind_partial(*args, **kwargs).arguments)
    for name, p in params.items():  # **kwargs of the signature: back to the top level
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return bound
