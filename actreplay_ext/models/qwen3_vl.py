"""Qwen3-VL (`Qwen3VLForConditionalGeneration`), on transformers 4.57.x and 5.x.

Module paths and prompt handling are Qwen2.5-VL's (`QwenVLAdapter`): decoder
layers ``model.model.language_model.layers``, final norm
``model.model.language_model.norm`` (``Qwen3VLTextRMSNorm``, ``variance_epsilon``),
``model.lm_head``, vision tower ``model.model.visual``, the token ids on the
top-level config, ``model.model.rope_deltas`` as the mutable state, and on 5.x
``mm_token_type_ids`` for the M-RoPE index (5.x ``compute_3d_position_ids``
raises without it when a grid is given). One image of grid (t, h, w) is
``t*h*w / spatial_merge_size**2`` placeholder tokens, as for Qwen2.5-VL.

What is new is **deepstack**. The vision tower also returns features taken
after some of its blocks (``deepstack_visual_indexes``), and the text model's
layer loop adds feature list entry i at the visual positions
(``visual_pos_masks``) to the hidden states *after* decoder layer i, for
i < len(deepstack_visual_embeds) (``models/qwen3_vl/modeling_qwen3_vl.py``,
``Qwen3VLTextModel.forward`` layer loop: 5.18 lines 834-851, 4.57.6 lines
850-867; ``_deepstack_process``: 5.18 lines 860-868, 4.57.6 lines 876-883).
Both arrive as keyword arguments of the text model's forward (5.18 lines
1252-1261, 4.57.6 lines 1224-1233), so the
adapter records them with a forward pre-hook on the text model
(`layer_loop_module`) and the replay loop, which runs the decoder layers alone,
adds them after the same layers (`Deepstack.after_layer`). Reading them there
rather than from the vision tower keeps us clear of its version-specific return
value (4.57.6: a ``(merged, deepstack_list)`` tuple, line 753; 5.18: a
``BaseModelOutputWithDeepstackFeatures``, lines 739-743) and of how 5.x
``generate`` encodes the images before the first forward and repeats the
encoded features for ``num_return_sequences`` (``generation/utils.py``
``_expand_multimodal_outputs``, deepstack lines 1158-1171): the RLVR rows get
exactly the features the model used. The base model's prompt is rebuilt from
the recorded vision-tower calls (``visual(pixel_values, grid_thw=...)`` in
both versions) by `ModelAdapter.prompt_from_forward`, as for Qwen2.5-VL, and
the base model computes its own features from those pixels.

What "the output of decoder layer l" means here. HF's ``output_hidden_states``
does not answer it the same way in the two versions:

* 5.18 records the decoder layer's return value with a forward hook
  (``_can_record_outputs = {"hidden_states": Qwen3VLTextDecoderLayer}``, lines
  635-638; ``utils/output_capturing.py`` lines 132-133) and
  ``_deepstack_process`` clones before adding (line 865), so
  ``hidden_states[l + 1]`` is the layer's return value *without* the deepstack
  features, which is not what layer l + 1 receives.
* 4.57.6 records the same tensor object (``_can_record_outputs`` lines
  558-561; ``utils/generic.py`` ``check_model_inputs`` lines 1032-1033) and
  ``_deepstack_process`` then writes the sum into it in place (line 882), so
  ``hidden_states[l + 1]`` *is* the residual stream after the deepstack add.

(``test_engine_reads_the_residual_stream_of_the_whole_model`` checks both.)

We take h_out(l) = the residual stream leaving layer l = the decoder layer's
return value plus the deepstack features of layer l = the input of layer l+1.
It is the same in both versions, it keeps SPEC §3's identity h_in(l) =
h_out(l - 1) on which `alignment="published"` rests, and it is what the logit
lens of the next layer's input reads. The engine (`core.run_layers`), the direct
mode and the parity oracle (`reference.published_replay`, which reads h_out(l)
as the input of layer l + 1) all use it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .base import BetweenLayers
from .qwen2_vl import QwenVLAdapter
from .registry import register_adapter

__all__ = ["Qwen3VLAdapter", "Deepstack"]


class Deepstack(BetweenLayers):
    """The deepstack features of one prefill: `visual` [B, T] bool (the
    model's ``visual_pos_masks``) and `embeds`, one [n_visual_total, D] tensor
    per text layer 0 .. len(embeds)-1, rows in (batch row, position) order."""

    def __init__(self, visual: torch.Tensor, embeds: Sequence[torch.Tensor]):
        if visual.dim() != 2 or visual.dtype != torch.bool:
            raise ValueError(
                f"Deepstack: 'visual' must be a [B, T] bool mask, got {tuple(visual.shape)} {visual.dtype}")
        n = int(visual.sum())
        for i, e in enumerate(embeds):
            if e.dim() != 2 or e.shape[0] != n:
                raise ValueError(f"Deepstack: 'embeds[{i}]' must be [{n}, D] (one row per visual position), "
                                 f"got {tuple(e.shape)}")
        self.visual = visual
        self.embeds = list(embeds)

    @property
    def layers(self) -> int:
        """Text layers that receive deepstack features (the first ones)."""
        return len(self.embeds)

    def after_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer >= len(self.embeds):
            return hidden
        mask = self.visual.to(hidden.device)
        feats = self.embeds[layer].to(hidden.device, hidden.dtype)
        # hidden[mask] + feats in the hidden dtype, as the model adds them; out of place.
        return hidden.masked_scatter(mask.unsqueeze(-1), hidden[mask] + feats)

    def _row_slices(self) -> List[slice]:
        counts = self.visual.sum(1).tolist()
        starts = [sum(counts[:b]) for b in range(len(counts))]
        return [slice(s, s + c) for s, c in zip(starts, counts)]

    def prefix(self, P: int) -> "Deepstack":
        if P >= self.visual.shape[1]:
            return self
        before = torch.zeros_like(self.visual)
        before[:, :P] = True
        index = before[self.visual].nonzero().squeeze(1)  # the feature rows of visual positions < P
        return Deepstack(self.visual[:, :P], [e.index_select(0, index.to(e.device)) for e in self.embeds])

    def rows(self, index: List[int]) -> "Deepstack":
        slices = self._row_slices()
        pick = lambda e: torch.cat([e[slices[b]] for b in index], 0)  # noqa: E731
        rows = torch.tensor(index, device=self.visual.device)
        return Deepstack(self.visual.index_select(0, rows), [pick(e) for e in self.embeds])

    def same_rows(self, a: int, b: int) -> bool:
        if not torch.equal(self.visual[a], self.visual[b]):
            return False
        sa, sb = self._row_slices()[a], self._row_slices()[b]
        return all(torch.equal(e[sa], e[sb]) for e in self.embeds)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen2.5-VL's layout plus the deepstack features the text
    model adds after its first decoder layers."""

    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")

    def layer_loop_module(self):
        return self.text_model()

    def between_layers_from_call(self, kwargs: Dict) -> Optional[Deepstack]:
        embeds = kwargs.get("deepstack_visual_embeds")
        visual = kwargs.get("visual_pos_masks")
        if embeds is None or visual is None or len(embeds) == 0:
            return None  # text-only prompts and decode steps
        return Deepstack(visual.bool(), [e.detach() for e in embeds])

    def deepstack_layers(self) -> int:
        """Text layers that receive deepstack features (from the vision config)."""
        return len(self.model.config.vision_config.deepstack_visual_indexes)


register_adapter(Qwen3VLAdapter)
