"""The first things to learn on a GPU, standalone and quick (gpu_check.sh runs it).

    python benchmarks/gpu_smoke.py bench  --out $OUT/smoke.json   # lens_entropy vs the bare GEMM, topk_kl, spot check
    python benchmarks/gpu_smoke.py shapes                         # the tail shapes, for compute-sanitizer
    python benchmarks/gpu_smoke.py replay-step                    # one replay step of a small model, for memcheck
    python benchmarks/gpu_smoke.py bench --dry-run                # the same code on tiny CPU shapes (CI)

`bench` prints one line per measurement, flushed, and rewrites the JSON after
each one, so a run cut off by its time limit keeps every row it finished:

* lens_entropy (bf16, D = 3584, V = 152064, top-50) at N = 1024, 4096, 16384
  against the bare bf16 matrix product into float32 logits (its floor);
* topk_kl forward and backward separately (M = 4096, k = 50);
* a 128-row spot check of lens_entropy and topk_kl against the full-logit oracle.

`shapes` calls every operator once on the shapes where tiling edges live
(V = 2049 and 4097, topk 1 / 50 / 2048 / 2049 / V, N = 1) and checks the results
against the oracle; run it under `compute-sanitizer` with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that out-of-bounds accesses inside what
would be pooled memory are seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from actreplay_ext import ops
from actreplay_ext import reference as ref


def _time(fn, device, repeats):
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _gemm(h, W):
    """The floor of lens_entropy: the bare matrix product into float32 logits (bf16 inputs,
    float32 out where this torch's mm takes out_dtype; else the product in the input dtype)."""
    if h.is_cuda:
        try:
            return torch.mm(h, W.t(), out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):
            pass
    return h @ W.t()


class Rows:
    """Rows printed as they come and written to `path` after each one."""

    def __init__(self, path, meta):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, **row):
        self.rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump(dict(meta=self.meta, rows=self.rows), f, indent=1)
            os.replace(self.path + ".tmp", self.path)


def bench(args):
    dev = "cpu" if args.dry_run else "cuda"
    D, V, Ns, M, k = (64, 4099, (8, 32), 16, 5) if args.dry_run else (3584, 152064, (1024, 4096, 16384), 4096, 50)
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    repeats = 1 if args.dry_run else args.repeats
    meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, dry_run=args.dry_run,
                gpu=None if args.dry_run else torch.cuda.get_device_name(), D=D, V=V, dtype=str(dtype))
    rows = Rows(args.out, meta)
    g = torch.Generator(device=dev).manual_seed(0)
    W = (torch.randn(V, D, generator=g, device=dev) * 0.02).to(dtype)
    w = torch.ones(D, device=dev, dtype=dtype)
    for N in Ns:
        h = torch.randn(N, D, generator=g, device=dev).to(dtype)
        t_ops = _time(lambda h=h: ops.lens_entropy(h, W, w, 1e-6, 50 if not args.dry_run else k), dev, repeats)
        t_mm = _time(lambda h=h: _gemm(h, W), dev, repeats)
        rows.add(op="lens_entropy", N=N, seconds=t_ops, gemm_seconds=t_mm, ratio_to_gemm=t_ops / t_mm)
        del h
    h = torch.randn(M, D, generator=g, device=dev).to(dtype)
    idx = torch.randint(0, V, (M, k), generator=g, device=dev)
    lp = torch.log_softmax(torch.randn(M, k, generator=g, device=dev), -1)
    hr = h.clone().requires_grad_()
    # ops.topk_kl keeps log q for its backward; torch.ops.actreplay.topk_kl recomputes it.
    grads = {}
    for name, fn in (("topk_kl", ops.topk_kl), ("topk_kl_recompute", torch.ops.actreplay.topk_kl)):
        t_f = _time(lambda fn=fn: fn(h, W, w, 1e-6, idx, lp), dev, repeats)

        def fwd_bwd(fn=fn):
            (gr,) = torch.autograd.grad(fn(hr, W, w, 1e-6, idx, lp).sum(), hr)
            return gr

        t_fb = _time(fwd_bwd, dev, repeats)
        grads[name] = fwd_bwd()
        rows.add(op=name, M=M, k=k, forward_seconds=t_f, backward_seconds=t_fb - t_f)
    rows.add(op="topk_kl_logq_vs_recompute", grads_equal=bool(torch.equal(*grads.values())))
    n = 128 if not args.dry_run else 8
    ent, lse, vals, ix = ops.lens_entropy(h[:n], W, w, 1e-6, k)
    # the operator's contract: bf16 inputs as they are (normalised rows rounded to bf16, float32 sums)
    r_ent, r_lse, r_vals, r_ix = ref.lens_entropy(h[:n], W, w, 1e-6, k)
    kl = ops.topk_kl(h[:n], W, w, 1e-6, idx[:n], lp[:n])
    r_kl = ref.topk_kl(h[:n].float(), W.float(), w.float(), 1e-6, idx[:n], lp[:n])
    rows.add(op="spot_check", rows=n, entropy_max_abs=float((ent - r_ent).abs().max()),
             lse_max_abs=float((lse - r_lse).abs().max()), topk_index_agreement=float((ix == r_ix).float().mean()),
             kl_max_abs=float((kl - r_kl).abs().max()))
    return 0


