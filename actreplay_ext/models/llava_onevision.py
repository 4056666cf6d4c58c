"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`: a SigLIP vision
tower, a projector, "anyres" image tiling and a causal Qwen2 text model), on
transformers 4.57.x and 5.x.

Module paths (the same in both versions; transformers/models/llava_onevision/
modeling_llava_onevision.py, `LlavaOnevisionModel.__init__` and
`LlavaOnevisionForConditionalGeneration.__init__`):

* decoder layers: ``model.model.language_model.layers`` (an AutoModel, Qwen2Model)
* final norm:     ``model.model.language_model.norm`` (Qwen2RMSNorm, ``variance_epsilon``)
* unembedding:    ``model.lm_head.weight``
* vision tower:   ``model.model.vision_tower`` (AutoModel, SiglipVisionModel)
* visual tokens:  ``config.image_token_id`` and ``config.video_token_id`` (aliases
  of ``image_token_index`` / ``video_token_index``)

Placeholder tokens: an image of size (H, W) is tiled into the best grid
pinpoint (gh x gw tiles of ``vision_config.image_size``) plus one base tile;
its features are the base tile's t*t tokens (t = image_size / patch_size),
then the tiles' t*gh x t*gw token grid with the letterbox padding cut off
(`unpad_image`), shrunk by bilinear interpolation when larger than
``vision_aspect_ratio`` ("anyres_max_N") allows, with ``image_newline``
appended to every row. Images of a prompt with several images
(``batch_num_images`` > 1) keep the base tile only: t*t + 1 tokens. A video
of F frames is F * ceil(t/2)^2 + 1 tokens (2x2 pooling, one newline).
`image_token_counts` and `video_token_count` compute these.

What `generate` passes to the top-level forward at prefill:

* 4.57: ``input_ids, attention_mask, position_ids, cache_position, pixel_values,
  image_sizes, pixel_values_videos, image_sizes_videos`` (and ``batch_num_images``
  when given); the vision tower runs inside that forward.
  ``num_return_sequences=K`` repeats the pixel rows, so the forward's own
  inputs are the prompt.
* 5.x:  ``input_ids, position_ids, past_key_values, mm_encoder_outputs={"image": ..., "video": ...}``
  (no pixels, no ``image_sizes``, no ``batch_num_images``: generate pops every
  argument of `get_image_features` / `get_video_features` and runs them first).
  The vision tower was called with the tiles of all images as one positional
  tensor [n_tiles, 3, S, S] (the padding tiles of ``pixel_values`` dropped),
  then with the frames of all videos [n_videos * F, 3, S, S]. The encoded
  images are a list with one [n_tokens, D] tensor per image (repeated
  by identity for ``num_return_sequences``); the videos one [n_videos, n_tokens, D]
  tensor (repeated by value). The image sizes are gone, so the adapter
  infers, for each encoded image, a tiling and an image size that give the
  same features (from its newline layout, the grid pinpoints and the number
  of recorded tiles; an ambiguity is settled by encoding the candidates with
  the model itself), and rebuilds ``pixel_values`` [n_tiles, 3, S, S],
  ``image_sizes`` and ``batch_num_images`` for the base model. Non-default
  ``vision_feature_layer`` / ``vision_feature_select_strategy`` /
  ``vision_aspect_ratio`` given to `generate` on 5.x are not seen; the
  config's values are used.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .llava import LlavaAdapter
from .matching import equality_classes, first_appearance, identity_classes, same_values
from .registry import register_adapter

__all__ = ["LlavaOnevisionAdapter"]

_NOT_SEEN = ("actreplay_ext: the vision inputs of this prompt were not seen (the model was given precomputed "
             "mm_encoder_outputs); pass pixel_values / pixel_values_videos to generate()")


def _modeling():
    from transformers.models.llava_onevision import modeling_llava_onevision

    return modeling_llava_onevision


