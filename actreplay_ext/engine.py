"""The replay itself: base-model targets (SPEC §3 steps 1-3) and the offset
optimisation (steps 4-6), with the efficiencies of SPEC §5.

The loop starts from the captured input of the first layer it needs and runs
only the decoder layers it needs, on the prefix that ends at the last visual
token; lens entropies and top-`topv` targets come from the fused
`lens_entropy` operator, the KL from `topk_kl` on gathered unembedding rows;
model weights are frozen for the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.utils.checkpoint

from . import ops
from .adapters import ModelAdapter, get_adapter
from .config import ReplayConfig
from .prefill import (LayerExtras, Prefill, capture_prefill, distinct_rows, frozen_parameters, layer_output,
                      prefix_extras, prefix_layer_kwargs)

__all__ = ["ReplayTargets", "ReplayResult", "compute_targets", "optimize", "apply"]

log = logging.getLogger("actreplay_ext")


# --------------------------------------------------------------------- results


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
                raise ValueError(f"ReplayTargets.load: {path!r} is not a ReplayTargets file (format {meta.get('format')!r})")
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


def _target_config(cfg: ReplayConfig) -> Dict:
    keys = ("layers", "entropy_threshold", "topv", "select", "rule", "topk_tokens", "thresholds", "inject_layer")
    return {k: getattr(cfg, k) for k in keys}


# ----------------------------------------------------------------- validation


def _check_config_for(adapter: ModelAdapter, cfg: ReplayConfig, argument: str) -> None:
    if cfg.layers > adapter.num_layers:
        raise ValueError(
            f"actreplay_ext: config.layers = {cfg.layers} exceeds the {adapter.num_layers} decoder layers "
            f"of the {argument} model"
        )
    if cfg.topv > adapter.vocab_size:
        raise ValueError(
            f"actreplay_ext: config.topv = {cfg.topv} exceeds the vocabulary size V = {adapter.vocab_size} "
            f"of the {argument} model"
        )


def _model_info(adapter: ModelAdapter) -> Dict:
    return {"hidden_size": adapter.hidden_size, "vocab_size": adapter.vocab_size, "num_layers": adapter.num_layers}


def _lens_params(adapter: ModelAdapter):
    return adapter.unembed().detach(), adapter.lens_norm_weight().detach(), adapter.norm_eps()


# ---------------------------------------------------------------- the layers


#: Prefix length from which checkpoint="auto" recomputes layers in the backward.
AUTO_CHECKPOINT_TOKENS = 4096


def _run_layers(adapter: ModelAdapter, hidden: torch.Tensor, kwargs: Dict, start: int, stop: int,
                visit: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                checkpoint: bool = False, extras: Optional[LayerExtras] = None) -> torch.Tensor:
    """Decoder layers start .. stop-1 on `hidden`; visit(l, h_in, h_out) after each.
    Layer l gets `kwargs` (layer 0's) as `extras.layer_kwargs(l, kwargs)` makes
    them its own (the default keeps them; Gemma 3 swaps in the mask and rotary
    tables of the layer's attention type).
    h_out is the residual stream leaving layer l as the whole model has it: the
    layer's return value plus what the model adds between layers (`extras`,
    e.g. Qwen3-VL's deepstack features), i.e. the input of layer l + 1.
    With `checkpoint`, each layer's activations are recomputed in the backward."""
    layers = adapter.decoder_layers()
    for l in range(start, stop):
        kw = kwargs if extras is None else extras.layer_kwargs(l, kwargs)  # e.g. Gemma 3's sliding/full layers
        if checkpoint and torch.is_grad_enabled():
            run = lambda x, layer=layers[l], kw=kw: layer_output(layer(x, **kw))  # noqa: E731
            out = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False)
        else:
            out = layer_output(layers[l](hidden, **kw))
        if extras is not None:
            out = extras.after_layer(l, out)
        if visit is not None:
            visit(l, hidden, out)
        hidden = out
    return hidden


# ------------------------------------------------------------------- targets


def compute_targets(base: torch.nn.Module, inputs: Dict, config: Optional[ReplayConfig] = None) -> ReplayTargets:
    """Run the base model once on `inputs` (no grad) and return its replay targets."""
    cfg = config or ReplayConfig()
    adapter = get_adapter(base, "base")
    _check_config_for(adapter, cfg, "base")
    return targets_from_prefill(adapter, capture_prefill(adapter, inputs), cfg)


def targets_from_prefill(adapter: ModelAdapter, pre: Prefill, cfg: ReplayConfig) -> ReplayTargets:
    pre, row_map = distinct_rows(pre)
    n_visual = pre.visual_rows()
    P = pre.prefix_len
    L = cfg.layers
    if P == 0:
        empty = [torch.empty(0, dtype=torch.long) for _ in range(L)]
        return ReplayTargets(pre.input_ids.cpu(), n_visual, torch.empty(L, 0), empty,
                             [torch.empty(0, cfg.topv, dtype=torch.long) for _ in range(L)],
                             [torch.empty(0, cfg.topv) for _ in range(L)], _target_config(cfg), row_map,
                             _model_info(adapter))
    unembed, norm_w, eps = _lens_params(adapter)
    flat_vis = pre.visual[:, :P].reshape(-1).nonzero().squeeze(1)
    kwargs = prefix_layer_kwargs(pre.layer_kwargs, P)
    extras = prefix_extras(pre, P)
    entropies, top_vals, top_idx = [], [], []

    def lens(l, h_in, h_out):  # base side: h_out(l) at every visual token
        rows = h_out.reshape(-1, h_out.shape[-1]).index_select(0, flat_vis.to(h_out.device))
        dev = unembed.device
        ent, _, vals, idx = ops.lens_entropy(rows.to(dev).contiguous(), unembed, norm_w, eps, cfg.topv)
        entropies.append(ent)
        top_vals.append(vals)
        top_idx.append(idx)

    with torch.no_grad():
        _run_layers(adapter, pre.hidden0[:, :P], kwargs, 0, L, lens, extras=extras)
    entropy = torch.stack(entropies)  # [L, n_total]
    bad = (~torch.isfinite(entropy)).any(1).nonzero()
    if bad.numel():
        raise FloatingPointError(
            f"actreplay_ext: the base model's layer {int(bad[0])} output has a non-finite logit lens "
            "(NaN or Inf activations); no targets were made"
        )
    selected_mask = _select(entropy, n_visual, cfg)
    selected, t_idx, t_logp = [], [], []
    for l in range(L):
        sel = selected_mask[l].nonzero().squeeze(1)
        selected.append(sel)
        t_idx.append(top_idx[l].index_select(0, sel))
        t_logp.append(torch.log_softmax(top_vals[l].index_select(0, sel), dim=-1))
    return ReplayTargets(pre.input_ids.cpu(), n_visual, entropy, selected, t_idx, t_logp, _target_config(cfg),
                         row_map, _model_info(adapter))


def _select(entropy: torch.Tensor, n_visual: Sequence[int], cfg: ReplayConfig) -> torch.Tensor:
    """Per row of the batch (the ratio rule's max is per prompt): [L, n_total] mask."""
    masks, start = [], 0
    for n in n_visual:
        e = entropy[:, start:start + n].contiguous()
        rule, value = cfg.selection_value(n)
        cand = torch.ones(n, dtype=torch.bool, device=e.device)
        m = ops.select_tokens(e, cand, rule, value, cfg.select)
        if cfg.inject_layer:  # layers before the injection point cannot be moved
            m[: cfg.inject_layer] = False
        masks.append(m)
        start += n
    return torch.cat(masks, 1)


# ------------------------------------------------------------------ optimise


def optimize(rlvr: torch.nn.Module, inputs: Dict, targets: ReplayTargets,
             config: Optional[ReplayConfig] = None) -> ReplayResult:
    """Learn the offsets of the RLVR model's visual tokens for `inputs`."""
    cfg = config or ReplayConfig()
    adapter = get_adapter(rlvr, "rlvr")
    _check_config_for(adapter, cfg, "RLVR")
    t0 = time.perf_counter()
    pre = capture_prefill(adapter, inputs)
    result = optimize_from_prefill(adapter, pre, targets, cfg)
    result.timings["capture"] = result.timings.get("capture", 0.0) + time.perf_counter() - t0 - result.timings["loop"]
    return result


def _check_targets(targets: ReplayTargets, pre: Prefill, row_map: List[int], cfg: ReplayConfig,
                   adapter: ModelAdapter) -> None:
    mine = _model_info(adapter)
    if targets.model is not None and targets.model != mine:
        raise ValueError(
            f"actreplay_ext: the targets were made with another model ({targets.model}); this model has {mine}"
        )
    if targets.row_map is not None and list(targets.row_map) != list(row_map):
        raise ValueError(
            "actreplay_ext: the targets were computed for a batch with other repeated rows "
            f"(rows -> distinct rows: targets {targets.row_map}, inputs {row_map})"
        )
    ids = targets.input_ids
    if tuple(ids.shape) != tuple(pre.input_ids.shape) or not torch.equal(ids.cpu(), pre.input_ids.cpu()):
        raise ValueError(
            "actreplay_ext: the targets were computed for another prompt (input_ids differ: targets "
            f"{tuple(ids.shape)}, inputs {tuple(pre.input_ids.shape)}); compute them on the same inputs"
        )
    want = _target_config(cfg)
    got = targets.config
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
        raise ValueError(f"actreplay_ext: the targets were computed with another configuration: {diff} (targets, config)")


def optimize_from_prefill(adapter: ModelAdapter, pre: Prefill, targets: ReplayTargets,
                          cfg: ReplayConfig) -> ReplayResult:
    full_ids = pre.input_ids
    pre, row_map = distinct_rows(pre)  # identical rows are optimised once (SPEC §5.7)
    _check_targets(targets, pre, row_map, cfg, adapter)
    result = _optimize_distinct(adapter, pre, targets, cfg)
    result.input_ids = full_ids
    result.optimized_rows = pre.hidden0.shape[0]
    if len(row_map) > pre.hidden0.shape[0]:  # broadcast to the repeated rows
        rows = result.deltas if isinstance(result.deltas, list) else [result.deltas]
        result.deltas = [rows[j] for j in row_map]
        result.n_visual = [result.n_visual[j] for j in row_map]
    return result


def _optimize_distinct(adapter: ModelAdapter, pre: Prefill, targets: ReplayTargets,
                       cfg: ReplayConfig) -> ReplayResult:
    n_visual = pre.visual_rows()
    D = pre.hidden0.shape[-1]
    timings = {"loop": 0.0}
    if sum(n_visual) == 0:
        return ReplayResult(torch.zeros(0, D), [], [0] * cfg.layers, n_visual, timings,
                            note="no visual tokens: nothing replayed", input_ids=pre.input_ids)
    t0 = time.perf_counter()
    device = pre.hidden0.device
    P = pre.prefix_len
    B = pre.hidden0.shape[0]
    m = cfg.inject_layer
    flat_vis = pre.visual[:, :P].reshape(-1).nonzero().squeeze(1).to(device)
    kwargs = prefix_layer_kwargs(pre.layer_kwargs, P)
    extras = prefix_extras(pre, P)
    unembed, norm_w, eps = _lens_params(adapter)
    targets = targets.to(unembed.device)

    # Which RLVR activation pairs with the base output of layer l, and the
    # deepest layer the loop must run.
    loss_layers = [l for l in range(m, cfg.layers) if targets.selected[l].numel()]
    loss_set = set(loss_layers)
    published = cfg.alignment == "published"
    stop = (max(loss_layers) + (0 if published else 1)) if loss_layers else m

    # Per selected row: weight 1 / (|S_l of its prompt row| * n_visual of that row).
    row_of_token = torch.repeat_interleave(torch.arange(B), torch.tensor(n_visual)).to(unembed.device)
    n_vis_t = torch.tensor(n_visual, dtype=torch.float32, device=unembed.device)
    weights, idx_all, logp_all = [], [], []
    for l in loss_layers:
        sel = targets.selected[l]
        rows = row_of_token.index_select(0, sel)
        count = torch.bincount(rows, minlength=B).float()
        w = 1.0 / count.index_select(0, rows)
        if cfg.normalize:
            w = w / n_vis_t.index_select(0, rows)
        weights.append(w)
        idx_all.append(targets.target_idx[l])
        logp_all.append(targets.target_logp[l].float())
    # Sequence positions (in the flattened prefix) of each loss layer's selected tokens.
    sel_pos = [flat_vis.index_select(0, targets.selected[l].to(device)) for l in loss_layers]
    weights = torch.cat(weights) if weights else None
    idx_all = torch.cat(idx_all).contiguous() if idx_all else None
    logp_all = torch.cat(logp_all).contiguous() if logp_all else None

    dtype = pre.hidden0.dtype
    base_hidden = pre.hidden0[:, :P].detach()
    with torch.no_grad():  # layers before the injection point do not depend on the offsets
        base_hidden = _run_layers(adapter, base_hidden, kwargs, 0, m, extras=extras)
    flat_hidden = base_hidden.reshape(B * P, D).float()

    use_checkpoint = cfg.checkpoint is True or (cfg.checkpoint == "auto" and B * P >= AUTO_CHECKPOINT_TOKENS)
    delta = torch.zeros(int(flat_vis.numel()), D, dtype=torch.float32, device=device, requires_grad=True)
    losses: List[float] = []
    with frozen_parameters(adapter.model), torch.enable_grad(), _no_inference_mode():
        for step in range(cfg.steps):
            h = ops.replay_scatter(flat_hidden, flat_vis, delta, "add").to(dtype).view(B, P, D)
            gathered: List[torch.Tensor] = []

            def gather(src):
                gathered.append(src.reshape(B * P, D).index_select(0, sel_pos[len(gathered)]))

            if published:  # r_l = input of layer l = output of layer l-1 (or the offset input)
                if m in loss_set:
                    gather(h)
                visit = lambda l, h_in, h_out: gather(h_out) if (l + 1) in loss_set else None  # noqa: E731
            else:  # r_l = output of layer l
                visit = lambda l, h_in, h_out: gather(h_out) if l in loss_set else None  # noqa: E731
            _run_layers(adapter, h, kwargs, m, stop, visit, checkpoint=use_checkpoint, extras=extras)
            if not gathered:
                losses.append(0.0)
                continue
            rows = torch.cat(gathered).to(unembed.device).contiguous()
            kl = ops.topk_kl(rows, unembed, norm_w, eps, idx_all, logp_all)
            loss = (kl * weights).sum()
            value = float(loss.detach())
            if not math.isfinite(value):
                per_layer = kl.detach().split([int(p.numel()) for p in sel_pos])
                layer = next(l for l, k in zip(loss_layers, per_layer) if not bool(torch.isfinite(k).all()))
                where = "input" if published else "output"
                raise FloatingPointError(
                    f"actreplay_ext: the replay loss is {value} at step {step}: the RLVR model's layer {layer} "
                    f"{where} is not finite (NaN or Inf activations); offsets discarded, model unchanged"
                )
            losses.append(value)
            log.debug("replay step %d: loss %.6g", step, value)
            if cfg.callback is not None:
                cfg.callback(step, value)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= cfg.lr * grad
    timings["loop"] = time.perf_counter() - t0
    deltas = delta.detach()
    if B > 1:
        deltas = list(deltas.split(n_visual))
    selected = [int(s.numel()) for s in targets.selected]
    return ReplayResult(deltas, losses, selected, n_visual, timings, input_ids=pre.input_ids, inject_layer=m)


@contextlib.contextmanager
def _no_inference_mode() -> Iterator[None]:
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            yield
    else:
        yield


# --------------------------------------------------------------------- apply


def add_offsets(hidden: torch.Tensor, visual: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D] with the offsets added at the visual positions, in float32."""
    B, T, D = hidden.shape
    flat_vis = visual.reshape(-1).nonzero().squeeze(1).to(hidden.device)
    if flat_vis.numel() != deltas.shape[0]:
        raise ValueError(
            f"actreplay_ext: the offsets are for {deltas.shape[0]} visual tokens but the prompt has "
            f"{flat_vis.numel()}; they belong to another prompt"
        )
    out = ops.replay_scatter(hidden.reshape(B * T, D).float(), flat_vis, deltas.to(hidden.device).float(), "add")
    return out.to(hidden.dtype).view(B, T, D)


@contextlib.contextmanager
def apply(rlvr: torch.nn.Module, result: ReplayResult):
    """Within the block, the RLVR model's prefill gets `result`'s offsets added at
    the visual positions of the input of layer `result.inject_layer` (0 unless
    the replay was a mid replay); decode steps are untouched."""
    from .patch import ReplayHandle

    handle = ReplayHandle(rlvr, base=None, config=None, fixed_result=result)
    try:
        yield handle
    finally:
        handle.remove()
