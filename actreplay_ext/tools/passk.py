"""`actreplay passk`: Pass@K of an RLVR model with and without Activation
Replay, side by side, data-parallel under torchrun, resumable.

For every row of a JSONL dataset the RLVR model samples `--samples` answers
twice, once plainly and once with the replay (`actreplay_ext.patch`; the
samples of one prompt share one optimisation), from the same random seed.
Each answer is checked against the row's answer; Pass@k is the unbiased
estimator over the samples, averaged over rows, with a bootstrap confidence
interval over rows for each Pass@k and for the difference replay - baseline.

    actreplay passk --base BASE --rlvr RLVR --data rows.jsonl --out results/ \\
        --samples 8 --k 1 4 8 --preset mm-eureka-7b
    torchrun --nproc_per_node 8 -m actreplay_ext passk ...   # one model pair per GPU
    torchrun --nproc_per_node 2 -m actreplay_ext passk --demo --out demo/  # tiny pair, CPU

Dataset rows: {"question", "answer", "image"|"images"|"video", "choices"?, "id"?}
(see actreplay_ext.tools.data). Verifiers (--verifier): "auto" (choice letter when
the row has choices, numeric when the answer is a number, else boxed text),
"boxed", "numeric", "choice".

Data parallel: under torchrun every rank takes every WORLD_SIZE-th row, on GPU
LOCAL_RANK when there are GPUs (NCCL) and on the CPU otherwise (gloo); rank 0
gathers the records and writes the results.

Resumable, never mixed: OUT/run.json records everything that determines the
samples (the checkpoints by content: the hashes of their config, prompt files
and weights; the replay configuration, the sampling settings, the seed, the
dtype); each rank appends one line per finished (row, mode) to
OUT/records.rank<R>.jsonl, tagged with that run's fingerprint and the row's
content hash. A rerun with the same settings skips what is done (any world
size, any working directory, a copy of a checkpoint); with other settings, or
after a row's content changed, it refuses and says what differs, unless
--resume-anyway, which records what it let pass. `--report --out OUT` prints
the table of the records so far without loading a model.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from ..config import OPTIMIZERS
from . import checks, console, data, provenance, verify
from .console import UsageError

log = logging.getLogger(__name__)
MODES = ("baseline", "replay")
BOOTSTRAP = 2000  # resamples of the rows for the confidence intervals
NAME_MAX = 255  # bytes in one file name, on the usual file systems


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import PRESETS

    p.add_argument("--demo", action="store_true", help="the embedded tiny pair and a 6-row synthetic dataset")
    p.add_argument("--base", help="base checkpoint: a local directory (or a hub id where the network allows)")
    p.add_argument("--rlvr", help="RLVR checkpoint (its processor is used): a local directory or hub id")
    p.add_argument("--data", metavar="JSONL", help='rows: {"question", "answer", "image"|"images"|"video", ...}')
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where run.json, the records and results.json/.md go (a rerun resumes there)")
    p.add_argument("--samples", type=console.positive_int, default=None,
                   help="answers sampled per row and mode: the n of Pass@k (default 8; demo 4)")
    p.add_argument("--n", type=console.positive_int, dest="samples", help=argparse.SUPPRESS)  # the old name
    p.add_argument("--k", type=console.positive_int, nargs="+", default=None,
                   help="the k of Pass@k (default: 1 and --samples)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=console.positive_int, default=None,
                   help="per answer (default 1024; demo 6)")
    p.add_argument("--verifier", choices=verify.VERIFIERS, default="auto", help="how answers are checked")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="replay configuration (default mm-eureka-7b; --demo has its own)")
    p.add_argument("--layers", type=console.layers_arg,
                   help="override the preset's replay layers: a count N (0..N-1) or a list like 0,2,4")
    p.add_argument("--lr", type=float, help="override the preset's step size")
    p.add_argument("--steps", type=console.positive_int, help="override the preset's number of steps")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="the update rule: sgd (the published one, the presets') or lbfgs (opt-in, no per-model "
                        "step size; without --lr it takes its own default)")
    p.add_argument("--tol", type=float, help="stop early once the gradient norm is at most TOL x the first one")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each row's seed derives from it and its id)")
    p.add_argument("--report", action="store_true",
                   help="print the table of the records already in --out (and write results.json/.md) without "
                        "loading a model: an interrupted or running run's numbers so far")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume into an --out whose run.json has other settings or rows (say, a checkpoint saved "
                        "again with other bytes): its records are kept, and the differences are written to run.json "
                        "and results.json ('overrides')")
    p.add_argument("--save-offsets", metavar="DIR",
                   help="save each row's learned offsets to DIR/<row id>.safetensors (ReplayResult.save; characters "
                        "of the id other than letters, digits, '_', '-' and '.' as %%XX)")
    console.add_load_options(p)


# ---------------------------------------------------------------- settings and identities


def validate(args, known: Optional[Dict] = None) -> Tuple[List[data.Row], object, Dict]:
    """Everything checked before a model loads: (rows, replay config, settings).
    The checkpoints are identified by content (checks.checkpoint_identity);
    `known` holds the weights' hashes of an earlier start in this --out."""
    # `is None`, never `or`: the counts' type (console.positive_int) has refused 0 already
    if args.samples is None:
        args.samples = 4 if args.demo else 8
    args.k = sorted(set(args.k if args.k is not None else [1, args.samples]))
    if args.max_new_tokens is None:
        args.max_new_tokens = 6 if args.demo else 1024
    if any(not 1 <= k <= args.samples for k in args.k):
        raise UsageError(f"every --k must be in 1..--samples ({args.samples}), got {args.k}")
    if not 0 < args.temperature < math.inf:  # inf samples uniformly, and is not JSON for run.json
        raise UsageError(f"--temperature must be a finite number > 0 (Pass@k samples), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    checks.output_dir(args.out, "--out")
    checks.output_dir(args.save_offsets, "--save-offsets")
    if args.demo and args.preset is not None:
        raise UsageError(f"--preset {args.preset}: --demo replays its tiny pair with its own settings (layers 3, "
                         "lr 0.005, steps 5); change them with --layers/--lr/--steps/--optimizer/--tol")
    args.preset = args.preset or "mm-eureka-7b"
    if args.demo:
        from .. import tiny
        rows = data.synthetic_rows(6)
        cfg = console.replay_config(args, defaults=dict(layers=3, lr=0.005, steps=5))  # the tiny model's
        checks.check_pair_configs(None, tiny.model_config(), cfg)  # e.g. --layers beyond its 4, before it starts
        models = {"demo": "actreplay_ext.tiny qwen2_5_vl pair, noise 0.2, seed 0"}
    else:
        missing = [n for n in ("base", "rlvr", "data") if getattr(args, n) is None]
        if missing:
            raise UsageError("without --demo, give " + ", ".join("--" + m for m in missing))
        rows = data.read_jsonl(args.data, check_files=True)
        unanswered = [r.id for r in rows if r.answer is None]
        if unanswered:
            raise UsageError(f"--data {args.data}: rows without an 'answer': {unanswered[:5]}")
        cfg = console.replay_config(args)
        if args.save_offsets and cfg.mode == "direct":
            raise UsageError(f"--save-offsets: --preset {args.preset} is a direct substitution (mode='direct'), which "
                             "learns no offsets to save; drop --save-offsets or take a mode='tokens' preset")
        base_config = checks.checkpoint_config(args.base, "--base")
        rlvr_config = checks.checkpoint_config(args.rlvr, "--rlvr")
        checks.check_pair_configs(base_config, rlvr_config, cfg)
        models = {}
        for name, path, config in (("base", args.base, base_config), ("rlvr", args.rlvr, rlvr_config)):
            log.info("identifying --%s %s by the hash of its weights (reused while its files are unchanged)",
                     name, path)
            models[name] = checks.checkpoint_identity(path, config, known=known)
    if args.save_offsets:
        for row in rows:  # a name the file system refuses would end the run after hours of sampling
            name = os.path.basename(offsets_file(args.save_offsets, row.id))
            if len(os.fsencode(name)) > NAME_MAX:
                raise UsageError(f"--save-offsets: row {row.id!r} makes a file name of {len(os.fsencode(name))} bytes "
                                 f"({name[:40]}...), over the {NAME_MAX} a file system takes; shorten its id")
    gpu = torch.cuda.is_available()
    settings = {
        "models": models,
        "replay": provenance.config_dict(cfg),
        "sampling": {"samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
                     "max_new_tokens": args.max_new_tokens, "verifier": args.verifier},
        "seed": args.seed,
        "load": {"dtype": args.dtype or ("bfloat16" if gpu else "float32"), "attn": args.attn},
    }
    return rows, cfg, settings


def offsets_file(directory: str, row_id: str) -> str:
    """Where --save-offsets keeps a row's offsets: one file per row id
    (provenance.file_name is one to one: 'q/1' and 'q_1' get two files)."""
    return os.path.join(directory, provenance.file_name(row_id) + ".safetensors")


def fingerprint(settings: Dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def row_hash(row: data.Row) -> str:
    """The hash of a row's content: its text, answer, choices and the bytes of its files."""
    h = hashlib.sha256(json.dumps([row.question, row.answer, row.choices]).encode())
    media = list(row.images) + (list(row.video) if isinstance(row.video, (list, tuple)) else [row.video])
    for item in media:
        if isinstance(item, str) and os.path.isfile(item):
            with open(item, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        elif isinstance(item, str) and os.path.isdir(item):
            for name in sorted(os.listdir(item)):
                with open(os.path.join(item, name), "rb") as f:
                    h.update(name.encode() + hashlib.sha256(f.read()).digest())
        elif item is not None:  # an in-memory image (the demo's): its pixels
            h.update(item.tobytes() if hasattr(item, "tobytes") else repr(item).encode())
    return h.hexdigest()[:16]


def row_seed(seed: int, row_id: str) -> int:
    """The seed of one row, the same with and without replay, on any rank and in any row order."""
    return int(hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()[:12], 16)


# ---------------------------------------------------------------- records and resuming


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


def _differences(old: Dict, new: Dict, prefix: str = "") -> List[str]:
    keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(new, dict) else None
    if keys is None:
        return [] if old == new else [f"{prefix or 'settings'}: {json.dumps(old)} there, {json.dumps(new)} now"]
    return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)]


def _with_replay_defaults(settings: Dict) -> Dict:
    """An older version's settings with the replay fields it did not record yet
    (optimizer, tol, compile, ...) at their defaults: the same run, if the rest agrees."""
    from ..config import ReplayConfig

    replay = settings.get("replay") if isinstance(settings, dict) else None
    if not isinstance(replay, dict):
        return settings
    try:
        return {**settings, "replay": ReplayConfig(**replay).as_dict()}
    except (TypeError, ValueError):  # a field this version does not know, or a value it refuses: not the same run
        return settings


def read_run(out: str) -> Optional[Dict]:
    """The run.json of `out` (None when there is none yet)."""
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--out {out}: its run.json cannot be read ({e}); give another --out") from None
    if not isinstance(run, dict) or not isinstance(run.get("fingerprint"), str) \
            or not isinstance(run.get("settings"), dict):
        raise UsageError(f"--out {out}: its run.json is not a Pass@K run's (no fingerprint and settings); "
                         "give another --out")
    return run


def check_resume(out: str, settings: Dict, hashes: Dict[str, str], run: Optional[Dict] = None,
                 anyway: bool = False) -> Tuple[str, List[Dict], List[str]]:
    """(the run's fingerprint, the records in `out` that this run can reuse, the
    differences kept by --resume-anyway); a UsageError when `out` holds another
    run's records or a row changed since its records were made, unless `anyway`.
    A run.json of an older version that recorded fewer replay fields is the same
    run when its settings agree with those fields at their defaults: the run
    keeps its fingerprint."""
    records = read_records(out)
    fp, kept = fingerprint(settings), []
    if run is not None:
        upgraded = _with_replay_defaults(run["settings"])
        if run["fingerprint"] != fp and fingerprint(upgraded) == fp:
            fp = run["fingerprint"]
        elif run["fingerprint"] != fp:
            diffs = _differences(upgraded, settings) or ["the settings' fingerprint"]
            if not anyway:
                raise UsageError(f"--out {out} holds a Pass@K run with other settings ({'; '.join(diffs[:6])}); give "
                                 "another --out, delete that directory to start over, or keep its records with "
                                 "--resume-anyway")
            fp, kept = run["fingerprint"], diffs
    elif records:
        raise UsageError(f"--out {out} holds records without a run.json (an older version's, or another "
                         "run's); give another --out")
    foreign = [r for r in records if r.get("run") != fp]
    if foreign:
        raise UsageError(f"--out {out}: {len(foreign)} record(s) belong to another run "
                         f"(fingerprint {foreign[0].get('run')!r}, this run {fp!r}); give another --out")
    changed = list(dict.fromkeys(r["id"] for r in records
                                 if r["id"] in hashes and r.get("row_hash") != hashes[r["id"]]))
    if changed and not anyway:
        raise UsageError(f"--data: row {changed[0]!r} changed since its records in {out} were made (its text, answer "
                         "or files differ); give another --out, or keep its records with --resume-anyway")
    kept += [f"row {i!r} changed since its records were made" for i in changed]
    return fp, records, kept


def run_file(run: Optional[Dict], fp: str, settings: Dict, rows: List[data.Row], args, known: Dict,
             kept: List[str]) -> Dict:
    """run.json as this start leaves it: the run's fingerprint and settings (an
    earlier start's, when this one resumes it), the rows, where the checkpoints
    were read from, the weights' hashes (reused while the files are unchanged),
    and every start that resumed despite differences, with what differed."""
    overrides = list((run or {}).get("overrides") or [])
    if kept:
        overrides.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "differences": kept, "settings": settings})
    where = {} if args.demo else {"base": checks.checkpoint_location(args.base),
                                  "rlvr": checks.checkpoint_location(args.rlvr)}
    return {"fingerprint": fp, "settings": run["settings"] if run else settings, "rows": [r.id for r in rows],
            "checkpoints": where, "weight_hashes": known, "overrides": overrides}


