"""The base pass (SPEC §3 steps 1-3): the base model's lens entropies at every
visual token of the replay layers, the selection, and the top-`topv` targets,
from the fused `lens_entropy` operator (no [N, V] logits)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .. import ops
from ..config import ReplayConfig
from ..models.base import ModelAdapter
from ..models.registry import get_adapter
from .batching import distinct_rows
from .layers import lens_params, run_layers
from .prefill import Prefill, capture_prefill
from .results import ReplayTargets
from .shared import evaluating
from .validation import check_config_for, model_info, target_config

__all__ = ["compute_targets", "targets_from_prefill", "select"]


def compute_targets(base: torch.nn.Module, inputs: Dict, config: Optional[ReplayConfig] = None) -> ReplayTargets:
    """Run the base model once on `inputs` (no grad) and return its replay targets."""
    cfg = config or ReplayConfig()
    adapter = get_adapter(base, "base")
    check_config_for(adapter, cfg, "base")
    return targets_from_prefill(adapter, capture_prefill(adapter, inputs), cfg)


def _empty(pre: Prefill, n_visual, row_map, cfg: ReplayConfig, adapter: ModelAdapter) -> ReplayTargets:
    L = cfg.depth
    return ReplayTargets(pre.input_ids.cpu(), n_visual, torch.empty(L, 0),
                         [torch.empty(0, dtype=torch.long) for _ in range(L)],
                         [torch.empty(0, cfg.topv, dtype=torch.long) for _ in range(L)],
                         [torch.empty(0, cfg.topv) for _ in range(L)], target_config(cfg), row_map,
                         model_info(adapter), pre.images)


def targets_from_prefill(adapter: ModelAdapter, pre: Prefill, cfg: ReplayConfig) -> ReplayTargets:
    pre, row_map = distinct_rows(pre)
    n_visual = pre.visual_rows()
    P = pre.prefix_len
    if P == 0:
        return _empty(pre, n_visual, row_map, cfg, adapter)
    unembed, norm_w, eps = lens_params(adapter)
    flat_vis = pre.visual[:, :P].reshape(-1).nonzero().squeeze(1)
    entropies, top_logp, top_idx = [], [], []

    def lens(l, h_in, h_out):  # base side: h_out(l) at every visual token
        rows = h_out.reshape(-1, h_out.shape[-1]).index_select(0, flat_vis.to(h_out.device))
        rows = rows.to(unembed.device).contiguous()
        ent, _, _, idx = ops.lens_entropy(rows, unembed, norm_w, eps, cfg.topv)
        entropies.append(ent)
        top_idx.append(idx)
        # The renormalised top-topv distribution, by the arithmetic the loss (topk_kl) uses: a model
        # replayed against an exact copy of itself then has loss 0 and offsets that stay 0.
        top_logp.append(ops.topk_logp(rows, unembed, norm_w, eps, idx))

    with torch.no_grad(), evaluating(adapter.model):
        run_layers(adapter, pre.hidden0[:, :P], pre.layers.prefix(P), 0, cfg.depth, lens)
    entropy = torch.stack(entropies)  # [L, n_total]
    bad = (~torch.isfinite(entropy)).any(1).nonzero()
    if bad.numel():
        raise FloatingPointError(
            f"actreplay_ext: the base model's layer {int(bad[0])} output has a non-finite logit lens "
            "(NaN or Inf activations); no targets were made"
        )
    selected_mask = select(entropy, n_visual, cfg)
    selected, t_idx, t_logp = [], [], []
    for l in range(cfg.depth):
        sel = selected_mask[l].nonzero().squeeze(1)
        selected.append(sel)
        t_idx.append(top_idx[l].index_select(0, sel))
        t_logp.append(top_logp[l].index_select(0, sel))
    return ReplayTargets(pre.input_ids.cpu(), n_visual, entropy, selected, t_idx, t_logp, target_config(cfg),
                         row_map, model_info(adapter), pre.images)


def select(entropy: torch.Tensor, n_visual: Sequence[int], cfg: ReplayConfig) -> torch.Tensor:
    """Per row of the batch (the ratio rule's max is per prompt): [L, n_total] mask."""
    masks, start = [], 0
    for n in n_visual:
        e = entropy[:, start:start + n].contiguous()
        rule, value = cfg.selection_value(n)
        cand = torch.ones(n, dtype=torch.bool, device=e.device)
        m = ops.select_tokens(e, cand, rule, value, cfg.select)
        if cfg.inject_layer:  # layers before the injection point cannot be moved
            m[: cfg.inject_layer] = False
        m[cfg.off_layers()] = False  # layers=[...] leaves out some layers below the deepest
        masks.append(m)
        start += n
    return torch.cat(masks, 1)
