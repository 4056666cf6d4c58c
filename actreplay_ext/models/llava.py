"""LLaVA-1.5 style models (`LlavaForConditionalGeneration`: a CLIP-like vision
tower, a projector and a causal Llama-like text model), on transformers 4.57.x
and 5.x.

Module paths (the same in both versions; see transformers/models/llava/
modeling_llava.py, `LlavaModel.__init__` and `LlavaForConditionalGeneration.__init__`):

* decoder layers: ``model.model.language_model.layers`` (a LlamaModel/AutoModel)
* final norm:     ``model.model.language_model.norm`` (LlamaRMSNorm, ``variance_epsilon``)
* unembedding:    ``model.lm_head.weight``
* vision tower:   ``model.model.vision_tower`` (AutoModel of the vision config)
* image token:    ``config.image_token_id`` (an alias of ``image_token_index`` in both versions)

What `generate` passes to the top-level forward at prefill:

* 4.57: ``input_ids, attention_mask, position_ids, cache_position, pixel_values,
  past_key_values, ...``; the vision tower runs inside that forward.
* 5.x:  ``input_ids, position_ids, past_key_values, mm_encoder_outputs={"image": ...}, ...``
  (no ``pixel_values``; no ``attention_mask`` without padding). The vision tower
  was called with ``pixel_values`` as its first positional argument *before*
  the forward (``GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation``),
  so the pixels are taken from that recorded call.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .base import ModelAdapter
from .registry import register_adapter

__all__ = ["LlavaAdapter"]


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 style: one image = one ``pixel_values`` row [3, H, W] = a fixed
    number of image placeholder tokens."""

    model_classes = ("LlavaForConditionalGeneration",)

    prompt_keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes",
                   "vision_feature_layer", "vision_feature_select_strategy")

    def vision_tower(self):
        return self.model.model.vision_tower

    def visual_token_ids(self) -> List[int]:
        cfg = self.model.config
        tok = getattr(cfg, "image_token_id", None)
        if tok is None:
            tok = cfg.image_token_index
        return [int(tok)]

    def image_tokens(self) -> int:
        """Placeholder tokens per image: one per patch of the (square) image, plus
        the CLS token under the "full" feature strategy."""
        cfg = self.model.config
        v = cfg.vision_config
        n = (int(v.image_size) // int(v.patch_size)) ** 2
        return n + (1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0)

    def recorded_visual_tokens(self, vision_calls):
        total = 0
        for args, kw in vision_calls:  # vision_tower(pixel_values, ...): one row per image
            pixels = args[0] if args else kw.get("pixel_values")
            if pixels is None or kw.get("image_sizes") is not None:
                return None
            total += int(pixels.shape[0]) * self.image_tokens()
        return total

    def tokens_per_item(self, grid_thw: torch.Tensor) -> torch.Tensor:
        # Images are stood in for by a [n_images, 1] "grid" of ones (one pixel row each).
        return torch.full((grid_thw.shape[0],), self.image_tokens(), dtype=torch.long, device=grid_thw.device)

    def prompt_from_forward(self, kwargs: Dict, vision_calls: List) -> Dict:
        prompt = self.prompt_kwargs(kwargs)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if encoded.get("image") is None or "pixel_values" in prompt:
            return prompt
        if not vision_calls:
            raise RuntimeError(
                "actreplay_ext: the vision inputs of this prompt were not seen (the model was given "
                "precomputed mm_encoder_outputs); pass pixel inputs to generate()"
            )
        args, kw = vision_calls[-1]
        pixels = args[0] if args else kw["pixel_values"]
        if kw.get("image_sizes") is not None:
            prompt["image_sizes"] = kw["image_sizes"]
            prompt["pixel_values"] = pixels
            return prompt
        order = self.encoded_order(encoded["image"], pixels.shape[0])
        if order is not None:
            prompt["pixel_values"] = pixels.index_select(0, torch.tensor(order, device=pixels.device))
            return prompt
        ones = torch.ones(pixels.shape[0], 1, dtype=torch.long, device=pixels.device)
        prompt["pixel_values"], _ = self._expand_to_rows(prompt["input_ids"], self.visual_token_ids()[0],
                                                         pixels, ones)
        return prompt


register_adapter(LlavaAdapter)
