"""End-to-end replay benchmark: the published loop (reference.published_replay)
against ours (compute_targets + optimize) on the same prompt and config.

Prints per-prompt time, peak extra memory and the offsets' relative difference,
and writes JSON.

    python benchmarks/bench_replay.py                        # CPU shape
    python benchmarks/bench_replay.py --curve                # CPU: 256 ... 4096 visual tokens, fit, plot
    python benchmarks/bench_replay.py --device cuda --visual 1024 4096

--curve measures ours, the published loop and the floor at 256, 576, 1024,
2304 and 4096 visual tokens, fits each one's growth exponent (the slope of
log time against log visual tokens, least squares) and plots them log-log
(benchmarks/results/bench_replay_curve_<device>.png).

CPU shape: a random Qwen2.5-VL with D = 512, 8 layers, V = 32768, one image of
576 visual tokens and 64 text tokens, layers = 6, steps = 25, float32.
GPU shape: a random Qwen2.5-VL-7B-shaped model (D = 3584, V = 152064, 28 layers,
bf16, sdpa) with the given numbers of visual tokens, layers = 16; plus the
floor: 25 forward + input-gradient passes of the truncated decoder alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import _release_free_heap, _reset_peak_rss, _rss_kib


def image_grid(n_visual: int):
    """An (h, w) patch grid with h*w/4 = n_visual visual tokens."""
    side = int(math.isqrt(n_visual))
    while n_visual % side:
        side -= 1
    return (2 * side, 2 * (n_visual // side))


def build(device, n_visual, gpu_shape):
    # sharpen scales the final-norm weight so that, on random weights, the ratio
    # rule selects a real subset (about 15-50% of the visual tokens per layer on
    # the CPU shape); near-uniform entropies would select nothing and make the
    # loop trivially cheap. Lens logits have std ~ 0.02 * sqrt(D) * sharpen
    # (HF's init), so the scale keeps that std at the CPU shape's value.
    if gpu_shape:
        kw = dict(hidden=3584, layers=28, vocab=152064, heads=28, kv_heads=4, intermediate=18944,
                  attn_implementation="sdpa", dtype=torch.bfloat16, device=device)
    else:
        kw = dict(hidden=512, layers=8, vocab=32768, heads=8, attn_implementation="sdpa")
    kw["sharpen"] = 12.0 * math.sqrt(512 / kw["hidden"])
    base, rlvr = tiny.make_pair("qwen2_5_vl", **kw)
    inputs = tiny.make_inputs(base, images=[image_grid(n_visual)], text_len=64)
    return base, rlvr, {k: v.to(device) for k, v in inputs.items()}


def measure(fn, device):
    """(seconds, peak extra bytes, result) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _release_free_heap()
        base = _rss_kib("VmRSS")
        _reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(0, _rss_kib("VmHWM") - base) * 1024
    return seconds, peak, out


def decoder_floor(rlvr, inputs, cfg):
    """25 forward + input-gradient passes of the layers the loop needs, alone."""
    from actreplay_ext.core import capture_prefill, loop_autograd
    from actreplay_ext.models import get_adapter
    from actreplay_ext.models.calls import layer_output

    ad = get_adapter(rlvr)
    pre = capture_prefill(ad, inputs)
    P = pre.prefix_len
    kwargs = pre.layers.prefix(P).kwargs
    layers = ad.decoder_layers()[: cfg.layers - 1]
    x0 = pre.hidden0[:, :P].detach()

    def run():
        with loop_autograd(rlvr):
            for _ in range(cfg.steps):
                x = x0.clone().requires_grad_()
                h = x
                for layer in layers:
                    h = layer_output(layer(h, **kwargs))
                (g,) = torch.autograd.grad(h.float().square().mean(), x)
        return g

    return run


