"""Plain-PyTorch ports of the published per-prompt procedures (SPEC §3-4),
written for parity tests and as the benchmark baseline, waste included: the
whole models (vision tower, every decoder layer, the lm_head over every
position) run in every step, the lens materialises full-vocabulary logits, and
the weights keep their requires_grad. Hooks on the decoder layers read and
offset the residual stream. Batch size 1, as the published code.

Divergences from the published code, as SPEC §3 documents: the RMSNorm of the
loss runs in float32 (bf16 there), and the final norm is applied on the RLVR
side of every layer (the published code skips it at the last layer).
"""

from __future__ import annotations

import torch

from ..config import ReplayConfig
from ..models.registry import get_adapter
from .ops import lens_logits, select_tokens

__all__ = ["published_replay", "published_direct", "record_layer_outputs"]


def record_layer_outputs(adapter, L, record):
    """Forward pre-hooks that call record(l, h_out(l)) for l < L in a whole-model
    forward. h_out(l) is the residual stream leaving decoder layer l, read as
    the input of layer l + 1 (of the final norm after the last layer): the
    layer's return value plus whatever the model's layer loop adds after it
    (Qwen3-VL's deepstack features; see actreplay_ext/models/qwen3_vl.py for why
    this and not `output_hidden_states`, which differs between transformers
    4.57 and 5.x there). For families that add nothing it is the layer's return value."""
    layers = adapter.decoder_layers()
    readers = [layers[l + 1] if l + 1 < len(layers) else adapter.final_norm() for l in range(L)]

    def hook(l):
        def read(mod, args, kwargs):
            record(l, args[0] if args else kwargs["hidden_states"])
        return read

    return [mod.register_forward_pre_hook(hook(l), with_kwargs=True) for l, mod in enumerate(readers)]


def _forward(adapter, model, inputs, hooks, grad=False):
    """model(**inputs) with `hooks` removed and the model's state restored after."""
    state = adapter.model_state()
    try:
        with torch.set_grad_enabled(grad):
            return model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        adapter.restore_state(state)


def _base_targets(b_ad, b_in, vis_pos, cfg):
    """The published base pass: every layer's output, the full lens at every
    position, the selection and the top-`topv` targets."""
    outs = {}
    _forward(b_ad, b_ad.model, b_in, record_layer_outputs(b_ad, cfg.depth, outs.__setitem__))
    W_b, w_b, eps_b = b_ad.unembed(), b_ad.lens_norm_weight(), b_ad.norm_eps()
    entropies, targets = [], []
    with torch.no_grad():
        for l in range(cfg.depth):
            logits = lens_logits(outs[l][0], W_b, w_b, eps_b)  # [T, V]
            logp = torch.log_softmax(logits, -1)
            entropies.append(-(logp.exp() * logp).sum(-1)[vis_pos])
            targets.append(logits[vis_pos].topk(cfg.topv, dim=-1))
    n_vis = int(vis_pos.numel())
    rule, value = cfg.selection_value(n_vis)
    ent = torch.stack(entropies)
    mask = select_tokens(ent, torch.ones(n_vis, dtype=torch.bool, device=ent.device), rule, value, cfg.select)
    mask[:cfg.inject_layer] = False
    for l in range(cfg.depth):  # with layers=[...], the layers not listed select nothing
        if l not in cfg.replay_layers:
            mask[l] = False
    sel = [mask[l].nonzero().squeeze(1) for l in range(cfg.depth)]
    t_idx = [targets[l].indices[sel[l]] for l in range(cfg.depth)]
    t_p = [torch.softmax(targets[l].values[sel[l]], -1) for l in range(cfg.depth)]
    return sel, t_idx, t_p, outs[0].shape[-1]


def _rlvr_hooks(r_ad, vis_pos, delta, acts, cfg):
    """Add the offsets at the input of layer m; record the input and output of every replay layer."""
    L, m = cfg.depth, cfg.inject_layer
    layers = r_ad.decoder_layers()

    def offset(mod, args, kwargs):
        h = args[0].clone()
        vp = vis_pos.to(h.device)  # the models and their inputs may live on other devices
        h[0, vp] = (h[0, vp].float() + delta.to(h.device)).to(h.dtype)
        acts["in", m] = h
        return (h,) + tuple(args[1:]), kwargs

    # Outputs first: layer m's pre-hooks then read h_out(m - 1) before the offset is added.
    hooks = record_layer_outputs(r_ad, L, lambda l, h: acts.__setitem__(("out", l), h))
    hooks.append(layers[m].register_forward_pre_hook(offset, with_kwargs=True))
    for l in range(L):
        if l != m:
            hooks.append(layers[l].register_forward_pre_hook(lambda mod, a, l=l: acts.__setitem__(("in", l), a[0])))
    return hooks


