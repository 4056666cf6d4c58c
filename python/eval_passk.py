"""Pass@K of an RLVR model with and without Activation Replay, side by side.

For every row of a JSONL dataset the RLVR model samples n answers twice, once
plainly and once with the replay (`actreplay_ext.patch`; the K sampled rows of
one prompt share one optimisation), from the same random seed. Each answer is
checked against the row's answer; Pass@k is the unbiased estimator over the n
samples, averaged over rows.

    python python/eval_passk.py --base BASE --rlvr RLVR --data rows.jsonl --out results/ \\
        --n 8 --k 1 4 8 --preset mm-eureka-7b
    torchrun --nproc_per_node 8 python/eval_passk.py ...   # one model pair per GPU
    torchrun --nproc_per_node 2 python/eval_passk.py --demo # embedded tiny pair, CPU

Dataset rows: {"question", "answer", "image"|"images"|"video", "choices"?, "id"?}
(see actreplay_ext.data). Verifiers (--verifier): "auto" (choice letter when the
row has choices, numeric when the answer is a number, else boxed text), "boxed",
"numeric", "choice".

Data parallel: under torchrun every rank takes every WORLD_SIZE-th row, on
GPU LOCAL_RANK when there are GPUs (NCCL) and on the CPU otherwise (gloo);
rank 0 gathers the records and writes the results. Multi-node works the same
(torchrun --nnodes ...).

Resumable: each rank appends one line per finished (row, mode) to
OUT/records.rank<R>.jsonl as it goes; a rerun skips whatever those files hold
(any world size). Rank 0 writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from typing import Dict, List, Tuple

import torch

import actreplay_ext as ar
from actreplay_ext import data, verify

log = logging.getLogger("eval_passk")
MODES = ("baseline", "replay")


# ---------------------------------------------------------------- distributed


def init_distributed() -> Tuple[int, int, torch.device]:
    """(rank, world size, device). Without torchrun: rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), world, device


def gather_records(records: List[Dict], world: int) -> List[Dict]:
    """Every rank's records on rank 0 (the others get [])."""
    if world == 1:
        return records
    import torch.distributed as dist

    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(records, parts, dst=0)
    return [r for part in parts for r in part] if parts is not None else []


# ---------------------------------------------------------------- records


