"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`; transformers 4.57.x and 5.x share these
paths): decoder layers ``model.model.language_model.layers``, vision tower
``model.model.visual``, M-RoPE positions whose ``rope_deltas`` the model keeps
between calls."""

from __future__ import annotations

import inspect

import torch

from .base import ModelAdapter
from .registry import register_adapter

__all__ = ["QwenVLAdapter"]


class QwenVLAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL (transformers 4.57.x and 5.x share these paths)."""

    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")

    def vision_tower(self):
        return self.model.model.visual

    def visual_token_ids(self):
        cfg = self.model.config
        return [int(cfg.image_token_id), int(cfg.video_token_id)]

    def forward_inputs(self, inputs):
        out = dict(inputs)
        # transformers 5.x computes M-RoPE positions from mm_token_type_ids; without
        # them Qwen2.5-VL silently falls back to 1-D positions. 4.57 has no such input.
        params = inspect.signature(self.model.forward).parameters
        if "mm_token_type_ids" in params and out.get("mm_token_type_ids") is None and "input_ids" in out:
            ids = out["input_ids"]
            cfg = self.model.config
            mm = torch.zeros_like(ids, dtype=torch.int32)
            mm[ids == cfg.image_token_id] = 1
            mm[ids == cfg.video_token_id] = 2
            out["mm_token_type_ids"] = mm
        return out

    def recorded_visual_tokens(self, vision_calls):
        total = 0
        for args, kw in vision_calls:  # visual(pixel_values, grid_thw=...)
            grids = kw.get("grid_thw", args[1] if len(args) > 1 else None)
            if grids is None:
                return None
            total += int(self.tokens_per_item(grids).sum())
        return total

    def tokens_per_item(self, grid_thw):
        merge = int(self.model.config.vision_config.spatial_merge_size)
        return grid_thw.prod(-1) // (merge * merge)

    def model_state(self):
        return {"rope_deltas": getattr(self.model.model, "rope_deltas", None)}

    def restore_state(self, state):
        if hasattr(self.model.model, "rope_deltas"):
            self.model.model.rope_deltas = state["rope_deltas"]


register_adapter(QwenVLAdapter)
