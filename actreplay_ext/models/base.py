"""What the engine needs from a model family: `ModelAdapter`, and the two
kinds of per-prefill state (`PrefillState`) a family's own layer loop may carry that running
the decoder layers alone must reproduce (`BetweenLayers`, `LayerKwargs`).

An adapter locates the text decoder layers (whose residual stream the method
reads), the final norm and unembedding (the logit lens), the vision tower, the
visual placeholder token ids, and how to turn a prompt into the inputs of the
model's forward, on transformers 4.57.x and 5.x.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .calls import bound_kwargs
from .matching import encoded_order
from .offload import execution_device, loaded_tensor

__all__ = ["ModelAdapter", "PrefillState", "BetweenLayers", "LayerKwargs"]


class PrefillState:
    """Per-prefill state of a model's layer loop that the replay carries along
    with the captured layer-0 input: cut to a prefix, picked by batch rows,
    compared between rows, like the prefill itself."""

    def prefix(self, P: int) -> "PrefillState":
        """The same for the prefix of the first P positions (SPEC §5.3)."""
        return self

    def rows(self, index: List[int]) -> "PrefillState":
        """The same for batch rows `index`, in that order."""
        return self

    def same_rows(self, a: int, b: int) -> bool:
        """Whether rows a and b carry equal state (identical rows are optimised once)."""
        return True


class BetweenLayers(PrefillState):
    """What a model's layer loop adds to the residual stream *between* decoder
    layers in one prefill (Qwen3-VL adds its deepstack visual features after
    its first layers). The residual stream leaving decoder layer l, h_out(l),
    is `after_layer(l, layer_output)`: the input of layer l + 1. Built by
    `ModelAdapter.between_layers_from_call`; families without it have none."""

    def after_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [B, T, D], the return value of decoder layer `layer`, as the
        next layer receives it. Out of place (the loop differentiates through it)."""
        return hidden


class LayerKwargs(PrefillState):
    """The keyword arguments a model's layer loop gives decoder layer l where
    they differ from layer 0's, which is all the replay captures (Gemma 3
    gives its sliding-window and full-attention layers different masks and
    rotary tables). Built by `ModelAdapter.layer_kwargs_from_call`; without
    it every layer gets layer 0's arguments."""

    def layer_kwargs(self, layer: int, kwargs: Dict) -> Dict:
        """The keyword arguments of decoder layer `layer`, given layer 0's
        (`kwargs`, already cut to the prefix the loop runs on). Not in place."""
        return kwargs


