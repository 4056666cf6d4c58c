"""`DirectReplay`: what `patch()` installs for mode="direct" (SPEC §4). At each
multimodal prefill, before the model's forward, both models' lens entropies
decide per layer where the RLVR model's layer input is replaced by the base
model's; pre-hooks on layers 0 .. L-1 write them, from the plan kept in the
forward's record."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import torch

from ..config import ReplayConfig
from ..core import ReplayResult, check_config_for, internal_forward, plan_direct, substitute
from .base_pass import BasePass
from .handle import ReplayHandle, hidden_of, with_hidden
from .record import Remembered

__all__ = ["DirectReplay"]


class DirectReplay(ReplayHandle):
    def __init__(self, model, base=None, config: Optional[ReplayConfig] = None):
        super().__init__(model)
        self.config = dataclasses.replace(config) if config is not None else ReplayConfig(mode="direct")
        self.layers_of_result = self.config.depth
        self.base = base
        self._base = BasePass.of(self.adapter, base, self.config)
        check_config_for(self.adapter, self.config, "RLVR")
        self._install()
        if base is None:
            warnings.warn("actreplay_ext.patch: mode='direct' without a base model leaves generation unchanged; "
                          "pass base=...", stacklevel=3)

    def _release(self) -> None:
        self.base = self._base = None

    def _install_mode(self, layers) -> None:
        for l in self.config.replay_layers:
            self._hook(layers[l], functools.partial(self._on_layer, l))

    def _prepare(self, rec) -> None:
        if self._base is None:
            return
        rlvr_pre = self._capture(rec)
        memory = self._records.remembered
        if memory is not None and memory.extended_by(rlvr_pre.input_ids, rlvr_pre.hidden0, rlvr_pre.visual):
            rec.pending = memory.result.for_length(rlvr_pre.hidden0.shape[1])  # use_cache=False: the prompt's plan
            return
        encoded = rec.kwargs.get("mm_encoder_outputs")
        if not rec.vision_calls and memory is not None and memory.encodes(encoded):
            rec.vision_calls = memory.vision_calls  # the same encoded images once more
        base_pre = self._base.prefill(rec)
        with internal_forward():
            plan = plan_direct(self.adapter, rlvr_pre, self._base.adapter, base_pre, self.config)
        self.last = ReplayResult(torch.zeros(0, rlvr_pre.hidden0.shape[-1]), [], plan.counts,
                                 rlvr_pre.visual.sum(1).tolist(), {}, note="direct substitution",
                                 input_ids=rec.input_ids, config=self.config.as_dict())
        self._records.remember(Remembered(rlvr_pre.input_ids, rlvr_pre.hidden0, plan, rec.vision_calls, encoded))
        rec.pending = plan

    def _on_layer(self, layer, module, args, kwargs):
        rec = self._current()
        if rec is None or rec.pending is None:
            return None
        return with_hidden(args, kwargs, substitute(hidden_of(args, kwargs), rec.pending, layer))
