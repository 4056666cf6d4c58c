"""`actreplay ablate`: a list of Activation Replay configurations over a set
of prompts, one table: per configuration and prompt, the loss curve, the
selected tokens per layer, the answer and the time. The harness for the
paper's ablations (low- vs high-entropy replay, top-k selection, mid-layer
replay, direct substitution, ...).

    actreplay ablate --demo --out ablation/
    actreplay ablate --base BASE_DIR --rlvr RLVR_DIR --data prompts.jsonl \\
        --configs configs.json --out ablation/

prompts.jsonl: one JSON object per line with "question" and "image" (a path)
or "images" (a list of paths) and/or "video" (see actreplay_ext.tools.data).
configs.json: a list of {"name": ..., "preset": optional, ...ReplayConfig
fields}; {"name": "baseline", "baseline": true} generates without replay.
Every configuration is checked (names unique, keys known, values of the right
JSON type: "baseline" is true or false, never the string "false"; values
valid, fits the model) before a model loads. Writes OUT/ablation.md (the table) and
OUT/ablation.json (the resolved configurations, models, versions, and every
row with its full loss curve); without --out it only prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Dict, List, Optional

from ..config import ReplayConfig
from . import checks, console, data, provenance
from .console import UsageError

__all__ = ["Ablation", "add_arguments", "ablate", "main", "demo_setup", "make_config", "parse_spec", "load_configs"]

_SPEC_KEYS = {"name", "preset", "baseline"}
_FIELDS = {f.name for f in dataclasses.fields(ReplayConfig)} - {"callback"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", action="store_true", help="the embedded tiny pair and built-in prompts (no download)")
    p.add_argument("--base", help="base checkpoint: a local directory (or a hub id where the network allows)")
    p.add_argument("--rlvr", help="RLVR checkpoint (its processor is used)")
    p.add_argument("--data", metavar="JSONL", help='prompts: {"question", "image"|"images"|"video"} per line')
    p.add_argument("--configs", metavar="JSON", help='a list of {"name", "preset"?, ReplayConfig fields...}')
    p.add_argument("--out", metavar="DIR", help="where ablation.md and ablation.json go (default: print only)")
    p.add_argument("--max-new-tokens", type=console.positive_int, default=None,
                   help="answer length (default 1024; demo 6)")
    console.add_load_options(p)


def demo_setup():
    """The embedded tiny pair, three built-in prompts, and the ablation grid."""
    from .. import tiny
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


@dataclasses.dataclass
class Ablation:
    """One configuration of the grid, read once from its entry (`spec`, as written)."""

    name: str
    config: Optional[ReplayConfig]  # None: the baseline, generating without replay
    spec: Dict


def make_config(spec: Dict) -> ReplayConfig:
    """The ReplayConfig of a replay entry: its preset (when it names one) with its fields on top."""
    fields = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    preset = spec.get("preset")
    if preset is not None:  # "" or 0 is a wrong preset, not "no preset"
        if not isinstance(preset, str):
            raise ValueError(f"'preset' must be a preset's name (a string), got {preset!r}")
        return ReplayConfig.preset(preset, **fields)
    return ReplayConfig(**fields)


def parse_spec(spec, where: str) -> Ablation:
    """A configs.json entry, checked: a 'name' string, known keys, 'baseline' a
    JSON boolean (the string "false" is truthy: it would run without replay), a
    baseline without replay fields (they would be ignored), a valid config.
    Errors name `where` and the entry."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise UsageError(f"{where}: each configuration is an object with a 'name' string")
    where = f"{where} ({spec['name']})"
    unknown = sorted(set(spec) - _SPEC_KEYS - _FIELDS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: name, "
                         f"preset, baseline and the ReplayConfig fields {', '.join(sorted(_FIELDS))}")
    baseline = spec.get("baseline", False)
    if not isinstance(baseline, bool):
        raise UsageError(f"{where}: 'baseline' must be true or false (a JSON boolean), got {baseline!r}")
    if baseline:
        ignored = sorted(set(spec) - {"name", "baseline"})
        if ignored:
            raise UsageError(f"{where}: 'baseline': true generates without replay, so {', '.join(map(repr, ignored))} "
                             "would be ignored; drop them, or drop 'baseline' to replay")
        return Ablation(spec["name"], None, spec)
    try:
        return Ablation(spec["name"], make_config(spec), spec)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: {e}") from None


