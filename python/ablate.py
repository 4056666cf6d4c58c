"""Run a list of Activation Replay configurations over a set of prompts and
write one table: per configuration and prompt, the loss curve, the selected
tokens per layer, the answer and the time. The harness for the paper's
ablations (low- vs high-entropy replay, top-k selection, mid-layer replay,
direct substitution, ...).

    python python/ablate.py --demo
    python python/ablate.py --base BASE_DIR --rlvr RLVR_DIR --data prompts.jsonl \\
        --configs configs.json --out ablation/

prompts.jsonl: one JSON object per line with "question" and "image" (a path)
or "images" (a list of paths) and/or "video" (see actreplay_ext.data).
configs.json: a list of {"name": ..., "preset": optional, ...ReplayConfig fields};
{"name": "baseline", "baseline": true} generates without replay.
Writes ablation.md (the table) and ablation.json (everything, full loss curves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import actreplay_ext as ar


def demo_setup():
    """The embedded tiny pair, three built-in prompts, and the ablation grid."""
    from actreplay_ext import tiny

    base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
    prompts = [
        {"id": f"demo-{i}", "inputs": tiny.make_inputs(rlvr, images=images, video=video, seed=i)}
        for i, (images, video) in enumerate([([(8, 8)], None), ([(8, 8), (4, 6)], None), ([(4, 4)], (2, 4, 4))])
    ]
    common = dict(layers=3, lr=0.02, steps=10)
    configs = [
        {"name": "baseline", "baseline": True},
        {"name": "low (published)", **common},
        {"name": "high", **common, "select": "high"},
        {"name": "top-4", **common, "rule": "topk", "topk_tokens": 4},
        {"name": "matched", **common, "alignment": "matched"},
        {"name": "mid (inject 2)", **common, "inject_layer": 2},
        {"name": "direct", "mode": "direct", "thresholds": [2.5, 2.5, 2.5]},
    ]
    return base, rlvr, prompts, configs, None


def load_real(args):
    """Checkpoints from local paths (or hub ids where the network allows)."""
    from actreplay_ext import data

    base = data.load_model(args.base, args.dtype, args.device_map, args.attn)
    rlvr = data.load_model(args.rlvr, args.dtype, args.device_map, args.attn)
    processor = data.load_processor(args.rlvr)
    device = data.input_device(rlvr)
    prompts = [{"id": row.id, "inputs": data.encode(processor, row, device)} for row in data.read_jsonl(args.data)]
    with open(args.configs) as f:
        configs = json.load(f)
    return base, rlvr, prompts, configs, processor


def make_config(spec: Dict) -> ar.ReplayConfig:
    fields = {k: v for k, v in spec.items() if k not in ("name", "preset", "baseline")}
    if spec.get("preset"):
        return ar.ReplayConfig.preset(spec["preset"], **fields)
    return ar.ReplayConfig(**fields)


def run(base, rlvr, prompts, configs, processor, max_new_tokens: int, quiet: bool = False) -> List[Dict]:
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(configs) * len(prompts), desc="ablation", disable=quiet, leave=False)
    for spec in configs:
        cfg = None if spec.get("baseline") else make_config(spec)
        for prompt in prompts:
            inputs = prompt["inputs"]
            t0 = time.perf_counter()
            if cfg is None:
                out = rlvr.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                last = None
            else:
                with ar.patch(rlvr, base=base, config=cfg) as handle:
                    out = rlvr.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                last = handle.last
            seconds = time.perf_counter() - t0
            new = out[0, inputs["input_ids"].shape[1]:]
            answer = processor.decode(new, skip_special_tokens=True) if processor else " ".join(map(str, new.tolist()))
            rows.append({
                "config": spec["name"], "prompt": prompt["id"], "seconds": seconds, "answer": answer,
                "losses": list(last.losses) if last else [], "selected": list(last.selected) if last else [],
                "note": last.note if last else "no replay",
            })
            bar.update(1)
    bar.close()
    return rows


def curve(losses: List[float], points: int = 4) -> str:
    if not losses:
        return "-"
    idx = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return " → ".join(f"{losses[i]:.3g}" for i in idx)


def table(rows: List[Dict]) -> str:
    lines = ["| config | prompt | loss (first → last) | selected per layer | answer | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        sel = ",".join(map(str, r["selected"])) or "-"
        ans = r["answer"].replace("|", "\\|").replace("\n", " ")[:60]
        lines.append(f"| {r['config']} | {r['prompt']} | {curve(r['losses'])} | {sel} | {ans} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="the embedded tiny pair and built-in prompts (no download)")
    p.add_argument("--base"), p.add_argument("--rlvr"), p.add_argument("--data"), p.add_argument("--configs")
    p.add_argument("--out", default="ablation")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16"), p.add_argument("--device-map", default="auto")
    p.add_argument("--attn", default="sdpa", help="attention implementation: eager, sdpa, flash_attention_2")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.demo:
        base, rlvr, prompts, configs, processor = demo_setup()
        max_new = args.max_new_tokens or 6
    else:
        missing = [n for n in ("base", "rlvr", "data", "configs") if not getattr(args, n)]
        if missing:
            p.error("without --demo, give " + ", ".join("--" + m for m in missing))
        base, rlvr, prompts, configs, processor = load_real(args)
        max_new = args.max_new_tokens or 1024
    rows = run(base, rlvr, prompts, configs, processor, max_new, args.quiet)
    md = table(rows)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nwrote {args.out}/ablation.md and ablation.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
