"""End-to-end replay benchmark: the published loop (reference.published_replay)
against ours (compute_targets + optimize) on the same prompt and config.

Prints per-prompt time, peak extra memory and the offsets' relative difference,
and writes JSON.

    python benchmarks/bench_replay.py                        # CPU shape
    python benchmarks/bench_replay.py --curve                # CPU: 256 ... 4096 visual tokens, fit, plot
    python benchmarks/bench_replay.py --device cuda --visual 1024 4096
    python benchmarks/bench_replay.py --compile              # CPU: compile=True against eager, 20 prompts

--curve measures ours, the published loop and the floor at 256, 576, 1024,
2304 and 4096 visual tokens, fits each one's growth exponent (the slope of
log time against log visual tokens, least squares) and plots them log-log
(benchmarks/results/bench_replay_curve_<device>.png).

--compile runs 20 prompts of varying visual-token counts (432 ... 720) through
one model pair, each with the eager loop and with ReplayConfig(compile=True)
side by side: the first compiled prompt pays the compilation (cold), the 2nd
... 20th show whether the dynamic-shape code is reused (warm), and the
offsets are compared to the eager ones.

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
                       memory_ratio=m_o / max(m_p, 1), offsets_rel_diff=float(d),
                       same_selection=pub["selected"] == res.selected,
                       losses_rel_diff=max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(res.losses, pub["losses"])))
            del pub
    floor = decoder_floor(rlvr, inputs, cfg)
    if warm_up:
        floor()
    t_f, m_f, _ = measure(floor, args.device)
    row.update(floor_seconds=t_f, floor_peak_bytes=m_f)
    return row


CURVE = (256, 576, 1024, 2304, 4096)
COMPILE_PROMPTS = (576, 480, 640, 528, 704, 448, 600, 672, 512, 560,
                   624, 456, 720, 500, 588, 612, 432, 660, 540, 690)


def _compiled_graphs():
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_compile(args, layers):
    """Eager against compile=True on COMPILE_PROMPTS, one pair, side by side."""
    import dataclasses

    base, rlvr, _ = build(args.device, COMPILE_PROMPTS[0], gpu_shape=False)
    eager = ar.ReplayConfig(layers=layers, steps=args.steps, lr=1e-3)
    compiled = dataclasses.replace(eager, compile=True)
    rows = []
    for i, n_vis in enumerate(COMPILE_PROMPTS):
        inputs = tiny.make_inputs(base, images=[image_grid(n_vis)], text_len=64, seed=i)
        times, results = {}, {}
        for name, cfg in (("eager", eager), ("compiled", compiled)):
            graphs = _compiled_graphs()
            t, _, res = measure(lambda x=inputs, c=cfg: ar.optimize(rlvr, x, ar.compute_targets(base, x, c), c),
                                args.device)
            times[name], results[name] = t, res
            if name == "compiled":
                new_graphs = _compiled_graphs() - graphs
        a, b = results["eager"].deltas, results["compiled"].deltas
        rows.append(dict(prompt=i + 1, visual_tokens=n_vis, selected=results["eager"].selected,
                         eager_seconds=times["eager"], compiled_seconds=times["compiled"],
                         new_graphs=new_graphs,
                         offsets_rel_diff=float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))))
        print(f"prompt {i + 1:2d}: {n_vis} visual tokens, eager {times['eager']:.2f} s, "
              f"compiled {times['compiled']:.2f} s ({new_graphs} new graphs), "
              f"offsets rel. diff {rows[-1]['offsets_rel_diff']:.1e}", flush=True)
    return rows


def compile_summary(rows):
    from statistics import median

    warm = rows[1:]
    return dict(cold_eager_seconds=rows[0]["eager_seconds"], cold_compiled_seconds=rows[0]["compiled_seconds"],
                warm_eager_median_seconds=median([r["eager_seconds"] for r in warm]),
                warm_compiled_median_seconds=median([r["compiled_seconds"] for r in warm]),
                warm_new_graphs=sum(r["new_graphs"] for r in warm),
                max_offsets_rel_diff=max(r["offsets_rel_diff"] for r in rows))


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
    p.add_argument("--compile", action="store_true",
                   help=f"compile=True against eager over {len(COMPILE_PROMPTS)} prompts (CPU shape)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.compile:
        if args.device != "cpu" or args.curve or args.visual:
            p.error("--compile measures the CPU shape only: no --device cuda, --curve or --visual with it")
        return main_compile(args)
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


def main_compile(args):
    out = args.out or "benchmarks/results/bench_replay_compile_cpu.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, threads=torch.get_num_threads(),
                build=ar.build_info(), steps=args.steps, layers=6)
    rows = bench_compile(args, layers=6)
    summary = compile_summary(rows)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1)
    print(f"{'':22} {'eager s':>8} {'compiled s':>10} {'compiled / eager':>16}")
    for label, e, c in (("cold (1st prompt)", summary["cold_eager_seconds"], summary["cold_compiled_seconds"]),
                        ("warm (median 2-20)", summary["warm_eager_median_seconds"],
                         summary["warm_compiled_median_seconds"])):
        print(f"{label:22} {e:8.2f} {c:10.2f} {c / e:16.2f}")
    print(f"graphs compiled after the 1st prompt: {summary['warm_new_graphs']}; "
          f"offsets max rel. diff {summary['max_offsets_rel_diff']:.1e}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