# ---------------------------------------------------------------- the numbers


def bootstrap(values: torch.Tensor, resamples: int = BOOTSTRAP, seed: int = 0) -> List[float]:
    """The 95% percentile interval of the mean of `values` [rows], resampling rows."""
    if values.numel() == 0:
        return [float("nan"), float("nan")]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(values.numel(), (resamples, values.numel()), generator=g)
    means = values.double()[idx].mean(1)
    return [float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975))]


def summarise(records: List[Dict], order: List[str], ks: List[int], samples: int) -> Dict:
    """Pass@k per mode over the dataset's rows (their ids, `order`) that have a
    record in every mode; 95% bootstrap intervals for each and for replay -
    baseline (paired: the same resampled rows)."""
    by_row: Dict[str, Dict[str, Dict]] = {}
    for r in records:
        by_row.setdefault(r["id"], {})[r["mode"]] = r
    complete = [i for i in order if all(m in by_row.get(i, {}) for m in MODES)]
    result: Dict = {"rows": len(complete), "rows_in_data": len(order), "samples": samples, "k": ks}
    per_row_k = {}
    for mode in MODES:
        scores, cis = {}, {}
        for k in ks:
            values = torch.tensor([verify.pass_at_k(len(by_row[i][mode]["correct"]), sum(by_row[i][mode]["correct"]),
                                                    k) for i in complete], dtype=torch.float64)
            per_row_k[mode, k] = values
            scores[f"pass@{k}"] = float(values.mean()) if values.numel() else float("nan")
            cis[f"pass@{k}"] = bootstrap(values)
        result[mode], result.setdefault("ci95", {})[mode] = scores, cis
    result["difference"] = {
        f"pass@{k}": {"mean": result["replay"][f"pass@{k}"] - result["baseline"][f"pass@{k}"],
                      "ci95": bootstrap(per_row_k["replay", k] - per_row_k["baseline", k])} for k in ks}
    result["per_row"] = {i: {m: sum(by_row[i][m]["correct"]) for m in MODES} for i in complete}
    return result


