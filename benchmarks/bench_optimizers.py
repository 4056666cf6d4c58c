"""The replay loop's optimisers: loss against evaluations and against seconds.

For every tiny family's pair (tiny.FAMILIES_TINY, its parity prompt and
layers) and the CPU benchmark shape of bench_replay.py (576 visual tokens,
D = 512, V = 32768, 6 layers), runs plain gradient descent ("sgd", the
published update) at every step size of a grid for --steps evaluations, and
"lbfgs" with its own defaults. The loss after k evaluations is the loss of the
offsets a k-step run returns: for sgd the loss at its (k+1)-th evaluation
(the last, after its final update, scored by replay_loss), for lbfgs the best
of its first k evaluations (no update follows its last one). Prints a table,
writes JSON and plots (loss vs evaluations for every problem; loss vs seconds
for the benchmark shape).

    python benchmarks/bench_optimizers.py                   # all families + the CPU shape
    python benchmarks/bench_optimizers.py --families llava --no-shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.core import replay_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_replay import build

GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
BUDGET = 9  # the evaluations lbfgs is compared at


def problems(args):
    """(name, base, rlvr, inputs, ReplayConfig kwargs) for each problem."""
    names = tiny.available_families() if args.families == ["all"] else args.families
    for name in names:
        fam = tiny.FAMILIES_TINY[name]
        base, rlvr = fam.pair()
        yield name, base, rlvr, fam.prompt(base), dict(layers=fam.layers, **dict(fam.passk_config))
    if not args.no_shape:
        base, rlvr, inputs = build("cpu", 576, gpu_shape=False)
        yield "cpu-shape-576", base, rlvr, inputs, dict(layers=6)


def curve(rlvr, inputs, targets, cfg):
    """Run once; the loss of the returned offsets after k = 1 .. steps evaluations, and seconds per evaluation."""
    t0 = time.perf_counter()
    try:
        result = ar.optimize(rlvr, inputs, targets, cfg)
    except FloatingPointError:  # a step size that overflows
        return None, time.perf_counter() - t0
    seconds = (time.perf_counter() - t0) / max(len(result.losses), 1)
    losses = result.losses
    if cfg.optimizer == "sgd":
        final = replay_loss(rlvr, inputs, targets, result.deltas, cfg)
        return losses[1:] + [final], seconds
    return [min(losses[:k]) for k in range(1, len(losses) + 1)], seconds


def bench_problem(name, base, rlvr, inputs, common, steps):
    targets = ar.compute_targets(base, inputs, ar.ReplayConfig(**common))
    sgd = {}
    for lr in GRID:
        losses, secs = curve(rlvr, inputs, targets, ar.ReplayConfig(lr=lr, steps=steps, **common))
        sgd[lr] = dict(losses=losses, seconds_per_eval=secs)
    ours, secs = curve(rlvr, inputs, targets, ar.ReplayConfig(optimizer="lbfgs", steps=steps, **common))
    finite = {lr: r for lr, r in sgd.items() if r["losses"] is not None and math.isfinite(r["losses"][-1])}
    best_lr = min(finite, key=lambda lr: finite[lr]["losses"][-1])
    best = finite[best_lr]["losses"][-1]
    sgd_at_budget = min(r["losses"][BUDGET - 1] for r in finite.values())
    reach = next((k + 1 for k, x in enumerate(ours) if x <= best), None)
    start = ar.optimize(rlvr, inputs, targets, ar.ReplayConfig(lr=0.0, steps=1, **common)).losses[0]
    return dict(problem=name, start_loss=start, sgd=sgd, lbfgs=dict(losses=ours, seconds_per_eval=secs),
                sgd_best_lr=best_lr, sgd_best_loss=best, sgd_best_at_budget=sgd_at_budget,
                lbfgs_at_budget=ours[BUDGET - 1], lbfgs_evals_to_sgd_best=reach,
                meets=ours[BUDGET - 1] <= best, selected=targets.selected_counts(),
                published_lr_loss=None if sgd[10.0]["losses"] is None else sgd[10.0]["losses"][-1])


def print_table(rows, steps):
    head = (f"{'problem':<16} {'start':>8} {'sgd best lr':>11} {f'sgd@{steps}':>9} {f'sgd@{BUDGET}':>9} "
            f"{f'lbfgs@{BUDGET}':>9} {'ratio':>6} {'lbfgs evals to sgd@' + str(steps):>20} {'s/eval sgd|lbfgs':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        reach = r["lbfgs_evals_to_sgd_best"]
        secs = f"{r['sgd'][r['sgd_best_lr']]['seconds_per_eval']:.3f}|{r['lbfgs']['seconds_per_eval']:.3f}"
        print(f"{r['problem']:<16} {r['start_loss']:>8.4g} {r['sgd_best_lr']:>11g} {r['sgd_best_loss']:>9.4g} "
              f"{r['sgd_best_at_budget']:>9.4g} {r['lbfgs_at_budget']:>9.4g} "
              f"{r['lbfgs_at_budget'] / r['sgd_best_loss']:>6.2f} {reach if reach else f'>{steps}':>20} {secs:>17}")
    met = sum(r["meets"] for r in rows)
    print(f"\nlbfgs with its defaults, {BUDGET} evaluations, <= sgd's best over the grid at {steps}: "
          f"{met} of {len(rows)} problems")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    cols = min(4, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        for lr, s in r["sgd"].items():
            if s["losses"] is not None and all(math.isfinite(x) for x in s["losses"]):
                ax.semilogy(range(1, len(s["losses"]) + 1), s["losses"], lw=0.8, alpha=0.6, label=f"sgd {lr:g}")
        ax.semilogy(range(1, len(r["lbfgs"]["losses"]) + 1), r["lbfgs"]["losses"], "k", lw=2.2, label="lbfgs")
        ax.axvline(BUDGET, color="grey", ls=":", lw=1)
        ax.set_title(r["problem"], fontsize=9)
        ax.set_xlabel("evaluations", fontsize=8)
        ax.set_ylabel("replay loss of the offsets", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    shape = [r for r in rows if r["problem"].startswith("cpu-shape")]
    if shape:
        r = shape[0]
        fig, ax = plt.subplots(figsize=(6, 4))
        for lr, s in r["sgd"].items():
            if s["losses"] is not None and all(math.isfinite(x) for x in s["losses"]):
                t = [s["seconds_per_eval"] * (k + 1) for k in range(len(s["losses"]))]
                ax.semilogy(t, s["losses"], lw=0.8, alpha=0.7, label=f"sgd {lr:g}")
        t = [r["lbfgs"]["seconds_per_eval"] * (k + 1) for k in range(len(r["lbfgs"]["losses"]))]
        ax.semilogy(t, r["lbfgs"]["losses"], "k", lw=2.2, label="lbfgs")
        ax.set_xlabel("seconds (CPU)")
        ax.set_ylabel("replay loss of the offsets")
        ax.set_title(f"{r['problem']}: loss against time")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        seconds_path = path[:-len(".png")] + "_seconds.png"
        fig.savefig(seconds_path, dpi=110)
        print(f"wrote {seconds_path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["all"], help="tiny families (default: all installed)")
    p.add_argument("--no-shape", action="store_true", help="leave out the CPU benchmark shape")
    p.add_argument("--steps", type=int, default=25, help="evaluations per run (default 25, the published count)")
    p.add_argument("--out", default="benchmarks/results/bench_optimizers_cpu.json", help="JSON path (plots beside)")
    args = p.parse_args(argv)
    if args.steps < BUDGET:
        p.error(f"--steps must be >= {BUDGET}")
    torch.manual_seed(0)
    rows = []
    for name, base, rlvr, inputs, common in problems(args):
        rows.append(bench_problem(name, base, rlvr, inputs, common, args.steps))
        print(f"  {name}: done", flush=True)
    print()
    print_table(rows, args.steps)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, threads=torch.get_num_threads(),
                grid=list(GRID), budget=BUDGET, steps=args.steps)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    plot(rows, args.out[:-len(".json")] + ".png")


if __name__ == "__main__":
    main()
