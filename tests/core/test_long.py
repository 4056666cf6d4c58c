"""Long inputs in bounded memory: 16,384 visual tokens on CPU, and activation
checkpointing that changes memory, not results."""

import pytest
import torch
from helpers import replay

import actreplay_ext as ar
from actreplay_ext import tiny


def _kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_checkpointing_gives_the_same_offsets():
    base, rlvr = tiny.make_pair("qwen2_vl")
    inputs = tiny.make_inputs(base, images=[(8, 8)], video=(2, 4, 4))
    results = []
    for flag in (False, True):
        cfg = ar.ReplayConfig(layers=3, lr=1e-3, steps=5, checkpoint=flag)
        results.append(replay(base, rlvr, inputs, cfg))
    assert torch.allclose(results[0].deltas, results[1].deltas, rtol=0, atol=1e-7)
    assert results[0].losses == pytest.approx(results[1].losses, rel=1e-6)


def test_16k_visual_tokens_in_bounded_memory(capsys):
    base, rlvr = tiny.make_pair("qwen2_5_vl", attn_implementation="sdpa")
    inputs = tiny.make_inputs(base, images=[(8, 8)] * 1024)  # 1024 images x 16 tokens
    n_vis = int((inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum())
    assert n_vis == 16384
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak resident set here")
    cfg = ar.ReplayConfig(layers=3, lr=1e-3, steps=2)  # checkpoint="auto" engages at this length
    targets = ar.compute_targets(base, inputs, cfg)
    result = ar.optimize(rlvr, inputs, targets, cfg)
    peak_gib = _kib("VmHWM") / 2**20
    with capsys.disabled():
        print(f"\n[16,384 visual tokens] peak RSS {peak_gib:.2f} GiB, selected {result.selected}, "
              f"losses {[round(x, 5) for x in result.losses]}, loop {result.timings['loop']:.1f} s")
    assert result.deltas.shape == (16384, 64) and sum(result.selected) > 0
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert peak_gib < 4.0
