"""The offset optimisation (SPEC §3 steps 4-6) with the efficiencies of SPEC §5:
the loop starts from the captured input of the first layer it needs, runs only
the decoder layers it needs on the prefix that ends at the last visual token,
and takes the KL from `topk_kl` on gathered unembedding rows; model weights are
frozen for the loop.

Three parts: the loss plan (what the loss reads, fixed for the loop), the step
loop (plain gradient descent on the offsets), and the result."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Dict, List, Optional

import torch

from .. import ops
from ..config import ReplayConfig
from ..models.base import ModelAdapter
from ..models.registry import get_adapter
from .batching import distinct_rows
from .layers import (
    AUTO_CHECKPOINT_TOKENS,
    LayerInputs,
    lens_params,
    loop_autograd,
    no_inference_mode,
    normal_tensors,
    run_layers,
)
from .optimizers import RowRules
from .prefill import Prefill, capture_prefill
from .results import ReplayResult, ReplayTargets
from .validation import check_config_for, check_targets

__all__ = ["optimize", "optimize_from_prefill", "replay_loss", "LossPlan"]

log = logging.getLogger("actreplay_ext")


def optimize(rlvr: torch.nn.Module, inputs: Dict, targets: ReplayTargets,
             config: Optional[ReplayConfig] = None) -> ReplayResult:
    """Learn the offsets of the RLVR model's visual tokens for `inputs`."""
    cfg = config or ReplayConfig()
    adapter = get_adapter(rlvr, "rlvr")
    check_config_for(adapter, cfg, "RLVR")
    t0 = time.perf_counter()
    pre = capture_prefill(adapter, inputs)
    result = optimize_from_prefill(adapter, pre, targets, cfg)
    result.timings["capture"] = result.timings.get("capture", 0.0) + time.perf_counter() - t0 - result.timings["loop"]
    return result


def optimize_from_prefill(adapter: ModelAdapter, pre: Prefill, targets: ReplayTargets,
                          cfg: ReplayConfig) -> ReplayResult:
    full_ids = pre.input_ids
    pre, row_map = distinct_rows(pre)  # identical rows are optimised once (SPEC §5.7)
    check_targets(targets, pre, row_map, cfg, adapter)
    with no_inference_mode():  # a prefill or targets made under inference mode: tensors autograd may save
        result = _optimize_distinct(adapter, normal_tensors(pre), normal_tensors(targets), cfg)
    result.input_ids, result.images = full_ids, pre.images
    result.optimized_rows = pre.hidden0.shape[0]
    result.inject_layer, result.config = cfg.inject_layer, cfg.as_dict()
    _warn_if_ineffective(result, cfg)
    if len(row_map) > pre.hidden0.shape[0]:  # broadcast to the repeated rows
        rows = result.deltas if isinstance(result.deltas, list) else [result.deltas]
        result.deltas = [rows[j] for j in row_map]
        result.n_visual = [result.n_visual[j] for j in row_map]
    return result


def replay_loss(rlvr: torch.nn.Module, inputs: Dict, targets: ReplayTargets, deltas,
                config: Optional[ReplayConfig] = None) -> float:
    """The replay loss (SPEC §3 step 5) of the RLVR model on `inputs` with the
    offsets `deltas` added, as the loop computes it: e.g. the loss of the offsets
    a loop returned (sgd's last update is never scored inside its loop). A
    batch without repeated rows; `deltas` as in `ReplayResult.deltas`."""
    cfg = dataclasses.replace(config or ReplayConfig(), optimizer="sgd", lr=0.0, steps=1, tol=None, callback=None)
    adapter = get_adapter(rlvr, "rlvr")
    check_config_for(adapter, cfg, "RLVR")
    pre, row_map = distinct_rows(capture_prefill(adapter, inputs))
    if len(row_map) != pre.hidden0.shape[0]:
        raise ValueError("actreplay_ext.replay_loss: 'inputs' has repeated rows; give each prompt once")
    check_targets(targets, pre, row_map, cfg, adapter)
    start = torch.cat(list(deltas)) if isinstance(deltas, (list, tuple)) else deltas
    with no_inference_mode():
        result = _optimize_distinct(adapter, normal_tensors(pre), normal_tensors(targets), cfg,
                                    start=start.detach().float())
    return result.losses[0] if result.losses else 0.0


