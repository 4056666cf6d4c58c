"""The replay engine and patch() on a tiny random LLaVA-1.5 style pair
(CLIP vision tower, Llama text model): parity with the published loop, and
patch()ed generate equal to optimize, on transformers 4.57.x and 5.x."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.models.llava import LlavaAdapter
from helpers import assert_matches_published, replay, replay_and_published

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN_ID, BOS_ID, EOS_ID, PAD_ID = 990, 1, 2, 0
IMAGE_SIZE, PATCH = 56, 14
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # "default" strategy drops the CLS token
LR = 1e-3
SHARPEN = 45.0  # the ratio rule then selects real subsets (about 10 of the 32 visual tokens per layer)
NOISE = 0.3  # enough drift that the matched-alignment loss is not a float32 cancellation


def make_model(seed=0, sharpen=SHARPEN):
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
                           patch_size=PATCH, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        image_token_index=IMAGE_TOKEN_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return tiny.build(transformers.LlavaForConditionalGeneration, cfg, sharpen)


@pytest.fixture(scope="module")
def pair():
    base = make_model()
    return base, tiny.perturbed_copy(base, NOISE, seed=1234)


def make_inputs(n_images=2, text_len=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(3, 900, (text_len // 2,), generator=g).tolist()
    for _ in range(n_images):
        ids += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + torch.randint(3, 900, (2,), generator=g).tolist()
    ids += torch.randint(3, 900, (text_len - text_len // 2,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)}


def hooks_of(model):
    mods = [model, model.model.vision_tower, *model.model.language_model.layers]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


def test_adapter_locates_the_parts(pair):
    base, _ = pair
    ad = ar.get_adapter(base)
    assert isinstance(ad, LlavaAdapter)
    assert "LlavaForConditionalGeneration" in ar.supported_families()
    assert ad.decoder_layers() is base.model.language_model.layers and ad.num_layers == 4
    assert ad.final_norm() is base.model.language_model.norm and ad.norm_eps() == pytest.approx(1e-6)
    assert ad.unembed() is base.lm_head.weight and ad.vocab_size == 1000 and ad.hidden_size == 64
    assert ad.vision_tower() is base.model.vision_tower
    assert ad.visual_token_ids() == [IMAGE_TOKEN_ID] and ad.image_tokens() == TOKENS_PER_IMAGE


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_optimize_matches_published_loop(pair, alignment):
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15, alignment=alignment)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)

    assert_matches_published(result, pub, n_visual=2 * TOKENS_PER_IMAGE, hidden=64, steps=15)


def test_patch_generate_equals_optimize(pair):
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15)
    before = hooks_of(rlvr)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        assert hooks_of(rlvr) > before
        rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
        last = handle.last
    assert hooks_of(rlvr) == before  # no hooks remain
    result = replay(base, rlvr, inputs, cfg)
    assert last is not None and last.replayed
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)
    assert last.losses == pytest.approx(result.losses, rel=1e-6)


@pytest.mark.parametrize("n_images", [1, 2])
def test_patch_with_num_return_sequences(pair, n_images):
    """transformers 5.x generate encodes each image once and repeats the encoded
    images for the repeated prompt rows; the base prompt must get the pixels in
    the order the RLVR rows saw them (5.18 gives a two-image prompt's rows the
    images [a, a] and [b, b]), else the rows of the two prefills disagree."""
    base, rlvr = pair
    inputs = make_inputs(n_images=n_images)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5)
    torch.manual_seed(0)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        last = handle.last
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert list(last.n_visual) == [n_images * TOKENS_PER_IMAGE] * 2
    if n_images == 1:  # the rows are the prompt twice in every version
        rows = {"input_ids": inputs["input_ids"].repeat(2, 1), "attention_mask": inputs["attention_mask"].repeat(2, 1),
                "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)}
        result = ar.optimize(rlvr, rows, ar.compute_targets(base, rows, cfg), cfg)
        for ours, theirs in zip(last.deltas, result.deltas):
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
