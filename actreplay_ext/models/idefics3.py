"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`,
`SmolVLMForConditionalGeneration`: a SigLIP-like vision transformer, a
pixel-shuffle connector and a causal Llama-like text model), on transformers
4.57.x and 5.x.

SmolVLM is Idefics3 with another embedding merge (block indexing instead of
`masked_scatter`); both fill the image placeholders with the images' features
in row-major order, one image after the other, so one adapter serves both.

Module paths (the same in both versions and both families; see
transformers/models/idefics3/modeling_idefics3.py and
transformers/models/smolvlm/modeling_smolvlm.py, `*Model.__init__` and
`*ForConditionalGeneration.__init__`):

* decoder layers: ``model.model.text_model.layers`` (an AutoModel, LlamaModel here)
* final norm:     ``model.model.text_model.norm`` (LlamaRMSNorm, ``variance_epsilon``)
* unembedding:    ``model.lm_head.weight`` (untied: ``tie_word_embeddings`` defaults to False)
* vision tower:   ``model.model.vision_model`` (then ``model.model.connector``)
* image token:    ``config.image_token_id``; every image (or image tile) is
  ``model.model.image_seq_len = (image_size / patch_size)^2 / scale_factor^2``
  placeholder tokens
* pixel inputs:   ``pixel_values`` [B, N_img, 3, H, W] (all-zero images are
  padding and dropped) and the optional ``pixel_attention_mask`` [B, N_img, H, W]

What `generate` passes to the top-level forward at prefill:

* 4.57: ``input_ids, attention_mask, position_ids, cache_position, pixel_values,
  pixel_attention_mask, image_hidden_states=None, ...``; the vision tower runs
  inside that forward. ``num_return_sequences=K`` repeats the pixel rows, so
  the forward's own inputs are the prompt.
* 5.x:  ``input_ids, position_ids, past_key_values, mm_encoder_outputs={"image": ...}``
  (no pixels; no ``attention_mask`` without padding). `get_image_features` ran
  before the forward and called the vision tower with keywords
  ``pixel_values`` [n_real, 3, H, W] (padding images removed, rows flattened)
  and ``patch_attention_mask`` [n_real, H/p, W/p]. With ``num_return_sequences=K``
  the encoded ``pooler_output`` (one stacked tensor [n_entries, seq, D], so
  entries cannot be told apart by identity) is repeated per prompt; 5.18 gives
  a two-image prompt's rows [a, a] and [b, b]. The base model's prompt is
  rebuilt from the recorded vision-tower call, in the order the rows received
  the entries, told apart by value.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .base import ModelAdapter
from .matching import equality_classes, first_appearance, same_values
from .registry import register_adapter

__all__ = ["Idefics3Adapter"]


