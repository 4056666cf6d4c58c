"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`: Qwen3-VL with
mixture-of-experts decoder layers; the same layout and deepstack features) on a
tiny random pair: parity with the published loop, and patch()ed generate equal
to optimize, on transformers 4.57.x and 5.x."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from actreplay_ext.qwen3_vl import Qwen3VLAdapter
from conftest import assert_matches_published

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLMoeForConditionalGeneration"):
    pytest.skip("this transformers has no Qwen3-VL-MoE", allow_module_level=True)

from test_qwen3_vl import (BOS_ID, DEEPSTACK_FROM, END_ID, EOS_ID, IMAGE_ID, LR, MERGE, NOISE, PAD_ID,  # noqa: E402
                           PATCH, SHARPEN, START_ID, TEMPORAL, VIDEO_ID, make_inputs, n_tokens)


def make_model(seed=0, sharpen=SHARPEN):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3VLMoeConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_theta=10000.0,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                           out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=DEEPSTACK_FROM),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
        vision_end_token_id=END_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model = transformers.Qwen3VLMoeForConditionalGeneration._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32)
    return tiny.finish(model, sharpen)


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
    result = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    pub = reference.published_replay(rlvr, base, inputs, cfg)
    assert_matches_published(result, pub, n_visual=n_tokens(), hidden=64, steps=12)


def test_patch_generate_equals_optimize(pair):
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=6)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        patched = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    result = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    assert torch.allclose(handle.last.deltas, result.deltas, rtol=0, atol=1e-6)
    with ar.apply(rlvr, result):
        applied = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(patched, applied)
