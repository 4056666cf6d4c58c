"""Operator microbenchmarks: each operator against its plain-PyTorch oracle.

Prints a table (median time over repeats, peak extra memory) and writes JSON.

    python benchmarks/bench_ops.py                    # CPU shapes (and GPU shapes if a GPU is present)
    python benchmarks/bench_ops.py --device cuda --out $OUT/bench_ops_cuda.json

CPU shape (the acceptance shape): D = 512, V = 32768, N = M = 2048, float32.
GPU shapes (SPEC §6): D = 3584, V = 152064, N in 256, 1024, 4096, 16384, bf16,
plus the bare bf16 matrix product ``hidden @ unembed.T`` (the floor of lens_entropy).
Peak extra memory: on CUDA from the caching allocator's peak; on CPU from the
process's peak resident set (VmHWM, reset before each run), minus the resident
set before the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import actreplay_ext
from actreplay_ext import ops
from actreplay_ext import reference as ref

# ------------------------------------------------------------------ measuring


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap():
    """Hand freed heap pages back to the OS (glibc keeps them resident), so the
    next peak-RSS reading counts what the measured call allocates."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device: str, repeats: int, warmup: int = 1):
    """(median seconds, peak extra bytes) of fn()."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        _release_free_heap()
        base = _rss_kib("VmRSS")
        peak = None
        if _reset_peak_rss():
            fn()
            peak = max(0, _rss_kib("VmHWM") - base) * 1024
    return statistics.median(times), peak


def fmt_mb(b):
    return "n/a" if b is None else f"{b / 2**20:9.1f}"


# -------------------------------------------------------------------- cases


def lens_inputs(n, v, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).to(device)
    unembed = (torch.randn(v, d, generator=g) / d**0.5 * 4).to(dtype).to(device)
    weight = (torch.rand(d, generator=g) + 0.5).to(dtype).to(device)
    return hidden, unembed, weight


def eager_lens_entropy(hidden, unembed, weight, eps, topk):
    """What a user would write without this library: full logits, torch.topk."""
    logits = ref.lens_logits(hidden, unembed, weight, eps)
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1), torch.logsumexp(logits, -1), *logits.topk(topk, -1)


def bench_lens(rows, device, n, v, d, dtype, topk, repeats):
    h, U, w = lens_inputs(n, v, d, dtype, device)
    cases = {
        "ours": lambda: ops.lens_entropy(h, U, w, 1e-6, topk),
        "oracle": lambda: ref.lens_entropy(h, U, w, 1e-6, topk),
        "eager_topk": lambda: eager_lens_entropy(h, U, w, 1e-6, topk),
    }
    if device == "cuda":
        cases["matmul_floor"] = lambda: h @ U.T
    res = {k: measure(f, device, repeats) for k, f in cases.items()}
    for name, (t, mem) in res.items():
        rows.append(dict(op="lens_entropy", impl=name, device=device, dtype=str(dtype).split(".")[-1],
                         shape=f"N={n} V={v} D={d} topk={topk}", seconds=t, peak_extra_bytes=mem,
                         ratio_to_oracle=t / res["oracle"][0]))


def bench_topk_kl(rows, device, m, v, d, k, dtype, repeats):
    h, U, w = lens_inputs(m, v, d, dtype, device, seed=1)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, v, (m, k), generator=g).to(device)
    lp = torch.log_softmax(torch.randn(m, k, generator=g), -1).to(device)

    def run(fn):
        x = h.detach().requires_grad_()
        fn(x, U, w, 1e-6, idx, lp).sum().backward()
        return x.grad

    # "ours" is ops.topk_kl (on CPU its backward reads the forward's log q);
    # "recompute" is torch.ops.actreplay.topk_kl, whose backward recomputes it.
    cases = {"ours": lambda: run(ops.topk_kl), "recompute": lambda: run(torch.ops.actreplay.topk_kl),
             "oracle": lambda: run(ref.topk_kl)}
    res = {k2: measure(f, device, repeats) for k2, f in cases.items()}
    for name, (t, mem) in res.items():
        rows.append(dict(op="topk_kl fwd+bwd", impl=name, device=device, dtype=str(dtype).split(".")[-1],
                         shape=f"M={m} V={v} D={d} k={k}", seconds=t, peak_extra_bytes=mem,
                         ratio_to_oracle=t / res["oracle"][0]))


def bench_scatter(rows, device, t, m, d, dtype, repeats):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(t, d, generator=g).to(dtype).to(device)
    pos = torch.randperm(t, generator=g)[:m].to(device)
    vals = torch.randn(m, d, generator=g).to(dtype).to(device)
    cases = {"ours": lambda: ops.replay_scatter(h, pos, vals, "add"),
             "oracle": lambda: ref.replay_scatter(h, pos, vals, "add")}
    res = {k: measure(f, device, repeats) for k, f in cases.items()}
    for name, (tm, mem) in res.items():
        rows.append(dict(op="replay_scatter", impl=name, device=device, dtype=str(dtype).split(".")[-1],
                         shape=f"T={t} M={m} D={d}", seconds=tm, peak_extra_bytes=mem,
                         ratio_to_oracle=tm / res["oracle"][0]))


def bench_select(rows, device, L, n, repeats):
    g = torch.Generator().manual_seed(4)
    e = torch.rand(L, n, generator=g).to(device)
    cand = (torch.rand(n, generator=g) < 0.8).to(device)
    for rule, value in (("ratio", 0.4), ("topk", 0.25)):
        cases = {"ours": lambda rule=rule, value=value: ops.select_tokens(e, cand, rule, value, "high"),
                 "oracle": lambda rule=rule, value=value: ref.select_tokens(e, cand, rule, value, "high")}
        res = {k: measure(f, device, repeats) for k, f in cases.items()}
        for name, (tm, mem) in res.items():
            rows.append(dict(op=f"select_tokens {rule}/high", impl=name, device=device, dtype="float32",
                             shape=f"L={L} N={n}", seconds=tm, peak_extra_bytes=mem,
                             ratio_to_oracle=tm / res["oracle"][0]))


def run_cpu(rows, repeats):
    bench_lens(rows, "cpu", 2048, 32768, 512, torch.float32, 50, repeats)
    bench_topk_kl(rows, "cpu", 2048, 32768, 512, 50, torch.float32, repeats)
    bench_scatter(rows, "cpu", 4096, 1024, 512, torch.float32, repeats)
    bench_select(rows, "cpu", 16, 4096, repeats)


def run_cuda(rows, repeats, quick):
    ns = [256, 1024, 4096] if quick else [256, 1024, 4096, 16384]
    for n in ns:
        bench_lens(rows, "cuda", n, 152064, 3584, torch.bfloat16, 50, repeats)
    bench_topk_kl(rows, "cuda", 4096, 152064, 3584, 50, torch.bfloat16, repeats)
    bench_scatter(rows, "cuda", 8192, 4096, 3584, torch.bfloat16, repeats)
    bench_select(rows, "cuda", 28, 16384, repeats)


def print_table(rows):
    head = f"{'op':26} {'impl':12} {'device':6} {'dtype':9} {'shape':34} {'ms':>10} {'peak MiB':>9} {'x oracle':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:26} {r['impl']:12} {r['device']:6} {r['dtype']:9} {r['shape']:34} "
              f"{r['seconds'] * 1e3:10.2f} {fmt_mb(r['peak_extra_bytes'])} {r['ratio_to_oracle']:8.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="skip the largest GPU shape")
    p.add_argument("--out", default="benchmarks/results/bench_ops.json")
    args = p.parse_args(argv)
    rows = []
    if args.device in ("cpu", "all"):
        run_cpu(rows, args.repeats)
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        run_cuda(rows, args.repeats, args.quick)
    print_table(rows)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), torch=torch.__version__, build=actreplay_ext.build_info(),
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
