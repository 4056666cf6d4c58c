"""The two modes that add learned offsets to the visual tokens at a prefill:
`TokenReplay` (what `patch()` installs for mode="tokens": the replay runs at
each multimodal prefill, against a base model or fixed targets) and
`FixedOffsets` (what `apply()` installs: one result's offsets, for its prompt
only). The offsets are prepared before the forward and added to the input of
layer `inject_layer` (0 unless a mid replay) by a pre-hook there."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import List, Optional

import torch

from .. import ops
from ..config import ReplayConfig
from ..core import (
    ReplayResult,
    ReplayTargets,
    check_config_for,
    images_differ,
    internal_forward,
    optimize_from_prefill,
    targets_from_prefill,
)
from .base_pass import BasePass
from .handle import ReplayHandle, hidden_of, with_hidden
from .record import ForwardRecord, Remembered

__all__ = ["TokenReplay", "FixedOffsets", "add_offsets"]

log = logging.getLogger("actreplay_ext")


def add_offsets(hidden: torch.Tensor, visual: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D] with the offsets added at the visual positions, in float32 (float64
    for a float64 model: a float32 rounding would change its hidden state even with zero offsets)."""
    B, T, D = hidden.shape
    flat_vis = visual.reshape(-1).nonzero().squeeze(1).to(hidden.device)
    if flat_vis.numel() != deltas.shape[0]:
        raise ValueError(
            f"actreplay_ext: the offsets are for {deltas.shape[0]} visual tokens but the prompt has "
            f"{flat_vis.numel()}; they belong to another prompt"
        )
    dtype = ops.result_dtype(hidden.dtype)
    out = ops.replay_scatter(hidden.reshape(B * T, D).to(dtype), flat_vis, deltas.to(hidden.device, dtype), "add")
    return out.to(hidden.dtype).view(B, T, D)


class _OffsetsHandle(ReplayHandle):
    """Adds the offsets `_offsets_for` prepares at a prefill to the input of layer `inject_layer`."""

    inject_layer = 0

    def _install_mode(self, layers) -> None:
        self._hook(layers[self.inject_layer], self._on_inject_layer)

    def _offsets_for(self, rec: ForwardRecord) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _prepare(self, rec):
        deltas = self._offsets_for(rec)
        if deltas is not None:
            rec.pending = (self.adapter.visual_mask(rec.input_ids), deltas)

    def _on_inject_layer(self, module, args, kwargs):
        rec = self._current()
        if rec is None or rec.pending is None:
            return None
        (visual, deltas), rec.pending = rec.pending, None
        return with_hidden(args, kwargs, add_offsets(hidden_of(args, kwargs), visual, deltas))


class TokenReplay(_OffsetsHandle):
    """Activation Replay (mode="tokens") at each new multimodal prefill, against
    `base` or fixed `targets` (`set_targets`)."""

    def __init__(self, model, base=None, config: Optional[ReplayConfig] = None,
                 targets: Optional[ReplayTargets] = None):
        super().__init__(model)
        # A copy, validated again: a later change to the caller's config cannot reach this handle.
        self.config = dataclasses.replace(config) if config is not None else ReplayConfig()
        self.layers_of_result = self.config.depth
        self.base = base
        self._base = BasePass.of(self.adapter, base, self.config)
        check_config_for(self.adapter, self.config, "RLVR")
        self.inject_layer = self.config.inject_layer
        self._targets = targets
        self._install()
        if base is None and targets is None:
            warnings.warn(
                "actreplay_ext.patch: no base model and no targets given, so generation is unchanged; "
                "pass base=... or call handle.set_targets(...)",
                stacklevel=3,
            )

    def set_targets(self, targets: Optional[ReplayTargets]) -> None:
        if not self.active:
            raise RuntimeError(f"actreplay_ext: set_targets() on {self!r}: a removed handle replays nothing; "
                               "call actreplay_ext.patch(...) again")
        self._targets = targets
        self._records.forget()

    def _release(self) -> None:
        self.base = self._base = self._targets = None

    def _offsets_for(self, rec):
        pre = self._capture(rec)
        memory = self._records.remembered
        if memory is not None and memory.extended_by(pre.input_ids, pre.hidden0, pre.visual):
            self.last = memory.result  # the same prompt with more text, without a cache: the same offsets
            return memory.result.flat_deltas()
        encoded = rec.kwargs.get("mm_encoder_outputs")
        if not rec.vision_calls and memory is not None and memory.encodes(encoded):
            rec.vision_calls = memory.vision_calls  # the same encoded images once more
        targets = self._targets_for(rec)
        if targets is None:
            return None
        with internal_forward():
            result = optimize_from_prefill(self.adapter, pre, targets, self.config)
        self.last = result
        self._records.remember(Remembered(pre.input_ids, pre.hidden0[:, :pre.prefix_len], result,
                                          rec.vision_calls, encoded))
        if result.losses:  # sgd: first -> last; lbfgs returns its best point: first -> best
            final = result.losses[-1] if self.config.optimizer == "sgd" else min(result.losses)
            log.info("actreplay: replayed %d visual tokens, loss %.4g -> %.4g",
                     sum(result.n_visual), result.losses[0], final)
        return result.flat_deltas()

    def _targets_for(self, rec: ForwardRecord) -> Optional[ReplayTargets]:
        if self._base is None:
            return self._targets  # set_targets(); optimize_from_prefill checks the prompt
        pre = self._base.prefill(rec)
        with internal_forward():
            return targets_from_prefill(self._base.adapter, pre, self.config)


