"""The replay's results and their files: `ReplayTargets` (what the base model
says about a prompt; safetensors, no pickles) and `ReplayResult` (the learned
offsets and how they were found)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional

import torch

from . import files

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
    entropy: torch.Tensor  # [layers, n_total] float32 (float64 for a float64 model, as target_logp)
    selected: List[torch.Tensor]
    target_idx: List[torch.Tensor]
    target_logp: List[torch.Tensor]
    config: Dict  # the fields of ReplayConfig the targets depend on
    row_map: Optional[List[int]] = None  # batch row -> distinct row (identical rows share targets)
    model: Optional[Dict] = None  # hidden size, vocabulary and depth of the model they were made with
    images: Optional[torch.Tensor] = None  # hashes of the prompt's pixels (core/images.py); None: not recorded

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
        """Write to a safetensors file (no pickles), through `files.open_output`
        (atomic; symlinks followed; a FIFO written in place; the umask honoured)."""
        from safetensors.torch import save

        tensors = {"input_ids": self.input_ids.cpu().contiguous(), "entropy": self.entropy.cpu().contiguous()}
        for l in range(self.layers):
            tensors[f"selected.{l}"] = self.selected[l].cpu().contiguous()
            tensors[f"target_idx.{l}"] = self.target_idx[l].cpu().contiguous()
            tensors[f"target_logp.{l}"] = self.target_logp[l].cpu().contiguous()
        if self.images is not None:
            tensors["images"] = self.images.cpu().contiguous()
        meta = {"format": "actreplay_ext.ReplayTargets/1", "n_visual": json.dumps(self.n_visual),
                "config": json.dumps(self.config), "layers": str(self.layers),
                "row_map": json.dumps(self.row_map), "model": json.dumps(self.model)}
        # serialised here and written by files.write_bytes: safetensors' own save_file renames
        # over whatever `path` is (a symlink, a FIFO, a device node) and creates it mode 0600
        files.write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str, device="cpu") -> "ReplayTargets":
        """Read a file written by `save`, checking every field against the others
        (shapes, dtypes, index ranges, `topv`, log-distributions, metadata); a
        bad file is a ValueError naming the file and the field."""
        from safetensors import SafetensorError, safe_open

        _check_is_file(path, "ReplayTargets")

        def bad(field, problem):
            return ValueError(f"ReplayTargets.load: {path!r}: {field} {problem}")

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "actreplay_ext.ReplayTargets/1":
                    raise ValueError(f"ReplayTargets.load: {path!r} is not a ReplayTargets file "
                                     f"(format {meta.get('format')!r})")
                fields = {}
                for key in ("layers", "n_visual", "config", "row_map", "model"):
                    try:
                        fields[key] = json.loads(meta.get(key, "null"))
                    except ValueError as e:
                        raise bad(f"metadata '{key}'", f"is not JSON ({e})") from None
                L = fields["layers"]
                if isinstance(L, bool) or not isinstance(L, int) or L < 1:
                    raise bad("metadata 'layers'", f"must be an int >= 1, got {L!r}")
                names = ["input_ids", "entropy"] + [f"{k}.{l}" for l in range(L)
                                                    for k in ("selected", "target_idx", "target_logp")]
                missing = [n for n in names if n not in f.keys()]
                if missing:
                    raise bad("tensor", f"{missing[0]!r} is missing (the metadata says {L} layers)")
                t = {n: f.get_tensor(n) for n in names}
                images = f.get_tensor("images") if "images" in f.keys() else None  # older files: not recorded
        except SafetensorError as e:
            raise ValueError(f"ReplayTargets.load: {path!r} is not a readable safetensors file ({e})") from None
        _check_images(images, bad)
        targets = cls(input_ids=t["input_ids"], n_visual=fields["n_visual"], entropy=t["entropy"],
                      selected=[t[f"selected.{l}"] for l in range(L)],
                      target_idx=[t[f"target_idx.{l}"] for l in range(L)],
                      target_logp=[t[f"target_logp.{l}"] for l in range(L)],
                      config=fields["config"], row_map=fields["row_map"], model=fields["model"], images=images)
        _check_consistent(targets, bad)
        return targets.to(device)


def _check_is_file(path, kind: str) -> None:
    """`path` is not a directory (safetensors would report "No such device");
    a missing file stays a FileNotFoundError."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{kind}.load: argument 'path' is a directory ({str(path)!r}); expected a file "
                                f"written by {kind}.save")