def _warn_if_ineffective(result: ReplayResult, cfg: ReplayConfig) -> None:
    """A replay that cannot have changed anything, or whose loss went the wrong
    way, says so on the package's logger instead of passing without comment."""
    if not result.replayed:  # patch() skips such prompts before this; an explicit optimize() hears of it
        log.warning("actreplay_ext: the prompt has no visual tokens, so there is nothing to replay: the offsets "
                    "are empty and generation is unchanged")
    elif not any(result.selected[cfg.inject_layer:]):  # the loss reads layers inject_layer .. layers-1
        log.warning("actreplay_ext: no visual token was selected in any replay layer (select=%r, rule=%r, "
                    "entropy_threshold=%g): the offsets are zero and generation is unchanged",
                    cfg.select, cfg.rule, cfg.entropy_threshold)
    elif cfg.optimizer != "sgd":  # it returns its best point: only a loop that never went down is worth a word
        if len(result.losses) > 1 and min(result.losses[1:]) >= result.losses[0] > 0:  # 0: nothing to lower
            log.warning("actreplay_ext: no step of optimizer=%r lowered the replay loss (%.4g) in %d evaluations: "
                        "the offsets are zero; try a smaller lr (its first step, %g x the hidden states' norm)",
                        cfg.optimizer, result.losses[0], len(result.losses), cfg.step_size)
    elif len(result.losses) > 1 and result.losses[-1] > result.losses[0]:
        log.warning("actreplay_ext: the replay loss rose over %d steps (%.4g -> %.4g): lr=%g is likely too "
                    "large for this model; try a smaller lr", len(result.losses), result.losses[0],
                    result.losses[-1], cfg.step_size)


