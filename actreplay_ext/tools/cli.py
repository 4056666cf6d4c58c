"""The `actreplay` command (also `python -m actreplay_ext`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import List, Optional

import torch

from ..config import OPTIMIZERS, layer_list
from ..core.images import image_hashes, images_differ
from . import checks, console, data, provenance
from .console import UsageError

DESCRIPTION = """\
Activation Replay for vision-language models: at test time, learn offsets for
the visual tokens of an RLVR post-trained model so that its low-entropy visual
activations, read through the logit lens, move back toward its base model's;
then generate as usual.

commands:
  demo     run the replay on an embedded tiny base/RLVR pair (random weights, no
           download) and print what it did: tokens selected per layer, the loss
           of every step, and the answer with and without replay
  run      answer one prompt (images, video, text) with your base and RLVR
           checkpoints, with and without replay
  analyze  the paper's logit-lens analysis on your checkpoints and prompts:
           KL(base || RLVR) per layer by base-entropy decile, as CSV and PNG
  ablate   many replay configurations over many prompts, one table
  passk    Pass@K with and without replay on a JSONL dataset, with bootstrap
           intervals; data-parallel under `torchrun -m actreplay_ext passk`

`actreplay COMMAND --help` describes each command's options.
"""

log = logging.getLogger("actreplay_ext")


def demo(args) -> int:
    import actreplay_ext as ar
    from actreplay_ext import tiny

    torch.manual_seed(0)
    t0 = time.perf_counter()
    base, rlvr = tiny.make_pair(args.family, noise=0.2)
    inputs = tiny.make_inputs(rlvr, images=[(8, 8), (4, 6)], seed=args.seed)
    cfg = ar.ReplayConfig(layers=args.layers, lr=args.lr, steps=args.steps)
    n_vis = int(ar.get_adapter(rlvr).visual_mask(inputs["input_ids"]).sum())
    print(f"actreplay demo: tiny {args.family} pair ({rlvr.config.text_config.num_hidden_layers} layers, "
          f"D={rlvr.config.text_config.hidden_size}, V={rlvr.config.text_config.vocab_size}); prompt of "
          f"{inputs['input_ids'].shape[1]} tokens with 2 images = {n_vis} visual tokens")
    print(f"config: layers={cfg.layers} entropy_threshold={cfg.entropy_threshold} topv={cfg.topv} "
          f"lr={cfg.step_size} steps={cfg.steps} alignment={cfg.alignment}\n")
    plain = rlvr.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        replayed = rlvr.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    result = handle.last
    print("layer  selected visual tokens")
    for l, n in enumerate(result.selected):
        print(f"{l:5d}  {n:4d} / {n_vis}")
    print("\nstep  loss")
    for step, loss in enumerate(result.losses):
        print(f"{step:4d}  {loss:.6f}")
    start = inputs["input_ids"].shape[1]
    print(f"\nanswer without replay: {plain[0, start:].tolist()}")
    print(f"answer with replay:    {replayed[0, start:].tolist()}")
    print(f"offsets: {tuple(result.deltas.shape)}, max |delta| = {float(result.deltas.abs().max()):.4g}; "
          f"replay {result.timings['loop']:.2f} s, total {time.perf_counter() - t0:.2f} s")
    return 0


def _run_checks(args):
    """Everything `run` can check before a model loads: (config, targets or None,
    base config, RLVR config)."""
    if args.base is None and args.targets is None:
        raise UsageError("give --base (the base checkpoint) or --targets (targets saved before)")
    checks.media_files(args.image, args.video, "--image/--video")
    checks.input_file(args.targets, "--targets")
    outputs = {"--save-targets": args.save_targets, "--save-offsets": args.save_offsets, "--json": args.json}
    for option, path in outputs.items():
        checks.output_file(path, option, stdout=option == "--json")
    checks.distinct_outputs(outputs, {"--image": args.image, "--video": args.video, "--targets": args.targets})
    if args.targets and args.save_targets:
        raise UsageError(f"--save-targets: with --targets {args.targets} the base model does not run, so there are "
                         "no new targets to save; drop one of the two")
    targets = None
    if args.targets:
        import actreplay_ext as ar

        targets = ar.ReplayTargets.load(args.targets)
        cfg = _config_from_targets(args, targets.config)
    else:
        cfg = console.replay_config(args)
    if cfg.mode == "direct" and (args.base is None or args.targets or args.save_targets or args.save_offsets):
        raise UsageError(f"preset {args.preset!r} substitutes base activations directly (it learns nothing): give "
                         "--base, without --targets/--save-targets/--save-offsets")
    base_config = checks.checkpoint_config(args.base, "--base") if args.base else None
    rlvr_config = checks.checkpoint_config(args.rlvr, "--rlvr")
    checks.check_pair_configs(base_config, rlvr_config, cfg)
    return cfg, targets, base_config, rlvr_config


def _config_from_targets(args, recorded):
    """--targets brings the configuration its base pass was made with; an
    explicit option that contradicts it is refused rather than overriding it."""
    given = {k: getattr(args, k) for k in ("layers",) if getattr(args, k) is not None}
    for key, value in given.items():
        if layer_list(recorded.get(key)) != layer_list(value):  # --layers 3 and 0,1,2 are the same layers
            raise UsageError(f"--{key} {value} conflicts with --targets {args.targets}, made with {key} = "
                             f"{recorded.get(key)!r}; drop --{key} or recompute the targets")
    return console.replay_config(args, **{k: v for k, v in recorded.items() if v is not None})


def run(args) -> int:
    import actreplay_ext as ar

    cfg, targets, base_config, rlvr_config = _run_checks(args)
    log.info("config: %s", _config_line(cfg))
    processor = data.load_processor(args.rlvr)
    row = data.Row(id="prompt", question=args.prompt, images=list(args.image or []), video=args.video)
    inputs = data.encode(processor, row)
    load = console.load_kwargs(args)
    if targets is not None and not torch.equal(targets.input_ids, inputs["input_ids"]):
        raise UsageError(f"--targets {args.targets} was made for another prompt (its input_ids differ from this "
                         "--prompt/--image/--video); recompute it with --save-targets")
    dtype = getattr(torch, str(load["dtype"]), None)
    if targets is not None and images_differ(targets.images, image_hashes(
            inputs, dtype if isinstance(dtype, torch.dtype) else torch.float32)):
        raise UsageError(f"--targets {args.targets} was made for other images or video (the same text and sizes, "
                         "other pixels); recompute it with --save-targets")
    t0 = time.perf_counter()
    log.info("loading the RLVR model from %s", args.rlvr)
    rlvr = data.load_model(args.rlvr, **load)
    inputs = {k: v.to(data.input_device(rlvr)) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    n_vis = int(ar.get_adapter(rlvr, "rlvr").visual_mask(inputs["input_ids"]).sum())
    log.info("prompt: %d tokens, %d visual", inputs["input_ids"].shape[1], n_vis)
    timings = {"load_rlvr_s": time.perf_counter() - t0}
    if cfg.mode == "direct":
        answers, result = _run_direct(args, rlvr, inputs, cfg, load, timings)
    else:
        answers, result = _run_tokens(args, rlvr, inputs, cfg, targets, load, timings)
    prompt_len = inputs["input_ids"].shape[1]
    texts = [data.decode_new(processor, a, prompt_len)[0] for a in answers]
    human = sys.stderr if args.json == console.STDOUT else sys.stdout  # --json -: stdout holds the JSON alone
    print(f"without replay:\n{texts[0]}\n\nwith replay:\n{texts[1]}\n", file=human)
    print(_summary(cfg, result, n_vis, texts), file=human)
    if args.json:
        with console.writing("--json", args.json):
            console.write_json(args.json, _run_record(args, cfg, result, n_vis, texts, timings,
                                                      {"base": base_config, "rlvr": rlvr_config}))
        log.info("wrote %s", args.json)
    return 0


def _generate(rlvr, inputs, args, desc):
    stop, bar = console.generation_progress(args.max_new_tokens, desc, args.quiet)
    t0 = time.perf_counter()
    out = rlvr.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, stopping_criteria=stop)
    bar.close()
    new = out.shape[1] - inputs["input_ids"].shape[1]
    seconds = time.perf_counter() - t0
    log.info("%s: %d tokens in %.2f s (%.1f tokens/s)", desc, new, seconds, new / max(seconds, 1e-9))
    return out, seconds


def _run_tokens(args, rlvr, inputs, cfg, targets, load, timings):
    import actreplay_ext as ar

    if targets is None:
        log.info("loading the base model from %s", args.base)
        t0 = time.perf_counter()
        base = data.load_model(args.base, **load)
        timings["load_base_s"] = time.perf_counter() - t0
        targets = ar.compute_targets(base, inputs, cfg)
        del base  # its targets are all the loop needs
        if args.save_targets:
            with console.writing("--save-targets", args.save_targets):
                targets.save(args.save_targets)
            log.info("saved the targets to %s", args.save_targets)
    bar = _progress_bar(cfg, args.quiet)
    result = ar.optimize(rlvr, inputs, targets, cfg)
    bar.close()
    timings.update({f"replay_{k}_s": v for k, v in result.timings.items()})
    if args.save_offsets:
        with console.writing("--save-offsets", args.save_offsets):
            result.save(args.save_offsets)
        log.info("saved the offsets to %s", args.save_offsets)
    plain, timings["generate_without_s"] = _generate(rlvr, inputs, args, "without replay")
    with ar.apply(rlvr, result):
        replayed, timings["generate_with_s"] = _generate(rlvr, inputs, args, "with replay")
    return (plain, replayed), result


def _run_direct(args, rlvr, inputs, cfg, load, timings):
    """Direct substitution (presets deepeyes-7b, video-r1-7b) needs the base
    model at the prefill; it learns nothing, so there is nothing to save."""
    import actreplay_ext as ar

    t0 = time.perf_counter()
    base = data.load_model(args.base, **load)
    timings["load_base_s"] = time.perf_counter() - t0
    plain, timings["generate_without_s"] = _generate(rlvr, inputs, args, "without replay")
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        replayed, timings["generate_with_s"] = _generate(rlvr, inputs, args, "with replay")
    return (plain, replayed), handle.last


def _config_line(cfg) -> str:
    return " ".join(f"{k}={v}" for k, v in provenance.config_dict(cfg).items())


def _summary(cfg, result, n_vis: int, texts) -> str:
    """One line: what the replay did and whether it changed the answer."""
    same = "the same answer" if texts[0] == texts[1] else "a different answer"
    if cfg.mode == "direct":
        selected = " ".join(map(str, _per_replay_layer(cfg, getattr(result, "selected", None)))) or "-"
        return (f"direct substitution at layers {_layers_text(cfg)} ({n_vis} visual tokens, substituted "
                f"{selected}): {same}")
    if result is None or not result.losses:
        return f"no replay ({getattr(result, 'note', '') or 'nothing to optimise'}): {same}"
    losses = result.losses
    if not any(result.selected):
        return (f"no-op replay: none of the {n_vis} visual tokens was selected in layers {_layers_text(cfg)} "
                f"(loss {losses[0]:.4g} throughout), so the offsets are zero: {same}")
    return (f"replay: {n_vis} visual tokens, selected {' '.join(map(str, _per_replay_layer(cfg, result.selected)))} "
            f"in layers {_layers_text(cfg)}; loss {console.loss_change(cfg, losses)} "
            f"({result.timings['loop']:.2f} s): {same}")


def _per_replay_layer(cfg, selected):
    """The counts of the replay layers only (`selected` has one per layer 0 .. depth-1)."""
    selected = list(selected or [])
    return [selected[l] for l in cfg.replay_layers if l < len(selected)]


def _layers_text(cfg) -> str:
    layers = list(cfg.replay_layers)
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ",".join(map(str, layers))


def _run_record(args, cfg, result, n_vis, texts, timings, configs):
    # a record of one run: where each checkpoint was and what it is, without hashing its weights
    models = {name: {**checks.checkpoint_location(path), **checks.checkpoint_identity(path, configs[name], False)}
              for name, path in (("base", args.base), ("rlvr", args.rlvr)) if path}
    record = {"prompt": {"text": args.prompt, "images": args.image or [], "video": args.video},
              "answers": {"without_replay": texts[0], "with_replay": texts[1]},
              "n_visual": n_vis, "config": provenance.config_dict(cfg), "models": models,
              "max_new_tokens": args.max_new_tokens, "timings": {k: round(v, 4) for k, v in timings.items()},
              "versions": provenance.versions()}
    if result is not None:
        record.update(losses=list(getattr(result, "losses", [])), selected=list(result.selected),
                      note=getattr(result, "note", ""))
    return record


def _progress_bar(cfg, quiet: bool):
    """A progress bar that the replay steps advance (through the config's callback)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc="replay", disable=quiet, leave=False)
    cfg.callback = lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4g}"))
    return bar