def load_configs(path: str) -> List[Ablation]:
    """configs.json, every entry checked (`parse_spec`) and names unique. Errors name `path[i]`."""
    checks.input_file(path, "--configs")
    try:
        with open(path) as f:
            specs = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"--configs {path}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(specs, list) or not specs:
        raise UsageError(f"--configs {path}: must be a non-empty list of configurations")
    return _unique([parse_spec(spec, f"--configs {path}[{i}]") for i, spec in enumerate(specs)], f"--configs {path}")


def _unique(ablations: List[Ablation], where: str) -> List[Ablation]:
    names = set()
    for i, a in enumerate(ablations):
        if a.name in names:
            raise UsageError(f"{where}[{i}]: duplicate name {a.name!r}")
        names.add(a.name)
    return ablations


def _load_real(args):
    """Checked inputs first, then the checkpoints (local paths, or hub ids where the network allows)."""
    missing = [n for n in ("base", "rlvr", "data", "configs") if not getattr(args, n)]
    if missing:
        raise UsageError("without --demo, give " + ", ".join("--" + m for m in missing))
    rows = data.read_jsonl(args.data, check_files=True)
    configs = load_configs(args.configs)
    model_configs = [checks.checkpoint_config(args.base, "--base"), checks.checkpoint_config(args.rlvr, "--rlvr")]
    checks.check_pair_configs(*model_configs)
    for a in configs:
        if a.config is not None:
            try:
                checks.check_pair_configs(None, model_configs[1], a.config)
            except ValueError as e:
                raise UsageError(f"--configs {args.configs} ({a.name}): {e}") from None
    processor = data.load_processor(args.rlvr)
    encoded = [data.encode(processor, row) for row in rows]  # the processor's errors before the weights load
    load = console.load_kwargs(args)
    base = data.load_model(args.base, **load)
    rlvr = data.load_model(args.rlvr, **load)
    device = data.input_device(rlvr)
    prompts = [{"id": row.id, "inputs": {k: v.to(device) if hasattr(v, "to") else v for k, v in enc.items()}}
               for row, enc in zip(rows, encoded)]
    models = {name: {**checks.checkpoint_location(path), **checks.checkpoint_identity(path, config, False)}
              for name, path, config in (("base", args.base, model_configs[0]), ("rlvr", args.rlvr, model_configs[1]))}
    return base, rlvr, prompts, configs, processor, models


def run(base, rlvr, prompts, configs: List[Ablation], processor, max_new_tokens: int,
        quiet: bool = False) -> List[Dict]:
    from tqdm.auto import tqdm

    import actreplay_ext as ar

    rows = []
    bar = tqdm(total=len(configs) * len(prompts), desc="ablation", disable=quiet, leave=False)
    for ablation in configs:
        cfg = ablation.config
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
                "config": ablation.name, "prompt": prompt["id"], "seconds": seconds, "answer": answer,
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


def ablate(args) -> int:
    checks.output_dir(args.out, "--out")
    if args.demo:
        base, rlvr, prompts, specs, processor = demo_setup()
        configs = _unique([parse_spec(spec, f"demo[{i}]") for i, spec in enumerate(specs)], "demo")
        models = {"demo": "actreplay_ext.tiny qwen2_5_vl pair, noise 0.2, seed 0"}
    else:
        base, rlvr, prompts, configs, processor, models = _load_real(args)
    # `is None`, never `or`: 0 is refused by the option's type, not read as the default
    max_new = args.max_new_tokens if args.max_new_tokens is not None else 6 if args.demo else 1024
    rows = run(base, rlvr, prompts, configs, processor, max_new, args.quiet)
    md = table(rows)
    print(md)
    if args.out:
        resolved = [{**a.spec, "resolved": None if a.config is None else provenance.config_dict(a.config)}
                    for a in configs]
        report = {"configs": resolved, "models": models, "max_new_tokens": max_new, "versions": provenance.versions(),
                  "rows": rows}
        with console.writing("--out", args.out):
            console.write_text(os.path.join(args.out, "ablation.md"), md + "\n")
            console.write_json(os.path.join(args.out, "ablation.json"), report)
        print(f"\nwrote {args.out}/ablation.md and ablation.json")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The harness as a script (python/ablate.py runs this)."""
    p = console.CommandParser(prog="actreplay ablate", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    console.add_logging_options(p)
    add_arguments(p)
    args = p.parse_args(argv)
    restore = console.setup_logging(args)
    try:
        return console.guarded("actreplay ablate", lambda: ablate(args), args.verbose)
    finally:
        restore()