def published_replay(rlvr, base, inputs, config=None):
    """The published loop (SPEC §3). Returns a dict: deltas [n_vis, D] float32,
    losses (before each update), selected (tokens per layer)."""
    cfg = config or ReplayConfig()
    b_ad, r_ad = get_adapter(base, "base"), get_adapter(rlvr, "rlvr")
    b_in, r_in = b_ad.forward_inputs(inputs), r_ad.forward_inputs(inputs)
    ids = b_in["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("published_replay: the published loop takes batch size 1")
    vis_pos = b_ad.visual_mask(ids)[0].nonzero().squeeze(1)
    n_vis = int(vis_pos.numel())
    sel, t_idx, t_p, D = _base_targets(b_ad, b_in, vis_pos, cfg)

    delta = torch.zeros(n_vis, D, dtype=torch.float32, device=r_in["input_ids"].device, requires_grad=True)
    acts = {}
    W_r, w_r, eps_r = r_ad.unembed(), r_ad.lens_norm_weight(), r_ad.norm_eps()
    side = "in" if cfg.alignment == "published" else "out"
    losses = []
    for _ in range(cfg.steps):
        acts.clear()
        _forward(r_ad, rlvr, r_in, _rlvr_hooks(r_ad, vis_pos, delta, acts, cfg), grad=True)  # the whole model
        loss = torch.zeros((), dtype=torch.float32, device=W_r.device)
        with torch.enable_grad():
            for l in range(cfg.inject_layer, cfg.depth):
                if sel[l].numel() == 0:
                    continue
                h_l = acts[side, l]
                r = h_l[0, vis_pos[sel[l].to(vis_pos.device)].to(h_l.device)].to(W_r.device)
                logits = lens_logits(r, W_r, w_r, eps_r)  # [|S_l|, V]
                q = torch.log_softmax(logits.gather(1, t_idx[l].to(W_r.device)), -1)
                p = t_p[l].to(W_r.device)
                loss = loss + (p * (torch.log(p) - q)).sum(-1).mean()
            if cfg.normalize:
                loss = loss / n_vis
        losses.append(float(loss.detach()))
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= cfg.step_size * grad
    return {"deltas": delta.detach(), "losses": losses, "selected": [int(s.numel()) for s in sel]}


def published_direct(rlvr, base, inputs, config):
    """A plain-PyTorch port of the published direct substitution (SPEC §4),
    batch size 1: full forwards of both models with hooks, the full logit lens
    at every position, then a forward of the RLVR model whose layer inputs are
    replaced by the base model's where the rule holds. Returns a dict with the
    substituted forward's `logits` and the per-layer `counts`."""
    cfg = config
    b_ad, r_ad = get_adapter(base, "base"), get_adapter(rlvr, "rlvr")
    b_in, r_in = b_ad.forward_inputs(inputs), r_ad.forward_inputs(inputs)
    L = cfg.depth
    thresholds = {l: t for l, t in zip(cfg.replay_layers, cfg.thresholds)}

    def run(adapter, model, model_inputs, pre_hook=None):
        ins, outs = {}, {}
        hooks = []
        for l, layer in enumerate(adapter.decoder_layers()[:L]):
            if pre_hook is not None:
                hooks.append(layer.register_forward_pre_hook(lambda m, a, k, l=l: pre_hook(l, a, k), with_kwargs=True))
            hooks.append(layer.register_forward_pre_hook(lambda m, a, l=l: ins.__setitem__(l, a[0])))
        hooks += record_layer_outputs(adapter, L, outs.__setitem__)
        return ins, outs, _forward(adapter, model, model_inputs, hooks).logits

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
    dev = e_b[0].device
    tokens = tokens.to(dev)
    masks = [tokens & (e_b[l] < thresholds[l]) & (e_b[l] < e_r[l].to(dev)) if l in thresholds
             else torch.zeros_like(tokens) for l in range(L)]

    def replace(l, args, kwargs):
        h = args[0].clone()
        b = b_ins[l]
        h[0, masks[l].to(h.device)] = b[0, masks[l].to(b.device)].to(h.device, h.dtype)
        return (h,) + tuple(args[1:]), kwargs

    _, _, logits = run(r_ad, rlvr, r_in, pre_hook=replace)
    return {"logits": logits, "counts": [int(m.sum()) for m in masks]}
