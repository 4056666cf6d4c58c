"""What identifies a prompt's images and videos: its `input_ids` do not (every
visual position holds the same placeholder, so two prompts with the same text
and same-size images have the same ids). Targets and results record the hashes
of the pixels they were made from, and every path that matches a prompt to
them (`optimize`, `patch(targets=)`, `apply`, the command line) compares them.

The record is the set of hashes of the visual items: an image (or a frame
stack) for pixels shaped [..., C, H, W], a patch row for Qwen's flattened
[patches, C*t*p*p] pixels. A set, so that the same images repeated for beams
or `num_return_sequences`, or a subset of a batch's rows, still match; the
order of the images inside a prompt is not part of it. All-zero items (the
padding images of Idefics3 batches, which its vision tower drops) are left
out. Pixels are compared as the vision tower receives them: cast to its dtype
(then to bfloat16, exactly), so float32 pixels and the bf16 copy the model's
forward makes hash alike."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..models.base import ModelAdapter

__all__ = ["image_hashes", "images_differ", "vision_dtype"]

PIXEL_KEYS = ("pixel_values", "pixel_values_videos")
_weights: Dict = {}


def _item_weights(length: int, salt: int, device) -> torch.Tensor:
    """Fixed pseudo-random int64 weights for items of `length` values (cached)."""
    key = (length, salt, str(device))
    if key not in _weights:
        g = torch.Generator().manual_seed(0x5EED + 1000003 * salt + length)
        _weights[key] = torch.randint(-(2**62), 2**62, (length,), generator=g, dtype=torch.long).to(device)
    return _weights[key]


def _items(t: torch.Tensor) -> torch.Tensor:
    """[items, values]: images for [..., C, H, W] pixels, rows for 2-D patch rows."""
    if t.dim() >= 4:
        return t.reshape(-1, t.shape[-3] * t.shape[-2] * t.shape[-1])
    return t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1)


def vision_dtype(adapter: ModelAdapter) -> torch.dtype:
    """The dtype the model's vision tower computes in (what its pixels are cast to)."""
    tower = adapter.vision_tower()
    param = next(tower.parameters(), None) if tower is not None else None
    return param.dtype if param is not None and param.dtype.is_floating_point else torch.float32


def image_hashes(inputs: Dict, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Sorted distinct int64 hashes of the visual items among `inputs`' pixels
    (CPU) as a vision tower in `dtype` sees them, or None when `inputs` carry no
    pixels (text only, or features encoded elsewhere: nothing to compare)."""
    found = []
    for salt, key in enumerate(PIXEL_KEYS):
        t = inputs.get(key)
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not t.dtype.is_floating_point:
            continue
        items = _items(t.detach()).to(dtype).to(torch.bfloat16)
        items = items[items.ne(0).any(1)]  # all-zero items are padding
        if items.shape[0] == 0:
            continue
        bits = items.view(torch.int16).long()
        # a linear hash modulo 2**64 (int64 arithmetic wraps): exact, so the same on every device
        h = (bits * _item_weights(bits.shape[1], salt, bits.device)).sum(1) + bits.shape[1] * (salt + 1)
        found.append(h.cpu())
    if not found:
        return None
    return torch.unique(torch.cat(found))


def images_differ(made_from: Optional[torch.Tensor], now: Optional[torch.Tensor], subset: bool = False) -> bool:
    """Whether `now`'s images are not those `made_from` records (when both are
    known): not the same set, or with `subset`, not all among them."""
    if made_from is None or now is None:
        return False
    made_from, now = made_from.cpu(), now.cpu()
    if subset:
        return not bool(torch.isin(now, made_from).all())
    return made_from.shape != now.shape or not torch.equal(made_from, now)
