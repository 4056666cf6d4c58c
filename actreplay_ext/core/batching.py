"""Identical rows of a batch are optimised once (SPEC §5.7): Pass@K sampling
expands one prompt K times."""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..models.calls import batch_dim, kwarg_tensors
from ..models.matching import first_appearance
from .prefill import Prefill

__all__ = ["distinct_rows"]


def distinct_rows(pre: Prefill) -> Tuple[Prefill, List[int]]:
    """(the prefill reduced to its distinct rows, for each row the index of its
    distinct row). Rows are the same when their ids, layer-0 inputs and layer
    inputs are equal. A kwarg whose batch dimension is unknown disables the reduction."""
    B = pre.hidden0.shape[0]
    if B == 1:
        return pre, [0]
    tensors = list(kwarg_tensors(pre.layers.kwargs))
    for key, t in tensors:
        if batch_dim(key, t) is None and key != "cache_position" and t.dim() and t.shape[0] == B:
            return pre, list(range(B))
    between, per_layer = pre.layers.between, pre.layers.per_layer

    def same(a: int, b: int) -> bool:
        if not (torch.equal(pre.input_ids[a], pre.input_ids[b]) and torch.equal(pre.hidden0[a], pre.hidden0[b])):
            return False
        if (between is not None and not between.same_rows(a, b)) or (
                per_layer is not None and not per_layer.same_rows(a, b)):
            return False
        for key, t in tensors:
            d = batch_dim(key, t)
            if d is not None and t.shape[d] == B and not torch.equal(t.select(d, a), t.select(d, b)):
                return False
        return True

    row_map, reps = first_appearance(list(range(B)), same)
    if len(reps) == B:
        return pre, row_map
    idx = torch.tensor(reps, device=pre.hidden0.device)
    mask = pre.attention_mask
    reduced = Prefill(pre.hidden0.index_select(0, idx), pre.layers.rows(reps, B),
                      pre.input_ids.index_select(0, idx.to(pre.input_ids.device)),
                      pre.visual.index_select(0, idx.to(pre.visual.device)),
                      None if mask is None else mask.index_select(0, idx.to(mask.device)), pre.images)
    return reduced, row_map
