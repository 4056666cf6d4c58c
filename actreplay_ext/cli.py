"""The `actreplay` command (also `python -m actreplay_ext`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import List, Optional

import torch

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

`actreplay COMMAND --help` describes each command's options. Pass@K
evaluation (data-parallel under torchrun) is `python python/eval_passk.py`.
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
          f"lr={cfg.lr} steps={cfg.steps} alignment={cfg.alignment}\n")
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


def _config(args):
    """The preset with the command line's overrides."""
    import actreplay_ext as ar

    overrides = {k: getattr(args, k) for k in ("layers", "lr", "steps") if getattr(args, k) is not None}
    thresholds = ar.PRESETS[args.preset].get("thresholds")
    if thresholds is not None and "layers" in overrides:  # direct presets: one threshold per layer
        overrides["thresholds"] = list(thresholds)[:overrides["layers"]]
    return ar.ReplayConfig.preset(args.preset, **overrides)


def _progress_bar(cfg, quiet: bool):
    """A progress bar that the replay steps advance (through the config's callback)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc="replay", disable=quiet, leave=False)
    cfg.callback = lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4g}"))
    return bar


def _load_options(p):
    p.add_argument("--dtype", default=None,
                   help="torch dtype of the weights (default: bfloat16 on a GPU, else float32)")
    p.add_argument("--device-map", default=None,
                   help='where the weights go (default: "auto" with a GPU, else the CPU); any accelerate device_map')
    p.add_argument("--attn", default="sdpa", help="attention implementation: eager, sdpa or flash_attention_2")


def _load_kwargs(args):
    gpu = torch.cuda.is_available()
    return dict(dtype=args.dtype or ("bfloat16" if gpu else "float32"),
                device_map=args.device_map or ("auto" if gpu else None), attn=args.attn)


def run(args) -> int:
    import actreplay_ext as ar
    from actreplay_ext import data

    if args.base is None and args.targets is None:
        raise SystemExit("actreplay run: give --base (the base checkpoint) or --targets (targets saved before)")
    load = _load_kwargs(args)
    log.info("loading the RLVR model and processor from %s", args.rlvr)
    rlvr = data.load_model(args.rlvr, **load)
    processor = data.load_processor(args.rlvr)
    row = data.Row(id="prompt", question=args.prompt, images=list(args.image or []), video=args.video)
    inputs = data.encode(processor, row, data.input_device(rlvr))
    prompt_len = inputs["input_ids"].shape[1]
    n_vis = int(ar.get_adapter(rlvr, "rlvr").visual_mask(inputs["input_ids"]).sum())
    log.info("prompt: %d tokens, %d visual", prompt_len, n_vis)
    cfg = _config(args)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    if cfg.mode == "direct":
        return _run_direct(args, rlvr, processor, inputs, cfg, load)
    if args.targets:
        targets = ar.ReplayTargets.load(args.targets)
    else:
        log.info("loading the base model from %s", args.base)
        base = data.load_model(args.base, **load)
        targets = ar.compute_targets(base, inputs, cfg)
        del base  # its targets are all the loop needs
        if args.save_targets:
            targets.save(args.save_targets)
            log.info("saved the targets to %s", args.save_targets)
    bar = _progress_bar(cfg, args.quiet)
    result = ar.optimize(rlvr, inputs, targets, cfg)
    bar.close()
    plain = rlvr.generate(**inputs, **gen)
    with ar.apply(rlvr, result):
        replayed = rlvr.generate(**inputs, **gen)
    losses = result.losses
    print(f"visual tokens: {n_vis}; selected per layer: {' '.join(map(str, result.selected)) or '-'}")
    if losses:
        print(f"loss: {losses[0]:.6g} -> {losses[-1]:.6g} over {len(losses)} steps ({result.timings['loop']:.2f} s)")
    else:
        print(f"no replay: {result.note}")
    print(f"\nwithout replay:\n{data.decode_new(processor, plain, prompt_len)[0]}")
    print(f"\nwith replay:\n{data.decode_new(processor, replayed, prompt_len)[0]}")
    return 0


def _run_direct(args, rlvr, processor, inputs, cfg, load) -> int:
    """Direct substitution (presets deepeyes-7b, video-r1-7b) needs the base
    model at the prefill; it learns nothing, so there are no targets to save."""
    import actreplay_ext as ar
    from actreplay_ext import data

    if args.base is None or args.targets or args.save_targets:
        raise SystemExit(f"actreplay run: preset {args.preset!r} substitutes base activations directly; give "
                         "--base, without --targets/--save-targets")
    base = data.load_model(args.base, **load)
    prompt_len = inputs["input_ids"].shape[1]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    plain = rlvr.generate(**inputs, **gen)
    with ar.patch(rlvr, base=base, config=cfg):
        replayed = rlvr.generate(**inputs, **gen)
    print(f"direct substitution at layers 0..{cfg.layers - 1}")
    print(f"\nwithout replay:\n{data.decode_new(processor, plain, prompt_len)[0]}")
    print(f"\nwith replay:\n{data.decode_new(processor, replayed, prompt_len)[0]}")
    return 0


def analyze(args) -> int:
    from actreplay_ext import analysis, data

    if args.demo:
        from actreplay_ext import tiny

        torch.manual_seed(0)
        base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
        processor = tiny.make_processor(rlvr)
        rows = data.synthetic_rows(6)
        title = "embedded tiny pair (random weights), 6 synthetic prompts"
    else:
        missing = [n for n in ("base", "rlvr", "data") if getattr(args, n) is None]
        if missing:
            raise SystemExit("actreplay analyze: without --demo, give " + ", ".join("--" + m for m in missing))
        load = _load_kwargs(args)
        base, rlvr = data.load_model(args.base, **load), data.load_model(args.rlvr, **load)
        processor = data.load_processor(args.rlvr)
        rows = data.read_jsonl(args.data)
        title = ""
    if args.limit:
        rows = rows[:args.limit]
    acc = analysis.Analysis()
    skipped = 0
    for row in _iterate(rows, "prompts", args.quiet):
        stats = analysis.lens_kl(base, rlvr, data.encode(processor, row, data.input_device(rlvr)), args.layers)
        if stats:
            acc.add(stats)
        else:
            skipped += 1
    if not acc.prompts:
        raise SystemExit("actreplay analyze: none of the prompts has visual tokens")
    if skipped:
        log.warning("%d prompt(s) without visual tokens were skipped", skipped)
    paths = acc.write_csv(args.out) + analysis.plot(acc, args.out, title)
    print("layer  decile  entropy range     tokens  mean KL")
    for r in acc.deciles():
        if r["bucket"] in (1, 5, 10):
            print(f"{r['layer']:5d}  {r['bucket']:6d}  {r['entropy_lo']:6.3f}-{r['entropy_hi']:<6.3f}  "
                  f"{r['tokens']:7d}  {r['mean_kl']:.4g}")
    print("wrote " + ", ".join(paths))
    return 0


def _iterate(items, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=quiet, leave=False)


def main(argv: Optional[List[str]] = None) -> int:
    from actreplay_ext.config import PRESETS

    parser = argparse.ArgumentParser(prog="actreplay", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="no progress bars; only warnings and errors in the log")
    # --quiet also after the command; SUPPRESS keeps the subcommand from resetting it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="replay on the embedded tiny pair and print what it did", parents=[common])
    p.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_5_vl")
    p.add_argument("--layers", type=int, default=3, help="replay layers (default 3 of the tiny model's 4)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.02,
                   help="step size (the published 10.0 is for real 7B models; random tiny ones need less)")
    p.add_argument("--seed", type=int, default=0, help="which built-in prompt")
    p.add_argument("--max-new-tokens", type=int, default=8)

    p = sub.add_parser("run", help="answer one prompt with your checkpoints, with and without replay", parents=[common],
                       description="Answer one prompt with a base/RLVR checkpoint pair, greedily, with and "
                                   "without Activation Replay. The processor comes from the RLVR checkpoint.")
    p.add_argument("--base", help="base model: a local checkpoint directory (or a hub id where the network allows)")
    p.add_argument("--rlvr", required=True, help="RLVR post-trained model: a local checkpoint directory or hub id")
    p.add_argument("--image", nargs="+", metavar="FILE", help="one or more images, in prompt order")
    p.add_argument("--video", metavar="FILE|DIR",
                   help="a video file (needs PyAV or torchcodec) or a directory of frames")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--preset", default="mm-eureka-7b", choices=sorted(PRESETS), help="replay configuration")
    p.add_argument("--layers", type=int, help="override the preset's replay layers (direct presets: the first N "
                                             "thresholds)")
    p.add_argument("--lr", type=float, help="override the preset's step size")
    p.add_argument("--steps", type=int, help="override the preset's number of steps")
    p.add_argument("--save-targets", metavar="F", help="save the base model's targets (safetensors) for reuse")
    p.add_argument("--targets", metavar="F", help="use targets saved before instead of running the base model")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    _load_options(p)

    p = sub.add_parser("analyze", help="KL(base || RLVR) of the logit lens by base-entropy decile, CSV and PNG",
                       parents=[common],
                       description="Per layer, the KL(base || RLVR) of the logit lens at every visual token, "
                                   "bucketed by the base model's lens entropy (deciles); writes "
                                   "kl_by_entropy_decile.csv/.png and entropy_histogram.csv/.png to --out.")
    p.add_argument("--base", help="base checkpoint")
    p.add_argument("--rlvr", help="RLVR checkpoint (its processor is used)")
    p.add_argument("--data", metavar="JSONL", help='prompts: {"question", "image"|"images"|"video"} per line')
    p.add_argument("--out", required=True, metavar="DIR", help="where the CSV and PNG files go")
    p.add_argument("--layers", type=int, help="analyse layers 0..N-1 (default: all)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--demo", action="store_true", help="the embedded tiny pair and 6 synthetic prompts (no download)")
    _load_options(p)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    commands = {"demo": demo, "run": run, "analyze": analyze}
    if args.command not in commands:
        parser.print_help()
        return 2
    try:
        return commands[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        # Bad input (mismatched models, a configuration beyond the model, a missing
        # file) is the user's to fix: one line, not a traceback.
        print(f"actreplay {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
