"""ReplayConfig(compile=True): the loop's evaluations through torch.compile give
the eager offsets to float32 rounding, on prompts of two sizes (dynamic
shapes), with checkpointing too; sgd and lbfgs alike."""

import dataclasses

import pytest
from helpers import replay

import actreplay_ext as ar
from actreplay_ext import tiny

pytest.importorskip("torch._inductor", reason="torch.compile needs inductor")
import transformers

# About 90 s of compilation on 2 cores: run once per CI, under transformers 5 (the compiled code is torch's).
pytestmark = pytest.mark.skipif(transformers.__version__.startswith("4."),
                                reason="compiled once per CI run, under transformers 5")


def test_compiled_loop_equals_eager():
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    eager = ar.ReplayConfig(layers=3, lr=1e-3, steps=4)
    for i, (cfg, images) in enumerate([(eager, [(8, 8)]), (eager, [(8, 12)]),
                                       (dataclasses.replace(eager, checkpoint=True), [(12, 8)]),
                                       (ar.ReplayConfig(layers=3, optimizer="lbfgs", steps=4), [(8, 8)])]):
        inputs = tiny.make_inputs(base, images=images, seed=i)
        a = replay(base, rlvr, inputs, cfg)
        b = replay(base, rlvr, inputs, dataclasses.replace(cfg, compile=True))
        assert b.config["compile"] is True and float(a.deltas.abs().max()) > 0
        assert float((a.deltas - b.deltas).abs().max() / a.deltas.abs().max()) <= 1e-5, (i, images)
        assert b.losses == pytest.approx(a.losses, rel=1e-5)


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="'compile' must be True or False"):
        ar.ReplayConfig(compile="yes")