def analyze(args) -> int:
    from . import analysis

    checks.output_dir(args.out, "--out")
    if args.demo:
        from .. import tiny
        torch.manual_seed(0)
        base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
        processor = tiny.make_processor(rlvr)
        rows = data.synthetic_rows(6)
        names, title = ("tiny base", "tiny RLVR"), "embedded tiny pair (random weights), 6 synthetic prompts"
    else:
        missing = [n for n in ("base", "rlvr", "data") if getattr(args, n) is None]
        if missing:
            raise UsageError("without --demo, give " + ", ".join("--" + m for m in missing))
        rows = data.read_jsonl(args.data, check_files=True)
        configs = [checks.checkpoint_config(path, arg) for path, arg in ((args.base, "--base"), (args.rlvr, "--rlvr"))]
        checks.check_pair_configs(*configs)
        if args.layers is not None and args.layers > configs[1].get_text_config().num_hidden_layers:
            raise UsageError(f"--layers {args.layers} exceeds the model's "
                             f"{configs[1].get_text_config().num_hidden_layers} decoder layers")
        processor = data.load_processor(args.rlvr)
        load = console.load_kwargs(args)
        base, rlvr = data.load_model(args.base, **load), data.load_model(args.rlvr, **load)
        names, title = (_model_name(args.base), _model_name(args.rlvr)), ""
    if args.limit is not None:
        rows = rows[:args.limit]
    acc = analysis.Analysis(base_name=names[0], rlvr_name=names[1])
    skipped = 0
    for row in _iterate(rows, "prompts", args.quiet):
        stats = analysis.lens_kl(base, rlvr, data.encode(processor, row, data.input_device(rlvr)), args.layers)
        if stats:
            acc.add(stats)
        else:
            skipped += 1
    if not acc.prompts:
        raise UsageError("none of the prompts has visual tokens")
    if skipped:
        log.warning("%d prompt(s) without visual tokens were skipped", skipped)
    with console.writing("--out", args.out):
        paths = acc.write_csv(args.out) + analysis.plot(acc, args.out, title)
    print("layer  decile  entropy range     tokens  mean KL")
    for r in acc.deciles():
        if r["bucket"] in (1, 5, 10):
            print(f"{r['layer']:5d}  {r['bucket']:6d}  {r['entropy_lo']:6.3f}-{r['entropy_hi']:<6.3f}  "
                  f"{r['tokens']:7d}  {r['mean_kl']:.4g}")
    print("wrote " + ", ".join(paths))
    return 0