@dataclasses.dataclass
class LossPlan:
    """What the loss reads, fixed for the whole loop: the loss layers (those >=
    the inject layer with a selection), the flattened prefix positions of each
    one's selected tokens, their base targets, and each selected row's weight
    1 / (|S_l| of its prompt row [* n_visual of that row when normalising])."""

    inject: int
    published: bool  # pair the RLVR input of layer l (else its output) with the base output
    layers: List[int]
    positions: List[torch.Tensor]
    target_idx: Optional[torch.Tensor] = None
    target_logp: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None  # the prompt row of each selected token, in `weights` order
    n_rows: int = 1

    def row_losses(self, kl: torch.Tensor) -> List[float]:
        """The loss of each prompt row (their sum is the loop's loss): one host sync."""
        if not self.layers:
            return [0.0] * self.n_rows
        per_row = torch.zeros(self.n_rows, device=kl.device, dtype=torch.float32)
        return per_row.index_add_(0, self.rows, (kl.detach() * self.weights).float()).tolist()

    @property
    def stop(self) -> int:
        """One past the deepest decoder layer the loop must run."""
        if not self.layers:
            return self.inject
        return max(self.layers) + (0 if self.published else 1)

    @classmethod
    def build(cls, targets: ReplayTargets, flat_vis: torch.Tensor, n_visual: List[int], cfg: ReplayConfig,
              device, logp_dtype: torch.dtype = torch.float32) -> "LossPlan":
        layers = [l for l in range(cfg.inject_layer, cfg.depth) if targets.selected[l].numel()]
        plan = cls(cfg.inject_layer, cfg.alignment == "published", layers,
                   [flat_vis.index_select(0, targets.selected[l].to(flat_vis.device)) for l in layers],
                   n_rows=len(n_visual))
        if not layers:
            return plan
        B = len(n_visual)
        row_of_token = torch.repeat_interleave(torch.arange(B), torch.tensor(n_visual)).to(device)
        n_vis_t = torch.tensor(n_visual, dtype=torch.float32, device=device)
        weights, row_ids = [], []
        for l in layers:
            rows = row_of_token.index_select(0, targets.selected[l])
            w = 1.0 / torch.bincount(rows, minlength=B).float().index_select(0, rows)
            weights.append(w / n_vis_t.index_select(0, rows) if cfg.normalize else w)
            row_ids.append(rows)
        plan.weights = torch.cat(weights)
        plan.rows = torch.cat(row_ids)
        plan.target_idx = torch.cat([targets.target_idx[l] for l in layers]).contiguous()
        # In the lens's result type (float64 for a float64 model, else float32): float64 targets
        # rounded to float32 left a float64 model replayed against itself a loss of 1e-10.
        plan.target_logp = torch.cat([targets.target_logp[l].to(logp_dtype) for l in layers]).contiguous()
        return plan

    def read(self, h: torch.Tensor, inputs: LayerInputs, adapter: ModelAdapter, checkpoint: bool) -> List[torch.Tensor]:
        """Run the loop's layers on the offset input `h` [B, P, D] (the input of
        layer `inject`) and return the RLVR activations the loss reads, one
        [|S_l|, D] tensor per loss layer."""
        B, P, D = h.shape
        wanted = set(self.layers)
        gathered: List[torch.Tensor] = []

        def gather(src):
            gathered.append(src.reshape(B * P, D).index_select(0, self.positions[len(gathered)]))

        if self.published:  # r_l = input of layer l = output of layer l-1 (or the offset input)
            if self.inject in wanted:
                gather(h)
            visit = lambda l, h_in, h_out: gather(h_out) if (l + 1) in wanted else None  # noqa: E731
        else:  # r_l = output of layer l
            visit = lambda l, h_in, h_out: gather(h_out) if l in wanted else None  # noqa: E731
        run_layers(adapter, h, inputs, self.inject, self.stop, visit, checkpoint=checkpoint)
        return gathered

    def check_update(self, delta: torch.Tensor, step: int) -> None:
        """The offsets after step `step`'s update are finite (a huge lr, a huge gradient)."""
        if not bool(torch.isfinite(delta).all()):
            raise FloatingPointError(
                f"actreplay_ext: the offsets are not finite after the update of step {step} (lr too large, or "
                "non-finite gradients); offsets discarded, model unchanged"
            )

    def check_finite(self, value: float, kl: torch.Tensor, step: int) -> None:
        if math.isfinite(value):
            return
        per_layer = kl.detach().split([int(p.numel()) for p in self.positions])
        layer = next(l for l, k in zip(self.layers, per_layer) if not bool(torch.isfinite(k).all()))
        where = "input" if self.published else "output"
        raise FloatingPointError(
            f"actreplay_ext: the replay loss is {value} at step {step}: the RLVR model's layer {layer} "
            f"{where} is not finite (NaN or Inf activations); offsets discarded, model unchanged"
        )


def _optimize_distinct(adapter: ModelAdapter, pre: Prefill, targets: ReplayTargets,
                       cfg: ReplayConfig, start: Optional[torch.Tensor] = None) -> ReplayResult:
    n_visual = pre.visual_rows()
    D = pre.hidden0.shape[-1]
    if sum(n_visual) == 0:
        return ReplayResult(torch.zeros(0, D), [], [0] * cfg.depth, n_visual, {"loop": 0.0},
                            note="no visual tokens: nothing replayed", input_ids=pre.input_ids)
    t0 = time.perf_counter()
    P = pre.prefix_len
    flat_vis = pre.visual[:, :P].reshape(-1).nonzero().squeeze(1).to(pre.hidden0.device)
    inputs = pre.layers.prefix(P)
    lens = lens_params(adapter)
    targets = targets.to(lens[0].device)
    plan = LossPlan.build(targets, flat_vis, n_visual, cfg, lens[0].device, ops.result_dtype(lens[0].dtype))
    with torch.no_grad():  # layers before the injection point do not depend on the offsets
        hidden = run_layers(adapter, pre.hidden0[:, :P].detach(), inputs, 0, cfg.inject_layer)
    delta, losses = _descend(adapter, plan, hidden, flat_vis, inputs, lens, cfg, start, n_visual)
    deltas = delta.detach()
    if len(n_visual) > 1:
        deltas = list(deltas.split(n_visual))
    return ReplayResult(deltas, losses, targets.selected_counts(), n_visual, {"loop": time.perf_counter() - t0},
                        input_ids=pre.input_ids, inject_layer=cfg.inject_layer)


