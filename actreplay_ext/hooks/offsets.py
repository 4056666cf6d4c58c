"""The two modes that add learned offsets to the visual tokens at a prefill:
`TokenReplay` (what `patch()` installs for mode="tokens": the replay runs at
each multimodal prefill, against a base model or fixed targets) and
`FixedOffsets` (what `apply()` installs: one result's offsets). The offsets go
to the input of layer `inject_layer` (0 unless a mid replay), in the same
forward: a pre-hook there takes them from the forward's record."""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch

from .. import ops
from ..config import ReplayConfig
from ..core import (
    ReplayResult,
    ReplayTargets,
    check_config_for,
    internal_forward,
    optimize_from_prefill,
    targets_from_prefill,
)
from .base_pass import BasePass
from .handle import ReplayHandle, hidden_of, with_hidden
from .record import ForwardRecord

__all__ = ["TokenReplay", "FixedOffsets", "add_offsets"]

log = logging.getLogger("actreplay_ext")


def add_offsets(hidden: torch.Tensor, visual: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D] with the offsets added at the visual positions, in float32."""
    B, T, D = hidden.shape
    flat_vis = visual.reshape(-1).nonzero().squeeze(1).to(hidden.device)
    if flat_vis.numel() != deltas.shape[0]:
        raise ValueError(
            f"actreplay_ext: the offsets are for {deltas.shape[0]} visual tokens but the prompt has "
            f"{flat_vis.numel()}; they belong to another prompt"
        )
    out = ops.replay_scatter(hidden.reshape(B * T, D).float(), flat_vis, deltas.to(hidden.device).float(), "add")
    return out.to(hidden.dtype).view(B, T, D)


class _OffsetsHandle(ReplayHandle):
    """Adds the offsets `_offsets_for` gives at a prefill to the input of layer `inject_layer`."""

    inject_layer = 0

    def _install_mode(self, layers) -> None:
        if self.inject_layer > 0:
            self._hook(layers[self.inject_layer], self._on_inject_layer)

    def _offsets_for(self, rec: ForwardRecord, hidden: torch.Tensor, kwargs, visual) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _at_prefill(self, rec, hidden, kwargs):
        visual = self.adapter.visual_mask(rec.input_ids)
        deltas = self._offsets_for(rec, hidden, kwargs, visual)
        if deltas is None:
            return None
        if self.inject_layer > 0:
            rec.pending = (visual, deltas)
            return None
        return add_offsets(hidden, visual, deltas)

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
        self.config = config or ReplayConfig()
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
        self._targets = targets

    def _offsets_for(self, rec, hidden, kwargs, visual):
        ids = rec.input_ids
        if not bool(visual.any()):
            self.last = ReplayResult(torch.zeros(0, hidden.shape[-1]), [], [0] * self.config.layers,
                                     [0] * ids.shape[0], {}, note="no visual tokens: nothing replayed", input_ids=ids)
            return None
        targets = self._targets_for(rec)
        if targets is None:
            return None
        pre = self._prefill(rec, hidden, kwargs)
        with internal_forward():
            result = optimize_from_prefill(self.adapter, pre, targets, self.config)
        self.last = result
        log.info("actreplay: replayed %d visual tokens, loss %.4g -> %.4g",
                 sum(result.n_visual), result.losses[0], result.losses[-1])
        return result.flat_deltas()

    def _targets_for(self, rec: ForwardRecord) -> Optional[ReplayTargets]:
        if self._base is None:
            return self._targets  # set_targets(); optimize_from_prefill checks the prompt
        pre = self._base.prefill(rec)
        with internal_forward():
            return targets_from_prefill(self._base.adapter, pre, self.config)


class FixedOffsets(_OffsetsHandle):
    """One result's offsets, added at the prefill (what `apply()` installs)."""

    def __init__(self, model, result: ReplayResult):
        super().__init__(model)
        self.result = result
        self.inject_layer = result.inject_layer
        self._install()

    def _offsets_for(self, rec, hidden, kwargs, visual):
        return self.result.flat_deltas()