class FixedOffsets(_OffsetsHandle):
    """One result's offsets, added at the prefill of the prompt they were learned
    on (what `apply()` installs); rows that repeat a learned row (Pass@K,
    beams) get that row's offsets, and so does a row that extends one with text
    (generate(use_cache=False), where each step is the whole sequence, and an
    assistant model's candidates checked with the prompt); any other prompt is
    an error."""

    def __init__(self, model, result: ReplayResult):
        if result.direct:
            raise ValueError("actreplay_ext.apply: the result is a direct substitution (mode='direct'), which learns "
                             "no offsets; replay it with patch(model, base=base, config=ReplayConfig(mode='direct'))")
        super().__init__(model)
        _check_result_fits(result, self.adapter)
        self.result = result
        self.inject_layer = result.inject_layer
        self._install()

    def _offsets_for(self, rec):
        if not self.result.replayed:  # a forward that was not replayed, a prompt without visual tokens
            if bool(self.adapter.visual_mask(rec.input_ids).any()):
                why = self.result.note or "no visual tokens"
                raise ValueError(f"actreplay_ext.apply: the result holds no offsets ({why}) and this prompt has "
                                 "visual tokens; optimize on these inputs")
            return None
        deltas = self._learned_rows(rec.input_ids)
        self._check_images(rec)
        self.last = self.result  # what this prompt got, as patch() handles say
        return deltas

    def _learned_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The offsets of each row of `ids`: those of the learned row it is or extends with text."""
        learned = self.result.input_ids
        if learned is None or (ids.shape == learned.shape and torch.equal(ids.cpu(), learned.cpu())):
            return self.result.flat_deltas()
        rows: List[torch.Tensor] = self.result.deltas if isinstance(self.result.deltas, list) else [self.result.deltas]
        ids, learned = ids.cpu(), learned.cpu()
        visual = self.adapter.visual_mask(ids).cpu()
        T = learned.shape[1]
        picked = []
        for f in range(ids.shape[0]):
            # the learned row itself, or the learned row followed by text only (no cache, assisted decoding)
            same = [r for r in range(learned.shape[0]) if ids.shape[1] >= T and torch.equal(ids[f, :T], learned[r])
                    and not bool(visual[f, T:].any())]
            if not same:
                raise ValueError(
                    f"actreplay_ext.apply: row {f} of this prompt's input_ids is not a prompt the result was "
                    f"learned on, nor one followed by text (its input_ids: {tuple(learned.shape)}, this forward: "
                    f"{tuple(ids.shape)}); optimize on these inputs"
                )
            if any(not torch.equal(rows[same[0]], rows[r]) for r in same[1:]):
                raise ValueError(
                    f"actreplay_ext.apply: row {f} matches learned rows {same} that have different offsets "
                    "(same ids, other images); pass the rows as they were optimised"
                )
            picked.append(rows[same[0]])
        return torch.cat(picked, 0)

    def _check_images(self, rec: ForwardRecord) -> None:
        """Rows whose input_ids match: their pixels must be among those the result was learned on."""
        if images_differ(self.result.images, self._images(rec), subset=True):
            raise ValueError(
                "actreplay_ext.apply: this prompt's images are not those the result was learned on (the same "
                "input_ids, other pixels); optimize on these inputs"
            )

def _check_result_fits(result: ReplayResult, adapter) -> None:
    """The offsets fit the model: its width, and a layer to add them at (a
    result learned on another model fails here, not inside a forward)."""
    n = adapter.num_layers
    if not 0 <= result.inject_layer < n:
        raise ValueError(f"actreplay_ext.apply: argument 'result' adds its offsets at layer inject_layer="
                         f"{result.inject_layer}, but the model has {n} decoder layers (0 .. {n - 1}); it was "
                         "learned on another model")
    rows = result.deltas if isinstance(result.deltas, list) else [result.deltas]
    widths = {int(d.shape[-1]) for d in rows if d.dim() == 2 and d.shape[0]}
    if widths and widths != {adapter.hidden_size}:
        raise ValueError(f"actreplay_ext.apply: argument 'result' holds offsets of hidden size "
                         f"{', '.join(map(str, sorted(widths)))}, but the model's hidden size is "
                         f"{adapter.hidden_size}; it was learned on another model")
