"""The base model's side of a patched forward: its prompt rebuilt from the RLVR
model's forward call and recorded vision-tower calls, and its prefill."""

from __future__ import annotations

from typing import Dict

import torch

from ..core import Prefill, capture_prefill, internal_forward
from ..models.base import ModelAdapter
from .record import ForwardRecord

__all__ = ["BasePass"]


class BasePass:
    def __init__(self, rlvr: ModelAdapter, base: ModelAdapter):
        self.rlvr = rlvr
        self.adapter = base

    def prompt(self, rec: ForwardRecord) -> Dict:
        """The prompt of the forward `rec`, as inputs of the base model."""
        prompt = self.rlvr.prompt_from_forward(rec.kwargs, rec.vision_calls)
        model = self.adapter.model
        device = getattr(model, "device", None) or next(model.parameters()).device
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in prompt.items()}

    def prefill(self, rec: ForwardRecord) -> Prefill:
        """The base model's prefill of the same prompt."""
        with internal_forward():
            return capture_prefill(self.adapter, self.prompt(rec))
