"""The base model's side of a patched forward: its prompt rebuilt from the RLVR
model's forward call and recorded vision-tower calls, and its prefill."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..config import ReplayConfig
from ..core import Prefill, capture_prefill, check_config_for, internal_forward
from ..models.base import ModelAdapter
from ..models.registry import check_pair, get_adapter
from .record import ForwardRecord

__all__ = ["BasePass"]


class BasePass:
    def __init__(self, rlvr: ModelAdapter, base: ModelAdapter):
        self.rlvr = rlvr
        self.adapter = base

    @classmethod
    def of(cls, rlvr: ModelAdapter, base: Optional[torch.nn.Module], config: ReplayConfig) -> Optional["BasePass"]:
        """The base pass of `base` for the patched model `rlvr`, after checking
        that they are a pair and that `config` fits the base; None without a base."""
        if base is None:
            return None
        adapter = get_adapter(base, "base")
        check_pair(rlvr, adapter)
        check_config_for(adapter, config, "base")
        return cls(rlvr, adapter)

    def prompt(self, rec: ForwardRecord) -> Dict:
        """The prompt of the forward `rec`, as inputs of the base model."""
        prompt = self.rlvr.prompt_from_forward(rec.kwargs, rec.vision_calls)
        device = self.adapter.input_device()  # not model.device: the meta device when accelerate offloads
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in prompt.items()}

    def prefill(self, rec: ForwardRecord) -> Prefill:
        """The base model's prefill of the same prompt."""
        with internal_forward():
            return capture_prefill(self.adapter, self.prompt(rec))