def _model_name(path: str) -> str:
    """A checkpoint's short name for titles and CSV columns: its last path component."""
    import os

    return os.path.basename(os.path.normpath(path)) or path


def _iterate(items, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=quiet, leave=False)


def _add_demo(sub, common) -> None:
    p = sub.add_parser("demo", help="replay on the embedded tiny pair and print what it did", parents=[common])
    p.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_5_vl", help="the tiny pair's family")
    p.add_argument("--layers", type=console.layers_arg, default=3,
                   help="replay layers: a count N (0..N-1) or a list like 0,2 (default 3 of the tiny model's 4)")
    p.add_argument("--steps", type=console.positive_int, default=10, help="optimisation steps (default 10)")
    p.add_argument("--lr", type=float, default=0.02,
                   help="step size (the published 10.0 is for real 7B models; random tiny ones need less)")
    p.add_argument("--seed", type=int, default=0, help="which built-in prompt")
    p.add_argument("--max-new-tokens", type=console.positive_int, default=8, help="answer length (default 8)")


def _add_run(sub, common) -> None:
    from ..config import PRESETS

    p = sub.add_parser("run", help="answer one prompt with your checkpoints, with and without replay", parents=[common],
                       description="Answer one prompt with a base/RLVR checkpoint pair, greedily, with and "
                                   "without Activation Replay. The processor comes from the RLVR checkpoint.")
    p.add_argument("--base", help="base model: a local checkpoint directory (or a hub id where the network allows)")
    p.add_argument("--rlvr", required=True, help="RLVR post-trained model: a local checkpoint directory or hub id")
    p.add_argument("--image", nargs="+", metavar="FILE", help="one or more images, in prompt order")
    p.add_argument("--video", metavar="FILE|DIR",
                   help="a video file (decoded with PyAV: the 'video' extra) or a directory of frame images")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--preset", default="mm-eureka-7b", choices=sorted(PRESETS), help="replay configuration")
    p.add_argument("--layers", type=console.layers_arg,
                   help="override the preset's replay layers: a count N (0..N-1) or a list like 0,2,4 "
                        "(direct presets: those layers' thresholds)")
    p.add_argument("--lr", type=float, help="override the preset's step size")
    p.add_argument("--steps", type=console.positive_int, help="override the preset's number of steps")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="the update rule: sgd (the published one, the presets') or lbfgs (opt-in, no per-model "
                        "step size; without --lr it takes its own default)")
    p.add_argument("--tol", type=float, help="stop early once the gradient norm is at most TOL x the first one")
    p.add_argument("--save-targets", metavar="F", help="save the base model's targets (safetensors) for reuse "
                                                        "(not with --targets)")
    p.add_argument("--targets", metavar="F",
                   help="use targets saved before instead of running the base model (their layers and selection "
                        "settings come with them)")
    p.add_argument("--save-offsets", metavar="F", help="save the learned offsets (safetensors, ReplayResult.save)")
    p.add_argument("--json", metavar="F",
                   help="write the answers, losses, selected counts, timings and resolved config as JSON "
                        "(-: to the standard output, and the answers to the standard error)")
    p.add_argument("--max-new-tokens", type=console.positive_int, default=1024, help="answer length (default 1024)")
    console.add_load_options(p)