class Idefics3Adapter(ModelAdapter):
    """Idefics3 / SmolVLM: the text model is ``model.model.text_model``; one image
    (or tile) = one ``pixel_values`` entry = ``image_seq_len`` placeholder tokens."""

    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")

    prompt_keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "pixel_attention_mask")

    def text_model(self):
        return self.model.model.text_model

    def vision_tower(self):
        return self.model.model.vision_model

    def visual_token_ids(self) -> List[int]:
        return [int(self.model.config.image_token_id)]

    def recorded_visual_tokens(self, vision_calls):
        total = 0
        for args, kw in vision_calls:  # vision_model(pixel_values=[n_images, 3, H, W], ...)
            pixels = args[0] if args else kw.get("pixel_values")
            if pixels is None:
                return None
            total += int(pixels.shape[0]) * self.image_tokens()
        return total

    def image_tokens(self) -> int:
        """Placeholder tokens per image of the configured size."""
        return int(self.model.model.image_seq_len)

    def prompt_from_forward(self, kwargs: Dict, vision_calls: List) -> Dict:
        prompt = self.prompt_kwargs(kwargs)
        if "pixel_values" in prompt:  # 4.57: the forward encodes the images itself
            return prompt
        encoded = kwargs.get("mm_encoder_outputs")
        if encoded is None:
            encoded = kwargs.get("image_hidden_states")
        image = encoded.get("image") if isinstance(encoded, dict) else encoded
        if image is None:
            return prompt  # a text-only prompt
        pooled = getattr(image, "pooler_output", image)
        if not vision_calls or not isinstance(pooled, (torch.Tensor, list, tuple)):
            raise RuntimeError(
                "actreplay_ext: the vision inputs of this prompt were not seen (the model was given "
                "precomputed image features); pass pixel_values to generate()"
            )
        args, kw = vision_calls[-1]
        pixels = args[0] if args else kw["pixel_values"]
        patch_mask = kw.get("patch_attention_mask", args[1] if len(args) > 1 else None)
        prompt["pixel_values"], prompt["pixel_attention_mask"] = self._rows_of_images(
            prompt["input_ids"], self._per_image(pooled), pixels, patch_mask)
        return prompt

    def _per_image(self, pooled) -> List[torch.Tensor]:
        """The encoded features as one [image_seq_len, D] entry per image, in row
        order. transformers 5.18 stacks them ([n_images, seq, D]); 5.24 gives a
        list with one [n_images_of_row * seq, D] tensor per prompt row."""
        seq = self.image_tokens()
        entries: List[torch.Tensor] = []
        for item in (pooled if isinstance(pooled, (list, tuple)) else [pooled]):
            entries += list(item) if item.dim() == 3 else list(item.split(seq, 0))
        return entries

    def _rows_of_images(self, input_ids, entries, pixels, patch_mask):
        """`pixel_values` [rows, N, 3, H, W] and `pixel_attention_mask` [rows, N, H, W]
        that give each row of `input_ids` the images its placeholders received:
        entry e of the encoded features fills the e-th image's placeholders in
        row-major order. Entries are matched to the recorded images by value
        (equal features <-> equal pixels and patch mask, in order of first
        appearance); rows with fewer images get all-zero padding images."""
        n_img, _, H, W = pixels.shape
        p = int(self.model.config.vision_config.patch_size)
        if patch_mask is None:
            patch_mask = torch.ones(n_img, H // p, W // p, dtype=torch.bool, device=pixels.device)
        if len(entries) == n_img:
            image_of = list(range(n_img))
        else:
            e_cls = equality_classes(entries)
            _, i_first = first_appearance([(pixels[i], patch_mask[i]) for i in range(n_img)], same_values)
            if len(set(e_cls)) != len(i_first):
                raise RuntimeError(
                    f"actreplay_ext: cannot match the {len(entries)} encoded images of this prompt to the "
                    f"{n_img} images the vision tower saw; pass pixel_values to generate() without "
                    "num_return_sequences, or compute targets on the expanded inputs"
                )
            image_of = [i_first[c] for c in e_cls]
        seq = int(entries[0].shape[0])
        per_row = (input_ids == self.visual_token_ids()[0]).sum(1).tolist()
        counts = [n // seq for n in per_row]
        if any(n % seq for n in per_row) or sum(counts) != len(entries):
            raise RuntimeError(
                f"actreplay_ext: the prompt rows hold {per_row} image tokens, which is not "
                f"{len(entries)} images of {seq} tokens each"
            )
        # A pixel mask that gives back the recorded patch mask (a patch counts when any pixel does).
        pixel_mask = patch_mask.bool().repeat_interleave(p, 1).repeat_interleave(p, 2)
        pixel_mask = torch.nn.functional.pad(pixel_mask, (0, W - pixel_mask.shape[2], 0, H - pixel_mask.shape[1]))
        rows, N = len(per_row), max(max(counts), 1)
        values = pixels.new_zeros(rows, N, *pixels.shape[1:])
        masks = torch.zeros(rows, N, H, W, dtype=torch.bool, device=pixels.device)
        e = 0
        for r, n in enumerate(counts):
            for j in range(n):
                values[r, j] = pixels[image_of[e]]
                masks[r, j] = pixel_mask[image_of[e]]
                e += 1
        return values, masks


register_adapter(Idefics3Adapter)