def bench_one(args, n_vis, layers, gpu_shape, warm_up=True):
    base, rlvr, inputs = build(args.device, n_vis, gpu_shape)
    # lr: the published 10.0 diverges on random weights; the comparison is of cost
    # and agreement, so use a rate at which the loss falls.
    cfg = ar.ReplayConfig(layers=layers, steps=args.steps, lr=1e-3 if not gpu_shape else 1.0)

    def ours():
        t = ar.compute_targets(base, inputs, cfg)
        return ar.optimize(rlvr, inputs, t, cfg)

    if warm_up:
        ours()  # warm-up (allocator, kernels)
    t_o, m_o, res = measure(ours, args.device)
    row = dict(device=args.device, visual_tokens=n_vis, layers=layers, steps=args.steps,
               ours_seconds=t_o, ours_peak_bytes=m_o, selected=res.selected,
               loss_first=res.losses[0], loss_last=res.losses[-1])
    if not args.skip_published:
        try:
            t_p, m_p, pub = measure(lambda: reference.published_replay(rlvr, base, inputs, cfg), args.device)
        except torch.cuda.OutOfMemoryError:
            # The published loop keeps full-vocabulary logits of every selected
            # token of every layer in its graph; record that it did not fit.
            row.update(published_seconds=float("nan"), published_oom=True)
            torch.cuda.empty_cache()
        else:
            d = (res.deltas - pub["deltas"]).abs().max() / pub["deltas"].abs().max().clamp_min(1e-30)
            row.update(published_seconds=t_p, published_peak_bytes=m_p, speedup=t_p / t_o,
                       memory_ratio=m_o / max(m_p, 1), offsets_rel_diff=float(d))
            del pub
    floor = decoder_floor(rlvr, inputs, cfg)
    if warm_up:
        floor()
    t_f, m_f, _ = measure(floor, args.device)
    row.update(floor_seconds=t_f, floor_peak_bytes=m_f)
    return row


CURVE = (256, 576, 1024, 2304, 4096)


def growth_exponents(rows):
    """Per measured series, the least-squares slope of log(seconds) against
    log(visual tokens): time ~ n^exponent over the measured range."""
    out = {}
    for key in ("ours_seconds", "published_seconds", "floor_seconds"):
        pts = [(math.log(r["visual_tokens"]), math.log(r[key])) for r in rows
               if r.get(key) and math.isfinite(r[key]) and r[key] > 0]
        if len(pts) >= 2:
            mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
            sxx = sum((x - mx) ** 2 for x, _ in pts)
            out[key.replace("_seconds", "")] = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return out


def plot_curve(rows, exponents, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label in (("published", "published loop"), ("ours", "ours"), ("floor", "floor")):
        pts = [(r["visual_tokens"], r[f"{key}_seconds"]) for r in rows
               if math.isfinite(r.get(f"{key}_seconds", math.nan))]
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=f"{label} (~n^{exponents.get(key, math.nan):.2f})")
    ax.set_xlabel("visual tokens per prompt")
    ax.set_ylabel("seconds per prompt")
    ax.set_title("Replay cost against prompt size (time per prompt)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--visual", type=int, nargs="+", default=None, help="visual tokens per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--skip-published", action="store_true", help="only ours and the floor")
    p.add_argument("--curve", action="store_true", help=f"the cost curve: {', '.join(map(str, CURVE))} visual tokens")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gpu_shape = args.device == "cuda"
    visual = args.visual or (list(CURVE) if args.curve else [1024, 4096] if gpu_shape else [576])
    layers = 16 if gpu_shape else 6
    meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads(),
                build=ar.build_info(), gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    out = args.out or f"benchmarks/results/bench_replay_{'curve_' if args.curve else ''}{args.device}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rows = []
    for n_vis in visual:
        rows.append(bench_one(args, n_vis, layers, gpu_shape, warm_up=not rows))  # one warm-up per process
        print(f"row done: {rows[-1]}", flush=True)
        with open(out, "w") as f:  # after every row: a run cut off by its time limit keeps what it measured
            json.dump(dict(meta=meta, rows=rows, exponents=growth_exponents(rows)), f, indent=1)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the models of this size are gone with bench_one's frame

    for r in rows:  # a selection that picks (almost) nothing would make the loop trivially cheap
        print(f"selected tokens per layer at {r['visual_tokens']} visual tokens: {r['selected']}")
    print(f"{'device':6} {'n_vis':>6} {'published s':>12} {'ours s':>8} {'floor s':>8} {'speedup':>8} "
          f"{'pub MiB':>9} {'ours MiB':>9} {'mem ratio':>9} {'offsets rel':>11}")
    for r in rows:
        print(f"{r['device']:6} {r['visual_tokens']:6d} {r.get('published_seconds', float('nan')):12.2f} "
              f"{r['ours_seconds']:8.2f} {r['floor_seconds']:8.2f} {r.get('speedup', float('nan')):8.2f} "
              f"{r.get('published_peak_bytes', 0) / 2**20:9.1f} {r['ours_peak_bytes'] / 2**20:9.1f} "
              f"{r.get('memory_ratio', float('nan')):9.3f} {r.get('offsets_rel_diff', float('nan')):11.2e}")
    exponents = growth_exponents(rows)
    if len(rows) > 1:
        print("growth exponents (time ~ n^e): " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    if args.curve:
        plot_curve(rows, exponents, out[:-len(".json")] + ".png")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