def _loss_at(adapter: ModelAdapter, plan: LossPlan, flat_hidden: torch.Tensor, flat_vis: torch.Tensor,
             delta: torch.Tensor, inputs: LayerInputs, lens, shape, dtype, checkpoint: bool):
    """One evaluation of the loop: the offsets added at the inject layer's input,
    the loop's layers, the lens KL at the selected tokens. Returns (loss, kl)."""
    unembed, norm_w, eps = lens
    h = ops.replay_scatter(flat_hidden, flat_vis, delta.to(flat_hidden.dtype), "add").to(dtype).view(shape)
    rows = torch.cat(plan.read(h, inputs, adapter, checkpoint)).to(unembed.device).contiguous()
    kl = ops.topk_kl(rows, unembed, norm_w, eps, plan.target_idx, plan.target_logp)
    return (kl * plan.weights).sum(), kl


_COMPILED = []


def compiled_loss():
    """`_loss_at` through torch.compile (ReplayConfig(compile=True)), made once per
    process with dynamic shapes, so prompts of other sizes reuse its code."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_loss_at, dynamic=True))
    return _COMPILED[0]


def _descend(adapter: ModelAdapter, plan: LossPlan, start: torch.Tensor, flat_vis: torch.Tensor,
             inputs: LayerInputs, lens, cfg: ReplayConfig, init: Optional[torch.Tensor] = None,
             n_visual: Optional[List[int]] = None):
    """Descend on the offsets for `cfg.steps` loss evaluations with the update
    rule `cfg.optimizer` (SPEC §3 step 6: "sgd", plain gradient descent, an
    update after each of them), stopping early where `cfg.tol` says the
    gradient has shrunk. Each prompt row of a batch descends as it would alone
    (RowRules). Returns (offsets [n_visual, D] float32, the loss at each
    evaluation, summed over the rows)."""
    B, P, D = start.shape
    dtype = start.dtype
    flat_hidden = start.reshape(B * P, D).to(ops.result_dtype(dtype))
    checkpoint = cfg.checkpoint is True or (cfg.checkpoint == "auto" and B * P >= AUTO_CHECKPOINT_TOKENS)
    n = int(flat_vis.numel())
    if init is not None and tuple(init.shape) != (n, D):
        raise ValueError(f"actreplay_ext: offsets of shape {tuple(init.shape)} for {n} visual tokens of size {D}")
    delta = (torch.zeros(n, D, dtype=torch.float32, device=start.device) if init is None
             else init.to(start.device).clone()).requires_grad_(True)
    losses: List[float] = []
    rules = RowRules(cfg.optimizer, cfg.step_size, flat_hidden.index_select(0, flat_vis),
                     n_visual if n_visual is not None else [n], cfg.tol)
    loss_of = compiled_loss() if cfg.compile else _loss_at
    with loop_autograd(adapter.model):
        for step in range(cfg.steps):
            if not plan.layers:  # nothing selected: the loss is 0 and has no gradient
                losses.append(0.0)
                continue
            loss, kl = loss_of(adapter, plan, flat_hidden, flat_vis, delta, inputs, lens, (B, P, D), dtype, checkpoint)
            value = float(loss.detach())
            plan.check_finite(value, kl, step)
            losses.append(value)
            log.debug("replay step %d: loss %.6g", step, value)
            if cfg.callback is not None:
                cfg.callback(step, value)
            (grad,) = torch.autograd.grad(loss, delta)
            row_losses = plan.row_losses(kl) if rules.needs_losses else None
            if not rules.observe(grad, row_losses, step):
                log.debug("replay: every row stopped by step %d (gradient norm <= tol * its first)", step)
                break
            if step == cfg.steps - 1 and not rules.update_after_last:
                break
            with torch.no_grad():
                rules.update(delta, grad, row_losses)  # sgd: exactly the published update
            plan.check_update(delta, step)
    return rules.finish(delta), losses