class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: anyres images (``pixel_values`` [B, n_tiles, 3, S, S] with
    ``image_sizes`` [B, 2]) and pooled videos (``pixel_values_videos``)."""

    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    prompt_keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes",
                   "batch_num_images", "pixel_values_videos", "image_sizes_videos", "vision_feature_layer",
                   "vision_feature_select_strategy", "vision_aspect_ratio")

    def visual_token_ids(self) -> List[int]:
        cfg = self.model.config
        return [int(cfg.image_token_id), int(cfg.video_token_id)]

    # ------------------------------------------------------------- geometry
    @property
    def _tile(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def _patch(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def _side(self) -> int:
        """Tokens per side of one tile."""
        return self._tile // self._patch

    def _max_tiles(self, vision_aspect_ratio: Optional[str] = None) -> int:
        return int((vision_aspect_ratio or self.model.config.vision_aspect_ratio).removeprefix("anyres_max_"))

    def recorded_visual_tokens(self, vision_calls):
        return None  # anyres tilings: the token count depends on the image sizes, not in the calls

    def image_tokens(self) -> int:
        raise TypeError("actreplay_ext: a LLaVA-OneVision image has no fixed token count; "
                        "use image_token_counts(image_sizes)")

    def _shrunk(self, rows: int, cols: int, max_tiles: int) -> Tuple[int, int]:
        """The token grid after the model's size cap (bilinear shrink)."""
        ratio = math.sqrt(rows * cols / (max_tiles * self._side ** 2))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return rows, cols

    def _layout(self, size: Sequence[int], vision_aspect_ratio: Optional[str] = None) -> Tuple[int, int, int]:
        """(tiles incl. the base tile, rows, cols) of the packed grid of an image of `size` (H, W)."""
        mod = _modeling()
        pins = self.model.config.image_grid_pinpoints
        gh, gw = mod.get_anyres_image_grid_shape(list(size), pins, self._tile)
        grid = torch.empty(1, gh * self._side, gw * self._side, device="meta")
        _, rows, cols = mod.unpad_image(grid, list(size)).shape
        rows, cols = self._shrunk(rows, cols, self._max_tiles(vision_aspect_ratio))
        return 1 + gh * gw, rows, cols

    def image_token_counts(self, image_sizes, batch_num_images=None) -> List[int]:
        """Placeholder tokens of each image, as the model computes them."""
        sizes = [list(map(int, s)) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
        if batch_num_images is None:
            patched = [True] * len(sizes)
        else:
            nums = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else list(batch_num_images)
            patched = [n == 1 for n in nums for _ in range(n)]
            if len(patched) != len(sizes):
                raise ValueError(f"actreplay_ext: argument 'batch_num_images' counts {len(patched)} images but "
                                 f"'image_sizes' has {len(sizes)}")
        base = self._side ** 2
        out = []
        for size, p in zip(sizes, patched):
            if p:
                _, rows, cols = self._layout(size)
                out.append(base + rows * (cols + 1))
            else:
                out.append(base + 1)
        return out

    def video_token_count(self, frames: int) -> int:
        """Placeholder tokens of one video of `frames` frames."""
        return frames * math.ceil(self._side / 2) ** 2 + 1

    # ----------------------------------------------------- prompt rebuilding
    def prompt_from_forward(self, kwargs: Dict, vision_calls: List) -> Dict:
        prompt = self.prompt_kwargs(kwargs)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        modalities = [m for m in ("image", "video") if encoded.get(m) is not None]
        if not modalities:  # 4.57 (the forward encodes itself) or a text-only prompt
            return prompt
        calls = vision_calls[-len(modalities):]
        if len(calls) != len(modalities):
            raise RuntimeError(_NOT_SEEN)
        for modality, (args, kw) in zip(modalities, calls):
            pixels = args[0] if args else kw.get("pixel_values")
            if pixels is None:
                raise RuntimeError(_NOT_SEEN)
            if modality == "image":
                prompt.update(self._images_from_encoded(encoded["image"], pixels))
            else:
                prompt.update(self._videos_from_encoded(encoded["video"], pixels))
        return prompt

    def _images_from_encoded(self, encoded, tiles: torch.Tensor) -> Dict:
        pooled = getattr(encoded, "pooler_output", None)
        if not isinstance(pooled, (list, tuple)) or not pooled:
            raise RuntimeError("actreplay_ext: the encoded images of this prompt are not one tensor per image; "
                               "this transformers version's LLaVA-OneVision layout is not supported")
        order, firsts = identity_classes(pooled)  # num_return_sequences repeats the entry objects
        distinct = [pooled[i] for i in firsts]
        plans = self._image_plans(distinct, tiles)
        n_tiles, sizes, patched = plans
        starts = [sum(n_tiles[:i]) for i in range(len(n_tiles))]
        rows = [r for i in order for r in range(starts[i], starts[i] + n_tiles[i])]
        out = {"pixel_values": tiles.index_select(0, torch.tensor(rows, device=tiles.device)),
               "image_sizes": torch.tensor([sizes[i] for i in order], dtype=torch.long, device=tiles.device)}
        flags = [patched[i] for i in order]
        if not all(flags):
            out["batch_num_images"] = torch.tensor(_groups(flags), dtype=torch.long, device=tiles.device)
        return out

    def _image_plans(self, entries: List[torch.Tensor], tiles: torch.Tensor):
        """For each distinct encoded image: (number of tiles, an image size, patched),
        such that the recorded tiles and these sizes give the same features."""
        base = self._side ** 2
        newline = self.model.model.image_newline
        options = []
        for e, entry in enumerate(entries):
            nl = newline.to(entry.device, entry.dtype)
            if entry.shape[0] == base + 1 and torch.equal(entry[-1], nl):
                options.append([(1, (self._tile, self._tile), False)])  # base tile only
                continue
            body = entry[base:]
            is_nl = (body == nl).all(-1)
            hits = is_nl.nonzero()
            width = int(hits[0]) + 1 if hits.numel() else 0
            rows = body.shape[0] // width if width else 0
            if not width or rows * width != body.shape[0] or not bool(is_nl[width - 1::width].all()):
                raise RuntimeError(f"actreplay_ext: encoded image {e} ({entry.shape[0]} tokens) does not have the "
                                   "LLaVA-OneVision layout (base tile, then rows ending in image_newline)")
            found = self._sizes_for(rows, width - 1)
            if not found:
                raise RuntimeError(f"actreplay_ext: no image size gives encoded image {e} its {rows} x {width - 1} "
                                   "token grid with this model's image_grid_pinpoints")
            options.append([(n, size, True) for n, size in found])
        combos = [c for c in itertools.product(*options) if sum(o[0] for o in c) == tiles.shape[0]]
        if not combos:
            raise RuntimeError(f"actreplay_ext: the {len(entries)} encoded images cannot be split into the "
                               f"{tiles.shape[0]} tiles the vision tower saw")
        if len(combos) > 1:
            combos = [self._matching(combos, entries, tiles)]
        n_tiles, sizes, patched = (list(x) for x in zip(*combos[0]))
        return n_tiles, sizes, patched

    def _sizes_for(self, rows: int, cols: int) -> List[Tuple[int, Tuple[int, int]]]:
        """(tiles, image size) for each grid pinpoint that can give a `rows` x `cols`
        packed grid, checked against the model's own tiling functions."""
        mod = _modeling()
        from transformers.image_processing_utils import select_best_resolution

        pins = [list(p) for p in self.model.config.image_grid_pinpoints]
        t, p, max_tiles = self._side, self._patch, self._max_tiles()
        out = []
        for ph, pw in pins:
            gh, gw = ph // self._tile, pw // self._tile
            H, W = gh * t, gw * t
            cuts = [(H, c) for c in range(W, 0, -2)] + [(r, W) for r in range(H - 2, 0, -2)]
            for r, c in cuts:
                if self._shrunk(r, c, max_tiles) != (rows, cols):
                    continue
                for k in (1, 2, 4, 8, 16):  # an image of that shape, at growing scales
                    size = [r * p * k, c * p * k]
                    if list(select_best_resolution(size, pins)) != [ph, pw]:
                        continue
                    grid = torch.empty(1, H, W, device="meta")
                    if tuple(mod.unpad_image(grid, size).shape[1:]) == (r, c):
                        out.append((1 + gh * gw, tuple(size)))
                        break
        return out

    def _matching(self, combos, entries, tiles):
        """The candidate plan whose encoding by this model gives back the entries."""
        best, best_err = None, math.inf
        scale = max(float(e.abs().max()) for e in entries)
        for combo in combos[:32]:
            n_tiles, sizes, patched = zip(*combo)
            kwargs = {"image_sizes": torch.tensor(sizes, device=tiles.device)}
            if not all(patched):
                kwargs["batch_num_images"] = torch.tensor(_groups(patched), device=tiles.device)
            with torch.no_grad():
                out = self.model.model.get_image_features(tiles, **kwargs)
            feats = getattr(out, "pooler_output", out)
            if [f.shape for f in feats] != [e.shape for e in entries]:
                continue
            err = max(float((f.to(e) - e).abs().max()) for f, e in zip(feats, entries))
            if err < best_err:
                best, best_err = combo, err
        if best is None or best_err > 1e-3 * scale:
            raise RuntimeError("actreplay_ext: cannot tell which image sizes this prompt's encoded images had; "
                               "pass the base model's inputs to compute_targets()/optimize() directly")
        return best

    def _videos_from_encoded(self, encoded, frames: torch.Tensor) -> Dict:
        pooled = getattr(encoded, "pooler_output", None)
        if not isinstance(pooled, torch.Tensor) or pooled.dim() != 3:
            raise RuntimeError("actreplay_ext: the encoded videos of this prompt are not one [n_videos, tokens, D] "
                               "tensor; this transformers version's LLaVA-OneVision layout is not supported")
        per_frame = math.ceil(self._side / 2) ** 2
        F = (pooled.shape[1] - 1) // per_frame
        if F * per_frame + 1 != pooled.shape[1] or F == 0 or frames.shape[0] % F:
            raise RuntimeError(f"actreplay_ext: encoded videos of {pooled.shape[1]} tokens do not match the "
                               f"{frames.shape[0]} frames the vision tower saw")
        videos = frames.reshape(frames.shape[0] // F, F, *frames.shape[1:])
        if pooled.shape[0] == videos.shape[0]:
            return {"pixel_values_videos": videos}
        # num_return_sequences repeated the encoded videos (by value): match them to the recorded videos
        e_cls = equality_classes(list(pooled))
        _, v_first = first_appearance(list(videos), same_values)
        if len(set(e_cls)) != len(v_first):
            raise RuntimeError(f"actreplay_ext: cannot match the {pooled.shape[0]} encoded videos of this prompt to "
                               f"the {videos.shape[0]} videos the vision tower saw")
        idx = torch.tensor([v_first[c] for c in e_cls], device=videos.device)
        return {"pixel_values_videos": videos.index_select(0, idx)}


def _groups(patched: Sequence[bool]) -> List[int]:
    """A `batch_num_images` whose expansion gives these per-image tiling flags
    (the model tiles an image only when its sample has exactly one)."""
    out: List[int] = []
    for flag, run in itertools.groupby(patched):
        n = len(list(run))
        if flag:
            out += [1] * n
        elif n == 1:
            raise RuntimeError("actreplay_ext: a lone untiled image between tiled ones cannot be given to the "
                               "base model; pass the base model's inputs to compute_targets()/optimize() directly")
        else:
            out.append(n)
    return out


register_adapter(LlavaOnevisionAdapter)
