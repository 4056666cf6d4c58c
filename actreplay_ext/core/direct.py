"""Direct cross-model substitution (SPEC §4, `mode="direct"`), the variant the
authors' agent (DeepEyes) and video (Video-R1) code use: no optimisation.

For replay layers l = 0 .. L-1, over every non-padding position:
    M_l = (E^B_l < thresholds[l]) & (E^B_l < E^R_l)
with E^M_l the logit-lens entropy of model M's *output* of layer l (each model
run unmodified on the prompt). At the prefill, the RLVR model's *input* of
layer l at M_l is replaced by the base model's input of layer l.
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch

from .. import ops
from ..config import ReplayConfig
from ..models.base import ModelAdapter
from .layers import lens_params, run_layers
from .prefill import Prefill
from .shared import evaluating

__all__ = ["DirectPlan", "plan_direct", "substitute"]


@dataclasses.dataclass
class DirectPlan:
    """Where and what to substitute, per replay layer: flat (row * T + position)
    indices and the base model's layer inputs there."""

    positions: List[torch.Tensor]
    values: List[torch.Tensor]
    seq_len: int

    @property
    def counts(self) -> List[int]:
        return [int(p.numel()) for p in self.positions]

    def for_length(self, T: int) -> "DirectPlan":
        """The same substitutions in rows of length T >= seq_len (the prompt extended
        by generated tokens, as generate(use_cache=False) runs it)."""
        if T == self.seq_len:
            return self
        return DirectPlan([(p // self.seq_len) * T + p % self.seq_len for p in self.positions], self.values, T)


def _layer_entropies(adapter: ModelAdapter, pre: Prefill, L: int, keep_inputs: bool):
    """Entropy of the lens of every layer output [L, B*T], and the layer inputs."""
    unembed, norm_w, eps = lens_params(adapter)
    entropies, inputs = [], []

    def lens(l, h_in, h_out):
        if keep_inputs:
            inputs.append(h_in)
        rows = h_out.reshape(-1, h_out.shape[-1]).to(unembed.device).contiguous()
        entropies.append(ops.lens_entropy(rows, unembed, norm_w, eps, 0)[0])

    with torch.no_grad(), evaluating(adapter.model):  # the full prompt, without a cache
        run_layers(adapter, pre.hidden0, pre.layers.prefix(pre.hidden0.shape[1]), 0, L, lens)
    return torch.stack(entropies), inputs


def plan_direct(rlvr: ModelAdapter, rlvr_pre: Prefill, base: ModelAdapter, base_pre: Prefill,
                cfg: ReplayConfig) -> DirectPlan:
    if tuple(rlvr_pre.input_ids.shape) != tuple(base_pre.input_ids.shape) or not torch.equal(
            rlvr_pre.input_ids.cpu(), base_pre.input_ids.cpu()):
        raise ValueError("actreplay_ext: the base and RLVR models were given different prompts")
    L = cfg.depth
    e_base, base_inputs = _layer_entropies(base, base_pre, L, keep_inputs=True)
    e_rlvr, _ = _layer_entropies(rlvr, rlvr_pre, L, keep_inputs=False)
    e_rlvr = e_rlvr.to(e_base.device)
    candidates = _non_padding(rlvr_pre).reshape(-1).to(e_base.device)
    below = ops.select_tokens(e_base.contiguous(), candidates, "absolute", cfg.thresholds_by_layer(), "low")
    mask = below & (e_base < e_rlvr)
    mask[cfg.off_layers()] = False  # layers=[...]: only the listed layers are substituted
    positions, values = [], []
    D = base_pre.hidden0.shape[-1]
    for l in range(L):
        pos = mask[l].nonzero().squeeze(1)
        positions.append(pos)
        values.append(base_inputs[l].reshape(-1, D).index_select(0, pos.to(base_inputs[l].device)))
    return DirectPlan(positions, values, rlvr_pre.hidden0.shape[1])


def _non_padding(pre: Prefill) -> torch.Tensor:
    if pre.attention_mask is not None:
        return pre.attention_mask.bool()
    return torch.ones_like(pre.input_ids, dtype=torch.bool)


def substitute(hidden: torch.Tensor, plan: DirectPlan, layer: int) -> torch.Tensor:
    """`hidden` [B, T, D] with the plan's base inputs written at layer `layer`."""
    pos = plan.positions[layer]
    if pos.numel() == 0:
        return hidden
    B, T, D = hidden.shape
    vals = plan.values[layer].to(device=hidden.device, dtype=hidden.dtype)
    out = ops.replay_scatter(hidden.reshape(B * T, D).contiguous(), pos.to(hidden.device), vals.contiguous(),
                             "replace")
    return out.view(B, T, D)
