"""What identifies a prompt's images and videos: its `input_ids` do not (every
visual position holds the same placeholder, so two prompts with the same text
and same-size images have the same ids). Targets and results record the hashes
of the pixels they were made from, and every path that matches a prompt to
them (`optimize`, `patch(targets=)`, `apply`, the command line) compares them.

The record is the sequence of the prompt's visual items in the order the
model reads them, each hashed whole: an image or a video for Qwen's flattened
patch rows (split by their `*_grid_thw`, whose grid, and a video's seconds per
grid step, are hashed with the pixels: the same rows on another grid or at
another frame rate are another input), an image or tile for pixels shaped
[..., C, H, W]. Repeats are dropped, keeping the first appearance, so the same
images repeated for beams or `num_return_sequences` match, in either order of
repetition generate uses, while swapped images do not. All-zero items (the
padding images of Idefics3 batches, which its vision tower drops) are left
out. Pixels are compared as the vision tower receives them: cast to its dtype
(then to bfloat16, exactly), so float32 pixels and the bf16 copy the model's
forward makes hash alike. What it cannot tell: which row of a batch an image
belongs to when `apply` serves some rows of a learned batch (rows are matched
by their input_ids, and the images must be among the learned ones, in order)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..models.base import ModelAdapter

__all__ = ["image_hashes", "images_differ", "vision_dtype"]

#: (pixels, their per-item grid, seconds per grid step) of each modality
MODALITIES = (("pixel_values", "image_grid_thw", None),
              ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"))
_MAX_CACHED = 16
_weights: Dict = {}


def _item_weights(length: int, salt: int, device) -> torch.Tensor:
    """Fixed pseudo-random int64 weights for items of `length` values (a few cached)."""
    key = (length, salt, str(device))
    if key not in _weights:
        if len(_weights) >= _MAX_CACHED:  # one per size and device: bounded, not one per image size ever seen
            _weights.pop(next(iter(_weights)))
        g = torch.Generator().manual_seed(0x5EED + 1000003 * salt + length)
        _weights[key] = torch.randint(-(2**62), 2**62, (length,), generator=g, dtype=torch.long).to(device)
    return _weights[key]


def _items(t: torch.Tensor, grid: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """The pixels of each item, in order: split by `grid` (rows per item = t*h*w)
    for flattened patch rows, else an image or tile per [C, H, W]."""
    if grid is not None and t.dim() == 2 and grid.dim() == 2 and int(grid.prod(-1).sum()) == t.shape[0]:
        return list(t.split(grid.prod(-1).tolist()))
    if t.dim() >= 4:
        return list(t.reshape(-1, t.shape[-3] * t.shape[-2] * t.shape[-1]))
    return list(t.reshape(t.shape[0], -1)) if t.dim() >= 1 else [t.reshape(1)]


def _hash(values: torch.Tensor, salt: int) -> int:
    """A linear hash modulo 2**64 of int64 values (int64 arithmetic wraps): exact,
    so the same on every device."""
    w = _item_weights(values.numel(), salt, values.device)
    return int((values.reshape(-1) * w).sum()) + values.numel() * (salt + 1)


def vision_dtype(adapter: ModelAdapter) -> torch.dtype:
    """The dtype the model's vision tower computes in (what its pixels are cast to)."""
    tower = adapter.vision_tower()
    param = next(tower.parameters(), None) if tower is not None else None
    return param.dtype if param is not None and param.dtype.is_floating_point else torch.float32


def image_hashes(inputs: Dict, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """The int64 hashes of the visual items among `inputs`' pixels as a vision
    tower in `dtype` sees them, in order, repeats dropped (CPU); None when
    `inputs` carry no pixels (text only, or features encoded elsewhere: nothing
    to compare)."""
    hashes: List[int] = []
    for salt, (key, grid_key, rate_key) in enumerate(MODALITIES):
        t = inputs.get(key)
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not t.dtype.is_floating_point:
            continue
        grid = inputs.get(grid_key) if isinstance(inputs.get(grid_key), torch.Tensor) else None
        rate = inputs.get(rate_key) if rate_key else None
        rates = torch.as_tensor(rate, dtype=torch.float64).reshape(-1) if rate is not None else None
        for i, item in enumerate(_items(t.detach(), grid)):
            pixels = item.to(dtype).to(torch.bfloat16)
            if not bool(pixels.ne(0).any()):
                continue  # padding
            h = _hash(pixels.contiguous().view(torch.int16).long(), salt)
            if grid is not None and i < grid.shape[0]:  # the same rows on another grid are another image
                h += _hash(grid[i].long().to(pixels.device), 7)
            if rates is not None and i < rates.numel():  # ... and a video at another frame rate another video
                h += _hash(rates[i:i + 1].view(torch.int64), 8)
            h = (h + 2**63) % 2**64 - 2**63
            if h not in hashes:
                hashes.append(h)
    return torch.tensor(hashes, dtype=torch.long) if hashes else None


def images_differ(made_from: Optional[torch.Tensor], now: Optional[torch.Tensor], subset: bool = False) -> bool:
    """Whether `now`'s images are not those `made_from` records (when both are
    known): not the same sequence, or with `subset`, not a part of it in its order."""
    if made_from is None or now is None:
        return False
    made_from, now = made_from.cpu().tolist(), now.cpu().tolist()
    if not subset:
        return made_from != now
    it = iter(made_from)
    return not all(any(h == m for m in it) for h in now)