def markdown(result: Dict, names: str) -> str:
    ks, pct = result["k"], lambda x: f"{100 * x:.1f}"
    lines = [f"Pass@k over {result['rows']} of {result['rows_in_data']} rows, {result['samples']} samples per row "
             f"and mode ({names}; preset fields in results.json); 95% bootstrap intervals over rows",
             "", "| mode | " + " | ".join(f"Pass@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for mode in MODES:
        lines.append(f"| {mode} | " + " | ".join(
            f"{pct(result[mode][f'pass@{k}'])} [{pct(result['ci95'][mode][f'pass@{k}'][0])}, "
            f"{pct(result['ci95'][mode][f'pass@{k}'][1])}]" for k in ks) + " |")
    diff = result["difference"]
    lines.append("| replay - baseline | " + " | ".join(
        f"{pct(diff[f'pass@{k}']['mean'])} [{pct(diff[f'pass@{k}']['ci95'][0])}, {pct(diff[f'pass@{k}']['ci95'][1])}]"
        for k in ks) + " |")
    return "\n".join(lines)


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
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return dist.get_rank(), world, device


def gather_records(records: List[Dict], world: int) -> List[Dict]:
    """Every rank's records on rank 0 (the others get [])."""
    if world == 1:
        return records
    import torch.distributed as dist

    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(records, parts, dst=0)
    return [r for part in parts for r in part] if parts is not None else []


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------- sampling


def load(args, device):
    """(base, rlvr, processor) on `device`."""
    if args.demo:
        from .. import tiny
        torch.manual_seed(0)  # the demo pair is the same on every rank
        base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
        return base.to(device), rlvr.to(device), tiny.make_processor(rlvr)
    load_kw = console.load_kwargs(args, device)
    base = data.load_model(args.base, **load_kw)
    rlvr = data.load_model(args.rlvr, **load_kw)
    return base, rlvr, data.load_processor(args.rlvr)


def sample(models, row: data.Row, mode: str, args, cfg, seed: int, fp: str, rhash: str) -> Dict:
    import actreplay_ext as ar

    base, rlvr, processor = models
    t0 = time.perf_counter()
    inputs = data.encode(processor, row, data.input_device(rlvr))
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
               top_p=args.top_p, num_return_sequences=args.samples)
    torch.manual_seed(seed)  # the same sampling noise with and without replay
    note = ""
    if mode == "baseline":
        out = rlvr.generate(**inputs, **gen)
    else:
        with ar.patch(rlvr, base=base, config=cfg) as handle:
            out = rlvr.generate(**inputs, **gen)
        last = handle.last
        note = last.note if last is not None else ""
        if args.save_offsets and last is not None:
            path = offsets_file(args.save_offsets, row.id)
            with console.writing("--save-offsets", path):
                last.save(path)
    answers = data.decode_new(processor, out, inputs["input_ids"].shape[1])
    correct = [verify.verify(a, row.answer, row.choices, args.verifier) for a in answers]
    return {"run": fp, "id": row.id, "row_hash": rhash, "mode": mode, "correct": correct, "answers": answers,
            "note": note, "seconds": round(time.perf_counter() - t0, 3)}


def evaluate(args) -> int:
    if args.report:
        return report(args)
    t_start = time.perf_counter()
    run = read_run(args.out)
    known = dict((run or {}).get("weight_hashes") or {})
    rows, cfg, settings = validate(args, known)
    hashes = {r.id: row_hash(r) for r in rows}
    fp, resumed, kept = check_resume(args.out, settings, hashes, run, args.resume_anyway)
    if kept:
        log.warning("--resume-anyway: keeping the records in %s despite: %s", args.out, "; ".join(kept[:6]))
    done = {(r["id"], r["mode"]) for r in resumed}
    rank, world, device = init_distributed()
    new_run = run_file(run, fp, settings, rows, args, known, kept)
    if rank == 0:
        with console.writing("--out", args.out):
            console.write_json(os.path.join(args.out, "run.json"), new_run)
    _barrier(world)
    todo = [(row, m) for i, row in enumerate(rows) if i % world == rank for m in MODES if (row.id, m) not in done]
    if rank == 0:
        log.info("%d rows, %d rank(s); %d (row, mode) pairs already done", len(rows), world, len(done))
    t_load = time.perf_counter()
    models = load(args, device)
    t_load = time.perf_counter() - t_load

    from tqdm.auto import tqdm

    records = []
    with open(os.path.join(args.out, f"records.rank{rank}.jsonl"), "a") as f:
        for row, mode in tqdm(todo, desc=f"rank {rank}", disable=args.quiet, position=rank):
            rec = sample(models, row, mode, args, cfg, row_seed(args.seed, row.id), fp, hashes[row.id])
            f.write(json.dumps(rec) + "\n")  # one line per record, flushed: a kill tears at most the last
            f.flush()
            records.append(rec)
    gathered = gather_records(records, world)
    if rank == 0:
        _write_results(args, new_run, gathered, world,
                       {"load_s": round(t_load, 3), "total_s": round(time.perf_counter() - t_start, 3)})
    _barrier(world)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def report(args) -> int:
    """--report: the table of the records in --out so far, from its run.json, without a model."""
    given = [f"--{n.replace('_', '-')}" for n in ("base", "rlvr", "data", "save_offsets", "samples", "max_new_tokens",
                                                  "preset", "layers", "lr", "steps", "optimizer", "tol")
             if getattr(args, n) is not None] + [o for o, on in (("--demo", args.demo),
                                                                  ("--resume-anyway", args.resume_anyway)) if on]
    if given:
        raise UsageError(f"--report reads the run in --out and loads no model: it takes --out and --k, not "
                         f"{', '.join(given)}")
    run = read_run(args.out)
    if run is None:
        raise UsageError(f"--report: --out {args.out} holds no run.json (no Pass@K run was started there)")
    samples = (run["settings"].get("sampling") or {}).get("samples")
    if not isinstance(samples, int) or samples < 1:
        raise UsageError(f"--out {args.out}: its run.json records no sampling.samples; give another --out")
    args.samples, args.k = samples, sorted(set(args.k if args.k is not None else [1, samples]))
    if any(not 1 <= k <= samples for k in args.k):
        raise UsageError(f"every --k must be in 1..{samples} (the run's samples per row), got {args.k}")
    if not isinstance(run.get("rows"), list):  # a run.json of a version that did not record its rows
        run["rows"] = list(dict.fromkeys(r["id"] for r in read_records(args.out) if r.get("run") == run["fingerprint"]))
    _write_results(args, run, [], 1, {})
    return 0


def _names(run: Dict) -> str:
    models, where = run["settings"].get("models") or {}, run.get("checkpoints") or {}
    if "demo" in models:
        return str(models["demo"])
    def name(k):  # where it was read from; an older run.json kept the path in the identity
        return (where.get(k) or {}).get("path") or (models.get(k) or {}).get("path") or (models.get(k) or {}).get("hub")

    return f"base {name('base')}, RLVR {name('rlvr')}"


def _write_results(args, run: Dict, gathered: List[Dict], world: int, timings: Dict) -> None:
    fp = run["fingerprint"]
    merged = {(r["id"], r["mode"]): r for r in read_records(args.out) + gathered if r.get("run") == fp}
    result = summarise(list(merged.values()), run["rows"], args.k, args.samples)
    sampled = {m: round(sum(r.get("seconds", 0.0) for r in merged.values() if r["mode"] == m), 3) for m in MODES}
    result.update(fingerprint=fp, settings=run["settings"], checkpoints=run.get("checkpoints", {}),
                  overrides=run.get("overrides", []), versions=provenance.versions(), world_size=world,
                  timings={**timings, "sampling_s": sampled})
    md = markdown(result, _names(run))
    if result["overrides"]:
        md += (f"\n\nResumed with --resume-anyway {len(result['overrides'])} time(s) despite: "
               + "; ".join(result["overrides"][-1]["differences"][:6]) + " (run.json, results.json: overrides)")
    with console.writing("--out", args.out):
        console.write_json(os.path.join(args.out, "results.json"), result)
        console.write_text(os.path.join(args.out, "results.md"), md + "\n")
    print(md)


def main(argv: Optional[List[str]] = None) -> int:
    """The harness as a script (python/eval_passk.py runs this)."""
    p = console.CommandParser(prog="actreplay passk", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    console.add_logging_options(p)
    add_arguments(p)
    args = p.parse_args(argv)
    restore = console.setup_logging(args)
    try:
        return console.guarded("actreplay passk", lambda: evaluate(args), args.verbose)
    finally:
        restore()