def _check_consistent(t: "ReplayTargets", bad) -> None:
    """Every field of loaded targets agrees with the others; `bad(field, problem)` makes the error."""
    cfg, L = t.config, t.layers
    if not isinstance(cfg, dict) or not isinstance(cfg.get("topv"), int) or cfg["topv"] < 1:
        raise bad("metadata 'config'", f"must hold an int 'topv' >= 1, got {cfg!r}")
    layers = cfg.get("layers")
    listed = isinstance(layers, list) and layers and all(_is_int(x) for x in layers)
    depth = layers[-1] + 1 if listed else layers  # layers=[...]: one entry per layer up to the deepest
    if depth != L:
        raise bad("metadata 'layers'", f"({L}) disagrees with config layers ({layers!r})")
    ids = t.input_ids
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise bad("'input_ids'", f"must be [B, T] int64, got {tuple(ids.shape)} {ids.dtype}")
    nv = t.n_visual
    if not isinstance(nv, list) or len(nv) != ids.shape[0] or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in nv):
        raise bad("metadata 'n_visual'", f"must list {ids.shape[0]} visual-token counts (one per row), got {nv!r}")
    n_total = sum(nv)
    if t.row_map is not None and (not isinstance(t.row_map, list) or any(
            isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < ids.shape[0] for r in t.row_map)):
        raise bad("metadata 'row_map'", f"must map rows to distinct rows in [0, {ids.shape[0]}), got {t.row_map!r}")
    if t.entropy.shape != (L, n_total) or t.entropy.dtype not in (torch.float32, torch.float64):
        raise bad("'entropy'", f"must be [{L}, {n_total}] float32 (float64 for a float64 model), "
                               f"got {tuple(t.entropy.shape)} {t.entropy.dtype}")
    vocab = (t.model or {}).get("vocab_size") if isinstance(t.model, dict) else None
    k = cfg["topv"]
    for l in range(L):
        sel, idx, logp = t.selected[l], t.target_idx[l], t.target_logp[l]
        if sel.dim() != 1 or sel.dtype != torch.long:
            raise bad(f"'selected.{l}'", f"must be 1-D int64, got {tuple(sel.shape)} {sel.dtype}")
        if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= n_total or bool((sel[1:] <= sel[:-1]).any())):
            raise bad(f"'selected.{l}'", f"must hold increasing indices in [0, {n_total}) (the visual tokens)")
        m = sel.numel()
        if idx.shape != (m, k) or idx.dtype != torch.long:
            raise bad(f"'target_idx.{l}'", f"must be [{m}, topv={k}] int64, got {tuple(idx.shape)} {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or (vocab is not None and int(idx.max()) >= vocab)):
            raise bad(f"'target_idx.{l}'", f"must hold vocabulary indices in [0, {vocab})")
        if logp.shape != (m, k) or not logp.is_floating_point():
            raise bad(f"'target_logp.{l}'", f"must be [{m}, topv={k}] float, got {tuple(logp.shape)} {logp.dtype}")
        if logp.numel():
            total = torch.logsumexp(logp.double(), -1)
            if bool(torch.isnan(logp).any()) or bool((logp > 1e-6).any()) or float(total.abs().max()) > 1e-4:
                raise bad(f"'target_logp.{l}'", "must hold log-probabilities (<= 0, each row's exp summing to 1)")


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
    config: Optional[Dict] = None  # the ReplayConfig settings they were learned with (ReplayConfig.as_dict)
    images: Optional[torch.Tensor] = None  # hashes of the prompt's pixels (core/images.py); None: not recorded

    @property
    def replayed(self) -> bool:
        return sum(self.n_visual) > 0

    @property
    def direct(self) -> bool:
        """A direct substitution (mode="direct"): it records what was substituted, and holds no offsets."""
        return isinstance(self.config, dict) and self.config.get("mode") == "direct"

    def flat_deltas(self) -> torch.Tensor:
        if isinstance(self.deltas, torch.Tensor):
            return self.deltas
        return torch.cat(list(self.deltas), 0)

    def save(self, path: str) -> None:
        """Write the offsets, the prompt they belong to and how they were found
        to a safetensors file (no pickles); `ReplayResult.load` reads it back
        and `actreplay_ext.apply` adds the offsets again. Every result saves and
        loads, also those without offsets (a direct substitution, a forward
        patch() did not replay), as a record; apply() refuses those. Written
        through `files.open_output`, as ReplayTargets.save."""
        from safetensors.torch import save

        rows = self.deltas if isinstance(self.deltas, list) else None
        # clone each row: identical prompts share one offsets tensor, and
        # safetensors refuses to write tensors that share memory
        tensors = {f"deltas.{r}": d.detach().cpu().clone().contiguous() for r, d in enumerate(rows)} \
            if rows is not None else {"deltas": self.deltas.detach().cpu().contiguous()}
        if self.input_ids is not None:
            tensors["input_ids"] = self.input_ids.cpu().contiguous()
        if self.images is not None:
            tensors["images"] = self.images.cpu().contiguous()
        meta = {"format": RESULT_FORMAT, "rows": json.dumps(None if rows is None else len(rows)),
                "losses": json.dumps([float(x) for x in self.losses]), "selected": json.dumps(list(self.selected)),
                "n_visual": json.dumps(list(self.n_visual)), "timings": json.dumps(self.timings),
                "note": self.note, "optimized_rows": str(self.optimized_rows),
                "inject_layer": str(self.inject_layer), "config": json.dumps(self.config)}
        files.write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str, device="cpu") -> "ReplayResult":
        """Read a file written by `save`, checking it (format, every tensor
        present, float32 finite offsets with one row per visual token, metadata
        that is JSON of the right kind); a bad file is a ValueError naming the
        file and the field."""
        from safetensors import SafetensorError, safe_open

        _check_is_file(path, "ReplayResult")

        def bad(field, problem):
            return ValueError(f"ReplayResult.load: {path!r}: {field} {problem}")

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != RESULT_FORMAT:
                    raise ValueError(f"ReplayResult.load: {path!r} is not a ReplayResult file "
                                     f"(format {meta.get('format')!r})")
                fields = {}
                for key in ("rows", "losses", "selected", "n_visual", "timings", "optimized_rows",
                            "inject_layer", "config"):
                    if key not in meta:
                        raise bad(f"metadata '{key}'", "is missing")
                    try:
                        fields[key] = json.loads(meta[key])
                    except ValueError as e:
                        raise bad(f"metadata '{key}'", f"is not JSON ({e})") from None
                rows = fields["rows"]
                if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
                    raise bad("metadata 'rows'", f"must be null or an int >= 1, got {rows!r}")
                names = ["deltas"] if rows is None else [f"deltas.{r}" for r in range(rows)]
                missing = [n for n in names if n not in f.keys()]
                if missing:
                    raise bad("tensor", f"{missing[0]!r} is missing")
                tensors = {n: f.get_tensor(n) for n in names}
                input_ids = f.get_tensor("input_ids") if "input_ids" in f.keys() else None
                images = f.get_tensor("images") if "images" in f.keys() else None  # older files: not recorded
        except SafetensorError as e:
            raise ValueError(f"ReplayResult.load: {path!r} is not a readable safetensors file ({e})") from None
        _check_result(fields, tensors, input_ids, bad)
        _check_images(images, bad)
        deltas = [tensors[n].to(device) for n in names] if rows is not None else tensors["deltas"].to(device)
        return cls(deltas=deltas, losses=fields["losses"], selected=fields["selected"], n_visual=fields["n_visual"],
                   timings=fields["timings"], note=meta.get("note", ""),
                   input_ids=None if input_ids is None else input_ids.to(device),
                   optimized_rows=fields["optimized_rows"], inject_layer=fields["inject_layer"],
                   config=fields["config"], images=images)