def shapes(args):
    """Every operator on the tiling-edge shapes, checked against the oracle."""
    dev = "cpu" if args.dry_run else "cuda"
    want = set(args.only or ("lens_entropy", "topk_kl", "select_tokens", "replay_scatter"))
    g = torch.Generator(device=dev).manual_seed(1)
    bad = 0
    for V in (2049, 4097):
        W = torch.randn(V, 32, generator=g, device=dev)
        for N in (1, 5):
            h = torch.randn(N, 32, generator=g, device=dev)
            for topk in sorted({1, 50, 2048, 2049, V} & set(range(V + 1))) if "lens_entropy" in want else ():
                out = ops.lens_entropy(h, W, None, 1e-6, topk)
                expected = ref.lens_entropy(h, W, None, 1e-6, topk)
                ok = torch.allclose(out[0], expected[0], atol=1e-3) and torch.equal(out[3], expected[3])
                bad += not ok
                print(f"lens_entropy V={V} N={N} topk={topk} {'ok' if ok else 'MISMATCH'}", flush=True)
            if "topk_kl" not in want:
                continue
            idx = torch.randint(0, V, (N, 50), generator=g, device=dev)
            lp = torch.log_softmax(torch.randn(N, 50, generator=g, device=dev), -1)
            hr = h.clone().requires_grad_()
            (gr,) = torch.autograd.grad(ops.topk_kl(hr, W, None, 1e-6, idx, lp).sum(), hr)
            (g_rec,) = torch.autograd.grad(torch.ops.actreplay.topk_kl(hr, W, None, 1e-6, idx, lp).sum(), hr)
            lq = ops.topk_logp(h, W, None, 1e-6, idx)
            ok = (bool(torch.isfinite(gr).all()) and torch.equal(gr, g_rec)
                  and torch.allclose(lq, ref.topk_logp(h, W, None, 1e-6, idx), atol=1e-4))
            bad += not ok
            print(f"topk_kl/topk_logp V={V} N={N} {'ok' if ok else 'MISMATCH'}", flush=True)
    if "select_tokens" in want:
        bad += _select_and_scatter(g, dev)
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"shapes: {bad} mismatches", flush=True)
    return 1 if bad else 0


def _select_and_scatter(g, dev) -> int:
    bad = 0
    e = torch.rand(3, 2049, generator=g, device=dev)
    cand = torch.ones(2049, dtype=torch.bool, device=dev)
    for rule, value in (("ratio", [0.4]), ("topk", [7.0]), ("absolute", [0.5])):
        ok = torch.equal(ops.select_tokens(e, cand, rule, value, "low").cpu(),
                         ref.select_tokens(e.cpu(), cand.cpu(), rule, value, "low"))
        bad += not ok
        print(f"select_tokens {rule} {'ok' if ok else 'MISMATCH'}", flush=True)
    pos = torch.tensor([0, 2048], device=dev)
    x = torch.randn(2049, 8, generator=g, device=dev)
    vals = torch.randn(2, 8, generator=g, device=dev)
    ok = torch.equal(ops.replay_scatter(x, pos, vals, "add"), ref.replay_scatter(x, pos, vals, "add"))
    bad += not ok
    print(f"replay_scatter {'ok' if ok else 'MISMATCH'}", flush=True)
    return bad


def replay_step(args):
    """One replay step of a small model on the device, end to end: the base pass,
    the selection, one forward and backward of the loop and the offset update
    (every operator and the hooks), checked against the same step on the CPU."""
    import actreplay_ext as ar
    from actreplay_ext import tiny

    dev = "cpu" if args.dry_run else "cuda"
    cfg = ar.ReplayConfig(layers=3, steps=1, lr=1e-3)
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    inputs = tiny.make_inputs(rlvr, images=[(8, 8), (4, 6)], seed=2)
    expected = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    base, rlvr = base.to(dev), rlvr.to(dev)
    moved = {k: v.to(dev) for k, v in inputs.items()}
    got = ar.optimize(rlvr, moved, ar.compute_targets(base, moved, cfg), cfg)
    if dev == "cuda":
        torch.cuda.synchronize()
    diff = float((got.deltas.cpu() - expected.deltas).abs().max() / expected.deltas.abs().max().clamp_min(1e-30))
    ok = got.selected == expected.selected and sum(got.selected) > 0 and diff <= 1e-2
    print(f"replay step: selected {got.selected}, loss {got.losses[0]:.4g}, offsets vs CPU {diff:.1e} "
          f"{'ok' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["bench", "shapes", "replay-step"])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file (bench), rewritten after every row")
    p.add_argument("--only", nargs="+", default=None, metavar="OP",
                   help="shapes: only these operators (e.g. lens_entropy, for racecheck)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    return {"bench": bench, "shapes": shapes, "replay-step": replay_step}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
