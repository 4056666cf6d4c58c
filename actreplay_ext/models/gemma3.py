"""Gemma 3 (`Gemma3ForConditionalGeneration`: a SigLIP vision tower, a pooling
projector and the Gemma 3 text model), on transformers 4.57.x and 5.x.

Module paths (the same in both versions, ``models/gemma3/modeling_gemma3.py``,
``Gemma3Model.__init__`` and ``Gemma3ForConditionalGeneration.__init__``):

* decoder layers: ``model.model.language_model.layers`` (``Gemma3TextModel``)
* final norm:     ``model.model.language_model.norm`` (``Gemma3RMSNorm``, ``eps``)
* unembedding:    ``model.lm_head.weight`` (tied to the token embeddings by default)
* vision tower:   ``model.model.vision_tower``, called as ``vision_tower(pixel_values=...)``
* image token:    ``config.image_token_id`` (an alias of ``image_token_index``); every
  image is ``config.mm_tokens_per_image`` placeholder tokens, one ``pixel_values``
  row [3, H, W] each, so the prompt handling is LLaVA's (`LlavaAdapter`).

What differs from the other families:

**Per-layer keyword arguments.** Layers alternate sliding-window and full
attention (``text_config.layer_types``) and the text model's loop gives each
layer the mask of its type: ``causal_mask_mapping[layer_type]`` (5.18 lines
564-568; 4.57.6 line 574). The mapping is built by ``Gemma3Model.forward``
(or ``generate``) and reaches the text model as its ``attention_mask``
keyword, a dict by type (5.18 lines 893-913; 4.57.6 lines 916-958). The
rotary tables differ by type too: 5.18 computes one per type and passes the
layer its own as ``position_embeddings`` (lines 559-567); 4.57.6 passes every
layer both ``position_embeddings_global`` and ``position_embeddings_local``
and the layer picks (lines 559-560, 377-380). The replay loop runs the
decoder layers alone from layer 0's captured keywords, so the adapter records
the text model's call (`layer_loop_module`, a forward pre-hook) and
`LayerTypeKwargs.layer_kwargs` gives layer l the mask of its type and, on 5.x,
the rotary tables of its type, computed by the model's own
``rotary_emb(x, position_ids, layer_type)`` on the same inputs (5.18 line 561).

The masks carry the bidirectional attention among the tokens of one image
when the prompt has ``token_type_ids`` (1 at image tokens), as the processor
returns them: 5.18 ``create_masks_for_vision_model`` (lines 709-767), 4.57.6
``token_type_ids_mask_function`` (lines 729-761, 935-950). Without them the
model attends causally and so does the replay. The prefix the loop runs on
ends at the last visual token, so every image's block is inside it, and a
causal-or-block mask cut to its first P rows and columns (sliding or not) is
the mask of the prefix: `prefix_layer_kwargs` applies to each type's mask.

**The lens norm.** ``Gemma3RMSNorm`` scales by ``1 + weight`` in float32
(5.18 line 149; 4.57.6 line 139), so `lens_norm_weight` is ``1 + weight``
and `scale_lens_norm` scales that. The fused lens operators take the norm
weight in the dtype of the activations, so ``1 + weight`` is computed in
float32 and cast to the weight's (the model's) dtype: exact for float32
models; for bfloat16 ones it is rounded once (relative error at most 2^-9),
where HF multiplies by the float32 sum. The parity oracle reads the same
weight.

**No logit softcapping in the lens.** ``Gemma3ForConditionalGeneration``
applies none at its ``lm_head`` (5.18 line 1028; 4.57.6 line 1120);
``final_logit_softcapping`` is applied only by the text-only
``Gemma3ForCausalLM`` (5.18 lines 644-647; 4.57.6 lines 675-678). The logit
lens is the method's: final norm + unembedding (SPEC §2).

The embedding scale (``sqrt(hidden_size)``, ``Gemma3TextScaledWordEmbedding``)
is inside the input of layer 0 already.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Sequence

import torch

from .base import LayerKwargs
from .calls import batch_dim, cache_length, kwarg_tensors, prefix_layer_kwargs
from .llava import LlavaAdapter
from .matching import encoded_order, equality_classes
from .registry import register_adapter

__all__ = ["Gemma3Adapter", "LayerTypeKwargs"]


class LayerTypeKwargs(LayerKwargs):
    """The keyword arguments that differ by attention type: `types[l]` is layer
    l's type and `per_type[type]` the arguments a layer of that type gets
    instead of layer 0's (``attention_mask``, and on 5.x
    ``position_embeddings``)."""

    def __init__(self, types: Sequence[str], per_type: Dict[str, Dict]):
        missing = sorted(set(types) - set(per_type))
        if missing:
            raise ValueError(f"LayerTypeKwargs: 'per_type' has no arguments for the layer types {missing}")
        self.types = list(types)
        self.per_type = per_type

    def layer_kwargs(self, layer: int, kwargs: Dict) -> Dict:
        return {**kwargs, **self.per_type[self.types[layer]]}

    def prefix(self, P: int) -> "LayerTypeKwargs":
        return LayerTypeKwargs(self.types, {t: prefix_layer_kwargs(kw, P) for t, kw in self.per_type.items()})

    def _tensors(self):
        for kw in self.per_type.values():
            for key, x in kwarg_tensors(kw):
                d = batch_dim(key, x)
                if d is not None and x.shape[d] > 1:  # a batch dimension of 1 broadcasts
                    yield x, d

    def rows(self, index: List[int]) -> "LayerTypeKwargs":
        def pick(key, v):
            if isinstance(v, (tuple, list)):
                return type(v)(pick(key, x) for x in v)
            if not isinstance(v, torch.Tensor):
                return v
            d = batch_dim(key, v)
            if d is None or v.shape[d] == 1:
                return v
            return v.index_select(d, torch.tensor(index, device=v.device))

        return LayerTypeKwargs(self.types, {t: {k: pick(k, v) for k, v in kw.items()}
                                            for t, kw in self.per_type.items()})

    def same_rows(self, a: int, b: int) -> bool:
        return all(torch.equal(x.select(d, a), x.select(d, b)) for x, d in self._tensors())


class Gemma3Adapter(LlavaAdapter):
    """Gemma 3: LLaVA's prompt handling, per-attention-type layer arguments and
    a ``1 + weight`` final norm."""

    model_classes = ("Gemma3ForConditionalGeneration",)

    prompt_keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "token_type_ids")

    def encoded_order(self, encoded, n_images: int) -> Optional[List[int]]:
        """Gemma 3's encoded images are one [n, mm_tokens_per_image, D] tensor, and
        5.x `generate(num_return_sequences=K)` repeats each image K times in a
        row (``generation/utils.py`` ``_expand_multimodal_outputs``, 5.18 lines
        1113-1156: a two-image prompt's rows get [a, a] and [b, b]). Stacked, the
        entries cannot be told apart by identity as a list's can; they are told
        apart by value (identical images are interchangeable)."""
        order = encoded_order(encoded, n_images)
        pooled = getattr(encoded, "pooler_output", None)
        if order is not None or not isinstance(pooled, torch.Tensor) or pooled.dim() != 3:
            return order
        order = equality_classes(list(pooled))
        return order if len(set(order)) == n_images else None

    def image_tokens(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    def lens_norm_weight(self) -> torch.Tensor:
        weight = self.final_norm_weight()
        # The lens operators take the weight in the activations' dtype (the model's):
        # exact in float32; in bfloat16, 1 + w is rounded once (relative 2^-9).
        return (1.0 + weight.float()).to(weight.dtype)

    def scale_lens_norm(self, factor: float) -> None:
        with torch.no_grad():  # 1 + w' = factor * (1 + w)
            self.final_norm().weight.mul_(factor).add_(factor - 1.0)

    def layer_types(self) -> List[str]:
        types = list(self.text_config().layer_types)
        if len(types) != self.num_layers:
            raise ValueError(f"actreplay_ext: text_config.layer_types has {len(types)} entries for "
                             f"{self.num_layers} decoder layers")
        return types

    def layer_loop_module(self):
        return self.text_model()

    def layer_kwargs_from_call(self, kwargs: Dict) -> Optional[LayerTypeKwargs]:
        text = self.text_model()
        if cache_length(kwargs) > 0:
            return None  # a decode step: the replay reads prefills only
        masks = kwargs.get("attention_mask")
        types = self.layer_types()
        if not isinstance(masks, dict) or not set(types) <= set(masks):
            raise RuntimeError(
                "actreplay_ext: the Gemma 3 text model was not given its attention masks by layer type "
                f"(attention_mask is a {type(masks).__name__}); call the Gemma3ForConditionalGeneration model"
            )
        per_type = {t: {"attention_mask": masks[t]} for t in set(types)}
        rotary = text.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            # 5.x: one rotary table per type, passed as the layer's position_embeddings
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = text.embed_tokens(kwargs["input_ids"])
            positions = kwargs.get("position_ids")
            if positions is None:  # as the text model makes them
                positions = (torch.arange(embeds.shape[1], device=embeds.device) + cache_length(kwargs)).unsqueeze(0)
            with torch.no_grad():
                for t in per_type:
                    per_type[t]["position_embeddings"] = rotary(embeds, positions, t)
        # 4.57: every layer gets both tables (layer 0's kwargs) and picks its own
        return LayerTypeKwargs(types, per_type)


register_adapter(Gemma3Adapter)
