"""Plain-PyTorch oracles of the four operators, with the operators' signatures.

They materialise full ``[N, V]`` logits and are written for clarity, not speed:
tests compare the C++/CUDA kernels against them (usually on float64 copies of
the inputs), and the benchmarks use them as the baseline. They compute in
float32, or float64 when given float64 inputs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "lens_logits",
    "lens_entropy",
    "select_tokens",
    "replay_scatter",
    "topk_kl",
    "published_replay",
    "published_direct",
]


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm(hidden: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``h * rsqrt(mean(h^2) + eps) * w`` in the accumulation dtype."""
    x = hidden.to(_acc(hidden))
    if norm_weight is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(x.dtype)


def lens_logits(
    hidden: torch.Tensor, unembed: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """Full logit lens ``[N, V]``."""
    x = rms_norm(hidden, norm_weight, eps)
    return x @ unembed.to(x.dtype).T


def topk_desc_lower_index(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries per row in descending order, equal values in
    increasing index order (``torch.topk`` leaves tie order unspecified)."""
    if k == 0:
        n = logits.shape[0]
        return logits.new_empty((n, 0)), torch.empty((n, 0), dtype=torch.long, device=logits.device)
    kth = logits.topk(k, dim=-1).values[:, -1:]
    above = logits > kth
    at_kth = logits == kth
    # Among values equal to the k-th, keep the lowest indices.
    room = k - above.sum(-1, keepdim=True)
    keep = above | (at_kth & (at_kth.cumsum(-1) <= room))
    idx = keep.nonzero()[:, 1].view(logits.shape[0], k)  # increasing index per row
    vals = logits.gather(1, idx)
    order = vals.argsort(dim=-1, descending=True, stable=True)
    return vals.gather(1, order), idx.gather(1, order)


def lens_entropy(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    topk: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if topk < 0 or topk > unembed.shape[0]:
        raise ValueError(f"topk must be in [0, V={unembed.shape[0]}], got {topk}")
    logits = lens_logits(hidden, unembed, norm_weight, eps)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse[:, None]
    entropy = -(logp.exp() * logp).sum(-1)
    vals, idx = topk_desc_lower_index(logits, topk)
    return entropy, lse, vals, idx


def _layer_values(value: Union[float, Sequence[float]], L: int) -> list:
    vals = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return vals * L if len(vals) == 1 else vals


def _count_for(value: float, n_cand: int) -> int:
    c = value if value >= 1 else math.floor(value * n_cand)
    return min(int(c), n_cand)


def select_tokens(
    entropy: torch.Tensor,
    candidates: torch.Tensor,
    rule: str = "ratio",
    value: Union[float, Sequence[float]] = 0.4,
    side: str = "low",
) -> torch.Tensor:
    L, N = entropy.shape
    values = _layer_values(value, L)
    mask = torch.zeros(L, N, dtype=torch.bool, device=entropy.device)
    cand_idx = candidates.nonzero().flatten()
    if cand_idx.numel() == 0:
        return mask
    for layer in range(L):
        e = entropy[layer, cand_idx]
        v = values[layer]
        if rule == "ratio":
            low = e <= v * e.max()
        elif rule == "absolute":
            low = e < v
        elif rule == "topk":
            low = None
        else:
            raise ValueError(f"unknown rule {rule!r}")
        if low is not None and side == "low":
            mask[layer, cand_idx[low]] = True
            continue
        count = int(low.sum()) if low is not None else _count_for(v, cand_idx.numel())
        # Stable sort over candidates in index order: ties keep the lower index first.
        order = torch.sort(e, descending=(side == "high"), stable=True).indices
        mask[layer, cand_idx[order[:count]]] = True
    return mask


def replay_scatter(
    hidden: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, mode: str = "add"
) -> torch.Tensor:
    if mode == "add":
        return hidden.index_add(0, positions, values)
    if mode == "replace":
        return hidden.index_copy(0, positions, values)
    raise ValueError(f"mode must be 'add' or 'replace', got {mode!r}")


def topk_kl(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    eps: float,
    target_idx: torch.Tensor,
    target_logp: torch.Tensor,
) -> torch.Tensor:
    """Materialises the full-vocabulary logits, as the published code does."""
    logits = lens_logits(hidden, unembed, norm_weight, eps)
    q = torch.log_softmax(logits.gather(1, target_idx), dim=-1)
    lp = target_logp.to(q.dtype)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - q), torch.zeros_like(q))
    return terms.sum(-1)


# --------------------------------------------------- the published replay loop


def _record_layer_outputs(adapter, L, record):
    """Forward pre-hooks that call record(l, h_out(l)) for l < L in a whole-model
    forward. h_out(l) is the residual stream leaving decoder layer l, read as
    the input of layer l + 1 (of the final norm after the last layer): the
    layer's return value plus whatever the model's layer loop adds after it
    (Qwen3-VL's deepstack features; see actreplay_ext/qwen3_vl.py for why this
    and not `output_hidden_states`, which differs between transformers 4.57
    and 5.x there). For families that add nothing it is the layer's return value."""
    layers = adapter.decoder_layers()
    readers = [layers[l + 1] if l + 1 < len(layers) else adapter.final_norm() for l in range(L)]

    def hook(l):
        def read(mod, args, kwargs):
            record(l, args[0] if args else kwargs["hidden_states"])
        return read

    return [mod.register_forward_pre_hook(hook(l), with_kwargs=True) for l, mod in enumerate(readers)]


def published_replay(rlvr, base, inputs, config=None):
    """A plain-PyTorch port of the published per-prompt loop (SPEC §3), written
    for parity tests and as the benchmark baseline, waste included: the whole
    models (vision tower, every decoder layer, the lm_head over every position)
    run in every step, the lens materialises full-vocabulary logits for every
    position of the base pass and every selected token, and the weights keep
    their requires_grad. Hooks on the decoder layers read and offset the
    residual stream. Batch size 1 (as the published code). The output of
    layer l is the residual stream leaving it (`_record_layer_outputs`).

    Divergences from the published code, as SPEC §3 documents: the RMSNorm of
    the loss runs in float32 (bf16 there), and the final norm is applied on the
    RLVR side of every layer (the published code skips it at the last layer).

    Returns a dict: deltas [n_vis, D] float32, losses (before each update),
    selected (tokens per layer).
    """
    from .adapters import get_adapter
    from .config import ReplayConfig

    cfg = config or ReplayConfig()
    b_ad, r_ad = get_adapter(base, "base"), get_adapter(rlvr, "rlvr")
    b_in, r_in = b_ad.forward_inputs(inputs), r_ad.forward_inputs(inputs)
    ids = b_in["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("published_replay: the published loop takes batch size 1")
    vis_pos = b_ad.visual_mask(ids)[0].nonzero().squeeze(1)
    n_vis = int(vis_pos.numel())
    L, m = cfg.layers, cfg.inject_layer

    # 1. Base pass: every layer's output, the full lens at every position.
    outs = {}
    hooks = _record_layer_outputs(b_ad, L, outs.__setitem__)
    state = b_ad.model_state()
    try:
        with torch.no_grad():
            base(**b_in)
    finally:
        for h in hooks:
            h.remove()
        b_ad.restore_state(state)
    W_b, w_b, eps_b = b_ad.unembed(), b_ad.lens_norm_weight(), b_ad.norm_eps()
    entropies, targets = [], []
    with torch.no_grad():
        for l in range(L):
            logits = lens_logits(outs[l][0], W_b, w_b, eps_b)  # [T, V]
            logp = torch.log_softmax(logits, -1)
            entropies.append(-(logp.exp() * logp).sum(-1)[vis_pos])
            targets.append(logits[vis_pos].topk(cfg.topv, dim=-1))
    entropy = torch.stack(entropies)
    rule, value = cfg.selection_value(n_vis)
    mask = select_tokens(entropy, torch.ones(n_vis, dtype=torch.bool), rule, value, cfg.select)
    mask[:m] = False
    sel = [mask[l].nonzero().squeeze(1) for l in range(L)]
    t_idx = [targets[l].indices[sel[l]] for l in range(L)]
    t_p = [torch.softmax(targets[l].values[sel[l]], -1) for l in range(L)]

    # 2. The offsets and the RLVR hooks: add them at the input of layer m, record
    #    the input (published) or output (matched) of every replay layer.
    D = outs[0].shape[-1]
    delta = torch.zeros(n_vis, D, dtype=torch.float32, requires_grad=True)
    acts = {}
    layers = r_ad.decoder_layers()

    def offset(mod, args, kwargs):
        h = args[0].clone()
        h[0, vis_pos] = (h[0, vis_pos].float() + delta).to(h.dtype)
        acts["in", m] = h
        return (h,) + tuple(args[1:]), kwargs

    # Outputs first: layer m's pre-hooks then read h_out(m - 1) before the offset is added.
    hooks = _record_layer_outputs(r_ad, L, lambda l, h: acts.__setitem__(("out", l), h))
    hooks.append(layers[m].register_forward_pre_hook(offset, with_kwargs=True))
    for l in range(L):
        if l != m:
            hooks.append(layers[l].register_forward_pre_hook(lambda mod, a, l=l: acts.__setitem__(("in", l), a[0])))
    W_r, w_r, eps_r = r_ad.unembed(), r_ad.lens_norm_weight(), r_ad.norm_eps()
    side = "in" if cfg.alignment == "published" else "out"
    losses = []
    state = r_ad.model_state()
    try:
        for _ in range(cfg.steps):
            acts.clear()
            with torch.enable_grad():
                rlvr(**r_in)  # the whole model, every step
                loss = torch.zeros((), dtype=torch.float32)
                for l in range(m, L):
                    if sel[l].numel() == 0:
                        continue
                    r = acts[side, l][0, vis_pos[sel[l]]]
                    logits = lens_logits(r, W_r, w_r, eps_r)  # [|S_l|, V]
                    q = torch.log_softmax(logits.gather(1, t_idx[l]), -1)
                    p = t_p[l]
                    loss = loss + (p * (torch.log(p) - q)).sum(-1).mean()
                if cfg.normalize:
                    loss = loss / n_vis
            losses.append(float(loss.detach()))
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta -= cfg.lr * grad
    finally:
        for h in hooks:
            h.remove()
        r_ad.restore_state(state)
    return {"deltas": delta.detach(), "losses": losses, "selected": [int(s.numel()) for s in sel]}


def published_direct(rlvr, base, inputs, config):
    """A plain-PyTorch port of the published direct substitution (SPEC §4),
    batch size 1: full forwards of both models with hooks, the full logit lens
    at every position, then a forward of the RLVR model whose layer inputs are
    replaced by the base model's where the rule holds. Returns a dict with the
    substituted forward's `logits` and the per-layer `counts`."""
    from .adapters import get_adapter

    cfg = config
    b_ad, r_ad = get_adapter(base, "base"), get_adapter(rlvr, "rlvr")
    b_in, r_in = b_ad.forward_inputs(inputs), r_ad.forward_inputs(inputs)
    L = cfg.layers

    def run(adapter, model, model_inputs, pre_hook=None):
        ins, outs = {}, {}
        hooks = []
        for l, layer in enumerate(adapter.decoder_layers()[:L]):
            if pre_hook is not None:
                hooks.append(layer.register_forward_pre_hook(lambda m, a, k, l=l: pre_hook(l, a, k), with_kwargs=True))
            hooks.append(layer.register_forward_pre_hook(lambda m, a, l=l: ins.__setitem__(l, a[0])))
        hooks += _record_layer_outputs(adapter, L, outs.__setitem__)
        state = adapter.model_state()
        try:
            with torch.no_grad():
                logits = model(**model_inputs).logits
        finally:
            for h in hooks:
                h.remove()
            adapter.restore_state(state)
        return ins, outs, logits

    def entropies(adapter, outs):
        W, w, eps = adapter.unembed(), adapter.lens_norm_weight(), adapter.norm_eps()
        res = []
        for l in range(L):
            logp = torch.log_softmax(lens_logits(outs[l][0], W, w, eps), -1)  # [T, V]
            res.append(-(logp.exp() * logp).sum(-1))
        return res

    b_ins, b_outs, _ = run(b_ad, base, b_in)
    _, r_outs, _ = run(r_ad, rlvr, r_in)
    e_b, e_r = entropies(b_ad, b_outs), entropies(r_ad, r_outs)
    tokens = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))[0].bool()
    masks = [tokens & (e_b[l] < cfg.thresholds[l]) & (e_b[l] < e_r[l]) for l in range(L)]

    def replace(l, args, kwargs):
        h = args[0].clone()
        h[0, masks[l]] = b_ins[l][0, masks[l]].to(h.dtype)
        return (h,) + tuple(args[1:]), kwargs

    _, _, logits = run(r_ad, rlvr, r_in, pre_hook=replace)
    return {"logits": logits, "counts": [int(m.sum()) for m in masks]}
