"""The hook layer: `patch` and `apply` install one handle per mode on a
HuggingFace model (hooks, never forks), built on the core and never the other
way round:

- record.py     `ForwardRecord`: the state of one forward, dropped when it ends
- installed.py  `InstalledHook`: a hook as the model holds it (a no-op in a copy of the model)
- handle.py     `ReplayHandle`: the hooks every mode shares and their lifecycle
- base_pass.py  the base model's prompt and prefill, rebuilt from the RLVR forward
- offsets.py    `TokenReplay` (patch, mode="tokens") and `FixedOffsets` (apply)
- direct.py     `DirectReplay` (patch, mode="direct")
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ReplayConfig
from ..core import ReplayResult, ReplayTargets
from .direct import DirectReplay
from .handle import ReplayHandle
from .offsets import FixedOffsets, TokenReplay

__all__ = ["patch", "apply", "ReplayHandle", "TokenReplay", "DirectReplay", "FixedOffsets"]


def patch(model: torch.nn.Module, base: Optional[torch.nn.Module] = None, config: Optional[ReplayConfig] = None,
          targets: Optional[ReplayTargets] = None) -> ReplayHandle:
    """Make `model.generate` (and every forward) run Activation Replay at each new
    multimodal prefill, against `base` (or fixed `targets`), from now until the
    handle's `remove()` (or the end of the `with` block it is used in)."""
    if config is not None and config.mode == "direct":
        if targets is not None:
            raise ValueError("actreplay_ext.patch: mode='direct' substitutes base activations; it takes no targets")
        return DirectReplay(model, base=base, config=config)
    return TokenReplay(model, base=base, config=config, targets=targets)


def apply(rlvr: torch.nn.Module, result: ReplayResult) -> FixedOffsets:
    """From now until `remove()` (or the end of the `with` block it is used in,
    like `patch`), the RLVR model's prefill of the prompt `result` was learned
    on gets its offsets added at the visual positions of the input of layer
    `result.inject_layer` (0 unless the replay was a mid replay); decode steps
    are untouched."""
    return FixedOffsets(rlvr, result)
