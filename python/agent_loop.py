"""An agent-style multi-turn loop with Activation Replay (the DeepEyes pattern):
each turn appends the model's answer and a new image crop to the conversation,
and the next `generate` is a new multimodal prefill, so the replay runs again
on the whole grown prompt. `handle.reset()` starts a new conversation.

    python python/agent_loop.py            # the embedded tiny pair, no download
    python python/agent_loop.py --direct   # the published agent variant (direct substitution)

With real checkpoints the loop is the same; the prompt of each turn comes from
the processor's chat template with the conversation so far.
"""

from __future__ import annotations

import argparse
import sys

import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.tools import console


def add_image(prompt, answer_ids, grid, seed):
    """The conversation so far + the model's answer + a new image (a 'tool crop')."""
    crop = tiny.make_inputs(prompt["model"], images=[grid], text_len=4, seed=seed)
    ids = torch.cat([prompt["input_ids"], answer_ids, crop["input_ids"]], dim=1)
    out = {"model": prompt["model"], "input_ids": ids, "attention_mask": torch.ones_like(ids),
           "pixel_values": torch.cat([prompt["pixel_values"], crop["pixel_values"]]),
           "image_grid_thw": torch.cat([prompt["image_grid_thw"], crop["image_grid_thw"]])}
    if "mm_token_type_ids" in crop:
        mm = torch.zeros_like(ids, dtype=torch.int32)
        mm[ids == tiny.IMAGE_TOKEN_ID] = 1
        out["mm_token_type_ids"] = mm
    return out


def model_inputs(prompt):
    return {k: v for k, v in prompt.items() if k != "model"}


def main(argv=None) -> int:
    p = console.CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=console.positive_int, default=3, help="conversation turns (default 3)")
    p.add_argument("--direct", action="store_true", help="direct substitution instead of learned offsets")
    args = p.parse_args(argv)
    base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
    cfg = (ar.ReplayConfig(mode="direct", thresholds=[2.5, 2.5, 2.5]) if args.direct
           else ar.ReplayConfig(layers=3, lr=0.02, steps=8))
    prompt = dict(model=rlvr, **tiny.make_inputs(rlvr, images=[(8, 8)], seed=0))
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        for turn in range(args.turns):
            out = rlvr.generate(**model_inputs(prompt), max_new_tokens=4, do_sample=False)
            answer = out[:, prompt["input_ids"].shape[1]:]
            last = handle.last
            loss = f"loss {last.losses[0]:.3g} -> {last.losses[-1]:.3g}" if last.losses else last.note
            print(f"turn {turn}: {prompt['input_ids'].shape[1]} tokens, {sum(last.n_visual)} visual, "
                  f"selected per layer {last.selected}, {loss}, answer {answer[0].tolist()}")
            prompt = add_image(prompt, answer, (4, 8), seed=turn + 1)
        handle.reset()  # a new conversation starts from a clean handle
    return 0


if __name__ == "__main__":
    sys.exit(main())
