"""The replay's results and their files: `ReplayTargets` (what the base model
says about a prompt; safetensors, no pickles) and `ReplayResult` (the learned
offsets and how they were found)."""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional

import torch

__all__ = ["ReplayTargets", "ReplayResult"]


@dataclasses.dataclass
class ReplayTargets:
    """What the base model says about one prompt (or a batch of prompts).

    Visual tokens are numbered in (row, position) order over the batch.
    For each replay layer l: `selected[l]` indexes the selected visual tokens,
    `target_idx[l]` / `target_logp[l]` are their base top-`topv` vocabulary
    indices and renormalised log-probabilities, `entropy[l]` the base lens
    entropy of every visual token.
    """

    input_ids: torch.Tensor  # [B, T], the prompt these targets belong to
    n_visual: List[int]  # visual tokens per row
    entropy: torch.Tensor  # [layers, n_total] float32
    selected: List[torch.Tensor]
    target_idx: List[torch.Tensor]
    target_logp: List[torch.Tensor]
    config: Dict  # the fields of ReplayConfig the targets depend on
    row_map: Optional[List[int]] = None  # batch row -> distinct row (identical rows share targets)
    model: Optional[Dict] = None  # hidden size, vocabulary and depth of the model they were made with

    @property
    def layers(self) -> int:
        return len(self.selected)

    def selected_counts(self) -> List[int]:
        return [int(s.numel()) for s in self.selected]

    def to(self, device) -> "ReplayTargets":
        mv = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return dataclasses.replace(
            self, entropy=self.entropy.to(device), selected=mv(self.selected),
            target_idx=mv(self.target_idx), target_logp=mv(self.target_logp),
        )

    def save(self, path: str) -> None:
        """Write to a safetensors file (no pickles)."""
        from safetensors.torch import save_file

        tensors = {"input_ids": self.input_ids.cpu().contiguous(), "entropy": self.entropy.cpu().contiguous()}
        for l in range(self.layers):
            tensors[f"selected.{l}"] = self.selected[l].cpu().contiguous()
            tensors[f"target_idx.{l}"] = self.target_idx[l].cpu().contiguous()
            tensors[f"target_logp.{l}"] = self.target_logp[l].cpu().contiguous()
        meta = {"format": "actreplay_ext.ReplayTargets/1", "n_visual": json.dumps(self.n_visual),
                "config": json.dumps(self.config), "layers": str(self.layers),
                "row_map": json.dumps(self.row_map), "model": json.dumps(self.model)}
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device="cpu") -> "ReplayTargets":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "actreplay_ext.ReplayTargets/1":
                raise ValueError(f"ReplayTargets.load: {path!r} is not a ReplayTargets file "
                                 f"(format {meta.get('format')!r})")
            L = int(meta["layers"])
            get = f.get_tensor
            return cls(
                input_ids=get("input_ids"), n_visual=json.loads(meta["n_visual"]), entropy=get("entropy"),
                selected=[get(f"selected.{l}") for l in range(L)],
                target_idx=[get(f"target_idx.{l}") for l in range(L)],
                target_logp=[get(f"target_logp.{l}") for l in range(L)],
                config=json.loads(meta["config"]), row_map=json.loads(meta.get("row_map", "null")),
                model=json.loads(meta.get("model", "null")),
            )


@dataclasses.dataclass
class ReplayResult:
    """The learned offsets of one prompt (or batch) and how they were found.

    `deltas`: float32 [n_visual, D] for one prompt; for a batch, a list with one
    [n_visual_row, D] tensor per row. `losses`: the loss before each update.
    `selected`: selected visual tokens per replay layer (summed over rows).
    `inject_layer`: the decoder layer whose input the offsets are added to.
    """

    deltas: object
    losses: List[float]
    selected: List[int]
    n_visual: List[int]
    timings: Dict[str, float]
    note: str = ""
    input_ids: Optional[torch.Tensor] = None
    optimized_rows: int = 0  # distinct rows the loop ran on (identical rows share offsets)
    inject_layer: int = 0

    @property
    def replayed(self) -> bool:
        return sum(self.n_visual) > 0

    def flat_deltas(self) -> torch.Tensor:
        if isinstance(self.deltas, torch.Tensor):
            return self.deltas
        return torch.cat(list(self.deltas), 0)