def read_records(out: str) -> List[Dict]:
    """The records of earlier (possibly interrupted) runs; a torn last line is ignored."""
    records = []
    for path in sorted(glob.glob(os.path.join(out, "records.rank*.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s: skipping an incomplete line", path)
    return records


def summarise(records: List[Dict], ks: List[int], n: int) -> Dict:
    """Pass@k per mode over the rows that have a record in every mode."""
    by_row: Dict[str, Dict[str, Dict]] = {}
    for r in records:
        by_row.setdefault(r["id"], {})[r["mode"]] = r
    complete = sorted(i for i, modes in by_row.items() if all(m in modes for m in MODES))
    result = {"rows": len(complete), "n": n, "k": ks}
    for mode in MODES:
        scores = {}
        for k in ks:
            values = [verify.pass_at_k(len(c), sum(c), k) for c in (by_row[i][mode]["correct"] for i in complete)]
            scores[f"pass@{k}"] = sum(values) / len(values) if values else float("nan")
        result[mode] = scores
    result["per_row"] = {i: {m: sum(by_row[i][m]["correct"]) for m in MODES} for i in complete}
    return result


def markdown(result: Dict) -> str:
    ks = result["k"]
    lines = [f"Pass@k over {result['rows']} rows, n = {result['n']} samples per row and mode",
             "", "| mode | " + " | ".join(f"Pass@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for mode in MODES:
        lines.append(f"| {mode} | " + " | ".join(f"{100 * result[mode][f'pass@{k}']:.1f}" for k in ks) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- sampling


def sample(rlvr, processor, row: data.Row, mode: str, args, cfg, base, seed: int) -> Dict:
    inputs = data.encode(processor, row, data.input_device(rlvr))
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
               top_p=args.top_p, num_return_sequences=args.n)
    torch.manual_seed(seed)  # the same sampling noise with and without replay
    if mode == "baseline":
        out = rlvr.generate(**inputs, **gen)
        note = ""
    else:
        with ar.patch(rlvr, base=base, config=cfg) as handle:
            out = rlvr.generate(**inputs, **gen)
        note = handle.last.note if handle.last is not None else ""
    answers = data.decode_new(processor, out, inputs["input_ids"].shape[1])
    correct = [verify.verify(a, row.answer, row.choices, args.verifier) for a in answers]
    return {"id": row.id, "mode": mode, "correct": correct, "answers": answers, "note": note}


def setup(args, device):
    """(base, rlvr, processor, rows, config)."""
    if args.demo:
        from actreplay_ext import tiny

        base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
        processor = tiny.make_processor(rlvr)
        rows = data.synthetic_rows(6)
        cfg = ar.ReplayConfig(layers=3, lr=0.005, steps=5)
        return base.to(device), rlvr.to(device), processor, rows, cfg
    missing = [n for n in ("base", "rlvr", "data") if getattr(args, n) is None]
    if missing:
        raise SystemExit("eval_passk: without --demo, give " + ", ".join("--" + m for m in missing))
    device_map = {"": str(device)}
    base = data.load_model(args.base, args.dtype, device_map, args.attn)
    rlvr = data.load_model(args.rlvr, args.dtype, device_map, args.attn)
    processor = data.load_processor(args.rlvr)
    overrides = {k: getattr(args, k) for k in ("layers", "lr", "steps") if getattr(args, k) is not None}
    return base, rlvr, processor, data.read_jsonl(args.data), ar.ReplayConfig.preset(args.preset, **overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="embedded tiny pair and a 6-row synthetic dataset")
    p.add_argument("--base"), p.add_argument("--rlvr"), p.add_argument("--data", metavar="JSONL")
    p.add_argument("--out", default="passk", metavar="DIR")
    p.add_argument("--n", type=int, default=None, help="samples per row and mode (default 8; demo 4)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="the k of Pass@k (default 1 and n)")
    p.add_argument("--temperature", type=float, default=1.0), p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 1024; demo 6")
    p.add_argument("--verifier", choices=verify.VERIFIERS, default="auto")
    p.add_argument("--preset", default="mm-eureka-7b", choices=sorted(ar.PRESETS))
    p.add_argument("--layers", type=int), p.add_argument("--lr", type=float), p.add_argument("--steps", type=int)
    p.add_argument("--dtype", default="bfloat16"), p.add_argument("--attn", default="sdpa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.n = args.n or (4 if args.demo else 8)
    args.k = sorted(set(args.k or [1, args.n]))
    args.max_new_tokens = args.max_new_tokens or (6 if args.demo else 1024)
    if any(not 1 <= k <= args.n for k in args.k):
        p.error(f"every --k must be in 1..--n ({args.n}), got {args.k}")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    rank, world, device = init_distributed()
    if world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)  # the demo pair is the same on every rank
    base, rlvr, processor, rows, cfg = setup(args, device)
    missing = [r.id for r in rows if r.answer is None]
    if missing:
        raise SystemExit(f"eval_passk: rows without an 'answer': {missing[:5]}")
    os.makedirs(args.out, exist_ok=True)
    done = {(r["id"], r["mode"]) for r in read_records(args.out)}
    mine = [(i, row) for i, row in enumerate(rows) if i % world == rank]
    todo = [(i, row, m) for i, row in mine for m in MODES if (row.id, m) not in done]
    if rank == 0:
        log.info("%d rows, %d ranks; %d (row, mode) pairs already done", len(rows), world, len(done))

    from tqdm.auto import tqdm

    records = []
    with open(os.path.join(args.out, f"records.rank{rank}.jsonl"), "a") as f:
        for i, row, mode in tqdm(todo, desc=f"rank {rank}", disable=args.quiet, position=rank):
            rec = sample(rlvr, processor, row, mode, args, cfg, base, seed=args.seed * 1_000_003 + i)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            records.append(rec)
    gathered = gather_records(records, world)
    if rank == 0:
        merged = {(r["id"], r["mode"]): r for r in read_records(args.out) + gathered}
        result = summarise(list(merged.values()), args.k, args.n)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        md = markdown(result)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md + "\n")
        print(md)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
