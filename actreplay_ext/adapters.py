"""Per-family adapters: where a HuggingFace VLM keeps what Activation Replay
reads and offsets, on transformers 4.57.x and 5.x.

An adapter locates the text decoder layers (whose residual stream the method
reads), the final RMSNorm and unembedding (the logit lens), the vision tower,
the visual placeholder token ids, and how to turn a prompt into the inputs of
the model's forward. Adding a family is one subclass and one registry entry.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

__all__ = ["ModelAdapter", "QwenVLAdapter", "get_adapter", "register_adapter", "supported_families"]


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

    def unembed(self) -> torch.Tensor:
        return self.model.lm_head.weight

    def lens_norm_weight(self) -> torch.Tensor:
        """The weight the logit lens's RMSNorm multiplies by: ``h * rsqrt(mean(h^2) + eps) * w``
        (SPEC §2). Most families scale by the final norm's weight itself; Gemma's
        RMSNorm scales by ``1 + weight`` and overrides this. Everything that reads
        the lens (engine, direct mode, analysis, the parity oracle) takes it from here."""
        return self.final_norm().weight

    def scale_lens_norm(self, factor: float) -> None:
        """Multiply the effective lens norm weight (`lens_norm_weight`) by `factor`,
        in place: sharpens a random tiny model's lens (`tiny.finish`)."""
        with torch.no_grad():
            self.final_norm().weight.mul_(factor)

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
        return int(self.unembed().shape[0])

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

    def prompt_from_forward(self, kwargs: Dict, vision_calls: List) -> Dict:
        """The prompt of a forward call, as inputs for another model of the family.

        transformers 5.x `generate` runs the vision tower before the first
        forward and passes only `mm_encoder_outputs`; the pixel inputs are then
        taken from the vision tower's recorded calls (`vision_calls`, as
        (args, kwargs), images before videos as the model encodes them)."""
        prompt = {k: v for k, v in kwargs.items() if k in self.prompt_keys and v is not None}
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

    # ---- what the model's layer loop adds between decoder layers
    def extras_module(self) -> Optional[nn.Module]:
        """A module called in each forward before decoder layer 0 whose call
        carries per-prefill inputs that the model's layer loop adds to the
        residual stream between decoder layers (Qwen3-VL: the text model, with
        its deepstack features), or whose call carries the keyword arguments
        that differ between decoder layers (Gemma 3: the masks and rotary
        tables of its sliding-window and full-attention layers; see
        `prefill.LayerExtras.layer_kwargs`). None (the default): the family
        adds nothing and every layer takes layer 0's keyword arguments, so the
        decoder layers alone reproduce the residual stream."""
        return None

    def extras_from_call(self, args: tuple, kwargs: Dict):
        """The `prefill.LayerExtras` of one call of `extras_module()`, or None
        when this call adds nothing (e.g. a decode step)."""
        return None


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

    def tokens_per_item(self, grid_thw):
        merge = int(self.model.config.vision_config.spatial_merge_size)
        return grid_thw.prod(-1) // (merge * merge)

    def model_state(self):
        return {"rope_deltas": getattr(self.model.model, "rope_deltas", None)}

    def restore_state(self, state):
        if hasattr(self.model.model, "rope_deltas"):
            self.model.model.rope_deltas = state["rope_deltas"]


def equality_classes(items: Sequence) -> List[int]:
    """For each item (a tensor, or a tuple of tensors compared element-wise),
    the index of its class of equal items, classes numbered in order of first
    appearance. How encoded images that cannot be told apart by identity are
    matched to the recorded ones."""
    reps: List[Tuple] = []
    out: List[int] = []
    for it in items:
        it = it if isinstance(it, tuple) else (it,)
        j = next((j for j, r in enumerate(reps)
                  if all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(r, it))), None)
        if j is None:
            reps.append(it)
            j = len(reps) - 1
        out.append(j)
    return out


def encoded_order(encoded, n_items: int) -> Optional[List[int]]:
    """Which recorded image (or video) each entry of an encoded `pooler_output`
    list is, told apart by identity. transformers 5.x `generate` with
    `num_return_sequences=K` repeats the entry objects to match the repeated
    rows (5.18 repeats each item K times in a row: [a, a, b, b], not
    [a, b, a, b]), so this is the order the model's rows actually received;
    the base model's prompt must follow it. None when it cannot be told."""
    pooled = getattr(encoded, "pooler_output", None)
    if not isinstance(pooled, (list, tuple)):
        return None
    first: List = []
    order = []
    for entry in pooled:
        j = next((i for i, e in enumerate(first) if e is entry), None)
        if j is None:
            first.append(entry)
            j = len(first) - 1
        order.append(j)
    return order if len(first) == n_items else None


_REGISTRY: Dict[str, Type[ModelAdapter]] = {}


def register_adapter(cls: Type[ModelAdapter]) -> Type[ModelAdapter]:
    for name in cls.model_classes:
        _REGISTRY[name] = cls
    return cls


register_adapter(QwenVLAdapter)


def supported_families() -> List[str]:
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module, argument: str = "model") -> ModelAdapter:
    name = type(model).__name__
    cls = _REGISTRY.get(name)
    if cls is None:
        raise TypeError(
            f"actreplay_ext: argument '{argument}' is a {name}, which is not a supported model family; "
            f"supported: {', '.join(supported_families())} (see the README on adding an adapter)"
        )
    return cls(model)


def check_pair(rlvr: ModelAdapter, base: ModelAdapter) -> None:
    """Base and RLVR models must share the architecture the method relies on."""
    checks: List[Tuple[str, object, object]] = [
        ("hidden size", rlvr.hidden_size, base.hidden_size),
        ("vocabulary size", rlvr.vocab_size, base.vocab_size),
        ("number of decoder layers", rlvr.num_layers, base.num_layers),
        ("visual token ids", rlvr.visual_token_ids(), base.visual_token_ids()),
    ]
    for what, a, b in checks:
        if a != b:
            raise ValueError(
                f"actreplay_ext: the RLVR and base models differ in {what}: RLVR has {a}, base has {b}; "
                "Activation Replay needs a base model and the RLVR model post-trained from it"
            )