def _add_analyze(sub, common) -> None:
    p = sub.add_parser("analyze", help="KL(base || RLVR) of the logit lens by base-entropy decile, CSV and PNG",
                       parents=[common],
                       description="Per layer, the KL(base || RLVR) of the logit lens at every visual token, "
                                   "bucketed by the base model's lens entropy (deciles); writes the CSV tables "
                                   "and the plots to --out.")
    p.add_argument("--base", help="base checkpoint")
    p.add_argument("--rlvr", help="RLVR checkpoint (its processor is used)")
    p.add_argument("--data", metavar="JSONL", help='prompts: {"question", "image"|"images"|"video"} per line')
    p.add_argument("--out", required=True, metavar="DIR", help="where the CSV and PNG files go")
    p.add_argument("--layers", type=console.positive_int, help="analyse layers 0..N-1 (default: all)")
    p.add_argument("--limit", type=console.positive_int, help="only the first N prompts (N >= 1)")
    p.add_argument("--demo", action="store_true", help="the embedded tiny pair and 6 synthetic prompts (no download)")
    console.add_load_options(p)


def build_parser() -> argparse.ArgumentParser:
    from . import ablate, passk

    parser = console.CommandParser(prog="actreplay", description=DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=console.version_line(),
                        help="the package, torch and transformers versions, and whether the CUDA kernels are built")
    console.add_logging_options(parser)
    # the logging options also after the command; SUPPRESS keeps the subcommand from resetting them
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    console.add_logging_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub, common)
    _add_run(sub, common)
    _add_analyze(sub, common)
    p = sub.add_parser("ablate", parents=[common], help="many replay configurations over many prompts, one table",
                       description=ablate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ablate.add_arguments(p)
    p = sub.add_parser("passk", parents=[common], help="Pass@K with and without replay (data-parallel under torchrun)",
                       description=passk.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    passk.add_arguments(p)
    for action in sub.choices.values():
        action.allow_abbrev = False  # "--n" must never silently mean "--max-new-tokens"
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from . import ablate, passk

    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"demo": demo, "run": run, "analyze": analyze, "ablate": ablate.ablate, "passk": passk.evaluate}
    if args.command not in commands:
        parser.print_help()
        return 2
    restore = console.setup_logging(args)
    try:
        return console.guarded(f"actreplay {args.command}", lambda: commands[args.command](args), args.verbose)
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
