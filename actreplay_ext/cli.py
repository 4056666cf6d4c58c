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
"""


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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="actreplay", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="replay on the embedded tiny pair and print what it did")
    p.add_argument("--family", choices=["qwen2_vl", "qwen2_5_vl"], default="qwen2_5_vl")
    p.add_argument("--layers", type=int, default=3, help="replay layers (default 3 of the tiny model's 4)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.02,
                   help="step size (the published 10.0 is for real 7B models; random tiny ones need less)")
    p.add_argument("--seed", type=int, default=0, help="which built-in prompt")
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.command == "demo":
        return demo(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