RESULT_FORMAT = "actreplay_ext.ReplayResult/1"


def _check_images(images: Optional[torch.Tensor], bad) -> None:
    if images is not None and (images.dim() != 1 or images.dtype != torch.long or images.numel() == 0
                               or torch.unique(images).numel() != images.numel()):
        raise bad("'images'", f"must be the distinct int64 hashes of the prompt's images, "
                              f"got {tuple(images.shape)} {images.dtype}")


def _is_int(x, lo=0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _check_result(fields: Dict, tensors: Dict[str, torch.Tensor], input_ids, bad) -> None:
    """A loaded result's fields agree with each other; `bad(field, problem)` makes the error."""
    nv = fields["n_visual"]
    # [] is a forward that was not replayed (patch() skipped it: handle.last records why, in its note)
    if not isinstance(nv, list) or not all(_is_int(n) for n in nv) or (not nv and fields["rows"] is not None):
        raise bad("metadata 'n_visual'", f"must list the visual-token count of every row, got {nv!r}")
    for key in ("losses",):
        v = fields[key]
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              and math.isfinite(x) for x in v):
            raise bad(f"metadata '{key}'", f"must be a list of finite numbers, got {v!r}")
    if not isinstance(fields["selected"], list) or not all(_is_int(n) for n in fields["selected"]):
        raise bad("metadata 'selected'", f"must list a count per layer, got {fields['selected']!r}")
    if not isinstance(fields["timings"], dict):
        raise bad("metadata 'timings'", f"must be an object, got {fields['timings']!r}")
    for key in ("optimized_rows", "inject_layer"):
        if not _is_int(fields[key]):
            raise bad(f"metadata '{key}'", f"must be an int >= 0, got {fields[key]!r}")
    if fields["config"] is not None and not isinstance(fields["config"], dict):
        raise bad("metadata 'config'", f"must be null or an object, got {fields['config']!r}")
    direct = isinstance(fields["config"], dict) and fields["config"].get("mode") == "direct"
    expected = nv if fields["rows"] is not None else [0 if direct else sum(nv)]  # direct: no offsets, [0, D]
    if fields["rows"] is not None and fields["rows"] != len(nv):
        raise bad("metadata 'rows'", f"({fields['rows']}) disagrees with n_visual ({len(nv)} rows)")
    if not nv and any(t.shape[0] for t in tensors.values() if t.dim()):
        raise bad("metadata 'n_visual'", "is [] (a forward that was not replayed) but the file holds offsets")
    widths = set()
    for (name, t), n in zip(tensors.items(), expected):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] != n:
            raise bad(f"'{name}'", f"must be [{n}, D] float32 (one row per visual token), "
                                   f"got {tuple(t.shape)} {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise bad(f"'{name}'", "holds non-finite values")
        if n or direct:
            widths.add(t.shape[1])
    if len(widths) > 1:
        raise bad("deltas", f"rows have different hidden sizes {sorted(widths)}")
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.dtype != torch.long
                                  or input_ids.shape[0] != len(nv)):
        raise bad("'input_ids'", f"must be [{len(nv)}, T] int64 (one row per prompt), "
                                 f"got {tuple(input_ids.shape)} {input_ids.dtype}")