class ModelAdapter:
    """What the engine needs from a model family. Subclasses override the
    accessors; the defaults cover the common HF layout."""

    #: class names of the ForConditionalGeneration models this adapter serves
    model_classes: Sequence[str] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # ---- structure
    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg)

    def text_model(self) -> nn.Module:
        """The causal text model; HF VLMs keep it at model.model.language_model."""
        return self.model.model.language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model().layers

    def final_norm(self) -> nn.Module:
        return self.text_model().norm

    def norm_eps(self) -> float:
        norm = self.final_norm()
        for name in ("variance_epsilon", "eps", "epsilon"):
            if hasattr(norm, name):
                return float(getattr(norm, name))
        raise AttributeError(f"cannot find the epsilon of {type(norm).__name__}")

    def unembedding(self) -> nn.Module:
        """The module whose ``weight`` is the unembedding ``[V, D]`` (the lm_head)."""
        return self.model.lm_head

    def unembed(self) -> torch.Tensor:
        """The unembedding ``[V, D]`` with its data, also where accelerate offloads the lm_head."""
        return loaded_tensor(self.unembedding(), "weight", "the unembedding (lm_head.weight)")

    def final_norm_weight(self) -> torch.Tensor:
        """The final norm's weight with its data, also where accelerate offloads the norm."""
        return loaded_tensor(self.final_norm(), "weight", "the final norm's weight")

    def lens_norm_weight(self) -> torch.Tensor:
        """The weight the logit lens's RMSNorm multiplies by: ``h * rsqrt(mean(h^2) + eps) * w``
        (SPEC §2). Most families scale by the final norm's weight itself; Gemma's
        RMSNorm scales by ``1 + weight`` and overrides this. Everything that reads
        the lens (engine, direct mode, analysis, the parity oracle) takes it from here."""
        return self.final_norm_weight()

    def scale_lens_norm(self, factor: float) -> None:
        """Multiply the effective lens norm weight (`lens_norm_weight`) by `factor`,
        in place: sharpens a random tiny model's lens (`tiny.finish`)."""
        with torch.no_grad():
            self.final_norm().weight.mul_(factor)

    def input_device(self) -> torch.device:
        """Where the model's inputs go: where its token embedding runs (with accelerate's
        offloading its weights are on the meta device; its hook's execution device)."""
        return execution_device(self.model.get_input_embeddings())

    def vision_tower(self) -> Optional[nn.Module]:
        return None

    def visual_token_ids(self) -> List[int]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        return int(self.text_config().hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.unembedding().weight.shape[0])  # the shape only: an offloaded weight is not loaded

    # ---- inputs
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.visual_token_ids(), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def forward_inputs(self, inputs: Dict) -> Dict:
        """The user's prompt dict as the model's forward takes it."""
        return dict(inputs)

    #: forward keywords that describe the prompt (as opposed to cache/output control)
    prompt_keys: Sequence[str] = ("input_ids", "attention_mask", "position_ids", "pixel_values",
                                  "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                  "second_per_grid_ts", "mm_token_type_ids")

    #: forward keywords that carry the visual input itself (pixels, or features encoded before the forward)
    visual_input_keys: Sequence[str] = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs",
                                        "image_hidden_states")

    def has_visual_input(self, kwargs: Dict, vision_calls: List) -> bool:
        """Whether a forward brings images or videos (pixels, encoded features, or
        vision-tower calls made for it), not only their placeholder tokens."""
        if vision_calls:
            return True
        for key in self.visual_input_keys:
            v = kwargs.get(key)
            if isinstance(v, dict):
                v = [x for x in v.values() if x is not None] or None
            if v is not None:
                return True
        return False

    def encoded_calls(self, kwargs: Dict) -> int:
        """How many vision-tower calls made the features a forward is given
        (transformers 5.x `generate` encodes each modality of `mm_encoder_outputs`
        in one call just before the first forward); 0 when it encodes its own."""
        encoded = kwargs.get("mm_encoder_outputs")
        if not isinstance(encoded, dict):
            return 0
        return sum(1 for v in encoded.values() if v is not None)

    def encoded_visual_rows(self, kwargs: Dict) -> Optional[int]:
        """How many visual tokens the features encoded before the forward fill
        (transformers 5.x `mm_encoder_outputs`), or None when the forward encodes
        its own pixels. More rows than placeholder tokens in the forward's ids
        means the forward is one chunk of a longer prompt."""
        encoded = kwargs.get("mm_encoder_outputs")
        if not isinstance(encoded, dict):
            return None
        rows = 0
        for out in encoded.values():
            pooled = getattr(out, "pooler_output", out)
            if pooled is None:
                continue
            for entry in (pooled if isinstance(pooled, (list, tuple)) else [pooled]):
                if isinstance(entry, torch.Tensor):
                    rows += entry.numel() // max(entry.shape[-1], 1)
        return rows

    def recorded_visual_tokens(self, vision_calls: List) -> Optional[int]:
        """How many placeholder tokens the images and videos of these vision-tower
        calls fill, or None when it cannot be told from the calls alone. A
        forward whose ids hold fewer (or not a whole multiple, as repeated rows
        of Pass@K give) is one chunk of a longer prompt."""
        return None

    def prompt_kwargs(self, kwargs: Dict) -> Dict:
        """The keywords of a forward call that describe the prompt (`prompt_keys`, not None)."""
        return {k: v for k, v in kwargs.items() if k in self.prompt_keys and v is not None}

    def prompt_from_forward(self, kwargs: Dict, vision_calls: List) -> Dict:
        """The prompt of a forward call, as inputs for another model of the family.

        transformers 5.x `generate` runs the vision tower before the first
        forward and passes only `mm_encoder_outputs`; the pixel inputs are then
        taken from the vision tower's recorded calls (`vision_calls`, as
        (args, kwargs), images before videos as the model encodes them)."""
        prompt = self.prompt_kwargs(kwargs)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        modalities = [m for m in ("image", "video") if encoded.get(m) is not None]
        if modalities:
            calls = vision_calls[-len(modalities):]
            if len(calls) != len(modalities):
                raise RuntimeError(
                    "actreplay_ext: the vision inputs of this prompt were not seen (the model was given "
                    "precomputed mm_encoder_outputs); pass pixel inputs to generate()"
                )
            names = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
            token_ids = dict(zip(("image", "video"), self.visual_token_ids()))
            for modality, (args, kw) in zip(modalities, calls):
                pix, grid = names[modality]
                pixels = args[0] if args else kw.get("hidden_states", kw.get("pixel_values"))
                grids = kw.get("grid_thw", args[1] if len(args) > 1 else None)
                order = encoded_order(encoded[modality], grids.shape[0])
                if order is not None:  # the items in the order the model's rows received them
                    prompt[pix], prompt[grid] = self._select_items(pixels, grids, order)
                else:
                    prompt[pix], prompt[grid] = self._expand_to_rows(
                        prompt["input_ids"], token_ids[modality], pixels, grids)
        return prompt

    @staticmethod
    def _select_items(pixels, grids, items):
        """The pixel rows and grid rows of images/videos `items`, in that order."""
        patches = grids.prod(-1).tolist()
        offsets = [sum(patches[:i]) for i in range(len(patches))]
        rows = [r for i in items for r in range(offsets[i], offsets[i] + patches[i])]
        return (pixels.index_select(0, torch.tensor(rows, device=pixels.device)),
                grids.index_select(0, torch.tensor(items, device=grids.device)))

    def tokens_per_item(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Placeholder tokens of each image/video given its (t, h, w) patch grid."""
        raise NotImplementedError

    def _expand_to_rows(self, input_ids, token_id, pixels, grids):
        """`generate(num_return_sequences=K)` in transformers 5.x encodes each
        image once and repeats the prompt rows K times; repeat the images (and
        their patch rows) to match the rows, in row order."""
        per_row = (input_ids == token_id).sum(1).tolist()
        per_item = self.tokens_per_item(grids).tolist()
        if sum(per_row) == sum(per_item):
            return pixels, grids
        K = sum(per_row) // max(sum(per_item), 1)
        if K * sum(per_item) != sum(per_row) or len(per_row) % K:
            raise RuntimeError("actreplay_ext: cannot match the recorded vision inputs to the prompt rows")
        items, item = [], 0
        for s in range(len(per_row) // K):  # rows s*K .. s*K+K-1 repeat sample s
            need, mine = per_row[s * K], []
            while need > 0:
                mine.append(item)
                need -= per_item[item]
                item += 1
            items += mine * K
        return self._select_items(pixels, grids, items)

    def model_state(self) -> Dict:
        """Mutable state that a forward pass may change and the engine must restore."""
        return {}

    def restore_state(self, state: Dict) -> None:
        pass

    # ---- what the model's layer loop carries beyond layer 0's arguments
    def layer_loop_module(self) -> Optional[nn.Module]:
        """The module whose forward runs the decoder-layer loop and whose call
        carries per-prefill state the loop uses (the text model), for families
        with a `BetweenLayers` or `LayerKwargs`; None (the default): the decoder
        layers alone, each given layer 0's arguments, reproduce the residual stream."""
        return None

    def layer_loop_call(self, args: tuple, kwargs: Dict) -> Dict:
        """A call of `layer_loop_module()` as keywords."""
        return bound_kwargs(self.layer_loop_module().forward, args, kwargs)

    def between_layers_from_call(self, kwargs: Dict) -> Optional[BetweenLayers]:
        """What one call of `layer_loop_module()` (as keywords) adds between
        layers, or None (a decode step, a family that adds nothing)."""
        return None

    def layer_kwargs_from_call(self, kwargs: Dict) -> Optional[LayerKwargs]:
        """The per-layer arguments of one call of `layer_loop_module()`, or None."""
        return None

    def encoded_order(self, encoded, n_images: int) -> Optional[List[int]]:
        """Which recorded image each entry of the encoded images is (`matching.encoded_order`)."""
        return encoded_order(encoded, n_images)
