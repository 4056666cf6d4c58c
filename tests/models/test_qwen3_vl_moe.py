"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`: Qwen3-VL with
mixture-of-experts decoder layers; the same layout and deepstack features) on a
tiny random pair: parity with the published loop, and patch()ed generate equal
to optimize, on transformers 4.57.x and 5.x."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.models.qwen3_vl import Qwen3VLAdapter
from helpers import assert_matches_published, replay, replay_and_published

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLMoeForConditionalGeneration"):
    pytest.skip("this transformers has no Qwen3-VL-MoE", allow_module_level=True)

from test_qwen3_vl import LR, NOISE, SHARPEN, config, make_inputs, n_tokens  # noqa: E402


def make_model(seed=0, sharpen=SHARPEN):
    torch.manual_seed(seed)
    cfg = config(transformers.Qwen3VLMoeConfig, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                 decoder_sparse_step=1)
    return tiny.build(transformers.Qwen3VLMoeForConditionalGeneration, cfg, sharpen)


@pytest.fixture(scope="module")
def pair():
    base = make_model()
    return base, tiny.perturbed_copy(base, NOISE, seed=1234)


def test_adapter_and_experts(pair):
    base, _ = pair
    assert isinstance(ar.get_adapter(base), Qwen3VLAdapter)
    assert "Qwen3VLMoeForConditionalGeneration" in ar.supported_families()
    assert "moe" in type(base.model.language_model.layers[0].mlp).__name__.lower()  # the layers really are MoE


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_optimize_matches_published_loop(pair, alignment):
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=12, alignment=alignment)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert_matches_published(result, pub, n_visual=n_tokens(), hidden=64, steps=12)


def test_patch_generate_equals_optimize(pair):
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=6)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        patched = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    result = replay(base, rlvr, inputs, cfg)
    assert torch.allclose(handle.last.deltas, result.deltas, rtol=0, atol=1e-6)
    with ar.apply(rlvr, result):
        applied = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(patched, applied)
