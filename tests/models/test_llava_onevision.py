"""The replay engine and patch() on a tiny random LLaVA-OneVision pair (SigLIP
vision tower, anyres tiling, Qwen2 text model): parity with the published loop,
patch()ed generate equal to optimize, and the base model's images rebuilt from
what transformers 5.x `generate` hands the forward, on 4.57.x and 5.x."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.models.llava_onevision import LlavaOnevisionAdapter
from helpers import assert_matches_published, LayerBatchSizes, replay, replay_and_published

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, BOS_ID, EOS_ID, PAD_ID = 990, 991, 1, 2, 0
TILE, PATCH = 32, 8  # 4 x 4 = 16 tokens per tile
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
# (H, W) -> tiles, tokens. (16, 64): pinpoint 32x64 (2 tiles + base), 4 x 8 grid cut to 2 x 8 rows,
# 16 + 2 * (8 + 1) = 34. (64, 40): pinpoint 64x64 (4 tiles + base), 8 x 8 grid cut to 8 x 6, shrunk
# (anyres_max_1) to 4 x 3: 16 + 4 * (3 + 1) = 32.
# (48, 32): pinpoint 64x32 (2 tiles + base), 8 x 4 grid cut to 6 x 4, shrunk to 4 x 3: also 32 tokens, so
# from its features alone it could be either tiling (3 or 5 tiles).
IMAGES = {(16, 64): (3, 34), (64, 40): (5, 32), (48, 32): (3, 32)}
MAX_TILES = 5
LR = 1e-3
SHARPEN = 45.0
NOISE = 0.3


def make_model(seed=0, sharpen=SHARPEN):
    torch.manual_seed(seed)
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=TILE, patch_size=PATCH,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=10000.0, max_position_embeddings=2048, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1", image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return tiny.build(transformers.LlavaOnevisionForConditionalGeneration, cfg, sharpen)


@pytest.fixture(scope="module")
def pair():
    base = make_model()
    return base, tiny.perturbed_copy(base, NOISE, seed=1234)


def make_inputs(sizes=((16, 64), (64, 40)), text_len=12, seed=0, frames=0):
    """Text, each image's placeholders (count from IMAGES), text, an optional
    video of `frames` frames, text; pixel_values [n_images, MAX_TILES, 3, 32, 32]
    with the unused tiles zero, as the processor pads them."""
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(3, 900, (text_len // 2,), generator=g).tolist()
    for size in sizes:
        ids += [IMAGE_TOKEN_ID] * IMAGES[tuple(size)][1] + torch.randint(3, 900, (2,), generator=g).tolist()
    if frames:
        ids += [VIDEO_TOKEN_ID] * (frames * 4 + 1) + torch.randint(3, 900, (2,), generator=g).tolist()
    ids += torch.randint(3, 900, (text_len - text_len // 2,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if sizes:
        pixels = torch.zeros(len(sizes), MAX_TILES, 3, TILE, TILE)
        for i, size in enumerate(sizes):
            n = IMAGES[tuple(size)][0]
            pixels[i, :n] = torch.randn(n, 3, TILE, TILE, generator=g)
        out["pixel_values"] = pixels
        out["image_sizes"] = torch.tensor([list(s) for s in sizes])
    if frames:
        out["pixel_values_videos"] = torch.randn(1, frames, 3, TILE, TILE, generator=g)
    return out


def n_visual(inputs):
    return int(torch.isin(inputs["input_ids"], torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])).sum())


def hooks_of(model):
    mods = [model, model.model.vision_tower, *model.model.language_model.layers]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


class FirstLayer0Input:
    """The input of decoder layer 0 at its first call (the prefill the model is given)."""

    def __init__(self, model):
        self.hidden = None
        self._hook = model.model.language_model.layers[0].register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, mod, args, kwargs):
        if self.hidden is None:
            self.hidden = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        return False


def test_adapter_locates_the_parts(pair):
    base, _ = pair
    ad = ar.get_adapter(base)
    assert isinstance(ad, LlavaOnevisionAdapter)
    assert "LlavaOnevisionForConditionalGeneration" in ar.supported_families()
    assert ad.decoder_layers() is base.model.language_model.layers and ad.num_layers == 4
    assert ad.final_norm() is base.model.language_model.norm and ad.norm_eps() == pytest.approx(1e-6)
    assert ad.unembed() is base.lm_head.weight and ad.vocab_size == 1000 and ad.hidden_size == 64
    assert ad.vision_tower() is base.model.vision_tower
    assert ad.visual_token_ids() == [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]


def test_token_counts_match_the_model(pair):
    base, _ = pair
    ad = ar.get_adapter(base)
    sizes = [[16, 64], [64, 40], [30, 60], [64, 64], [20, 20], [48, 32]]
    pixels = torch.randn(len(sizes), MAX_TILES, 3, TILE, TILE)
    with torch.no_grad():
        out = base.model.get_image_features(pixels, torch.tensor(sizes))
        two = base.model.get_image_features(pixels[:2], torch.tensor(sizes[:2]), batch_num_images=torch.tensor([2]))
        video = base.model.get_video_features(torch.randn(1, 3, 3, TILE, TILE), vision_feature_layer=-1,
                                              vision_feature_select_strategy="full")
    model_counts = [f.shape[0] for f in getattr(out, "pooler_output", out)]
    assert ad.image_token_counts(sizes) == model_counts
    assert [model_counts[0], model_counts[1], model_counts[5]] == [IMAGES[(16, 64)][1], IMAGES[(64, 40)][1],
                                                                    IMAGES[(48, 32)][1]]
    assert ad.image_token_counts(sizes[:2], batch_num_images=[2]) == [f.shape[0] for f in getattr(two, "pooler_output", two)] == [17, 17]
    video = getattr(video, "pooler_output", video)
    # 4.57 appends the video's newline in the forward, 5.x in get_video_features
    assert ad.video_token_count(3) in (video.shape[1], video.shape[1] + 1) and ad.video_token_count(3) == 13
    with pytest.raises(ValueError, match="batch_num_images"):
        ad.image_token_counts(sizes[:2], batch_num_images=[3])


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_optimize_matches_published_loop(pair, alignment):
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15, alignment=alignment)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)

    assert_matches_published(result, pub, n_visual=n_visual(inputs), hidden=64, steps=15)


def test_patch_generate_equals_optimize(pair):
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15)
    before = hooks_of(rlvr)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        assert hooks_of(rlvr) > before
        patched = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
        last = handle.last
    assert hooks_of(rlvr) == before  # no hooks remain
    result = replay(base, rlvr, inputs, cfg)
    assert last is not None and last.replayed
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)
    assert last.losses == pytest.approx(result.losses, rel=1e-6)
    with ar.apply(rlvr, result):
        applied = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(patched, applied)


@pytest.mark.parametrize("sizes", [((64, 40),), ((16, 64), (64, 40))])
def test_patch_with_num_return_sequences(pair, sizes):
    """Pass@K: the base model's prefill gets the images the RLVR rows got (the
    two models share vision tower and embeddings, so their layer-0 inputs are
    equal), and one prompt repeated K times is optimised once. transformers 5.18
    gives a two-image prompt's rows the images [a, a] and [b, b]: those rows
    differ, so they are optimised as two."""
    base, rlvr = pair
    inputs = make_inputs(sizes=sizes)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5)
    torch.manual_seed(0)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base) as seen_base, \
            LayerBatchSizes(rlvr.model.language_model.layers[1]) as calls, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        last = handle.last
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert list(last.n_visual) == [n_visual(inputs)] * 2
    assert seen_base.hidden.shape == seen_rlvr.hidden.shape and seen_rlvr.hidden.shape[0] == 2
    assert torch.equal(seen_base.hidden, seen_rlvr.hidden)
    if len(sizes) == 1:  # the rows are the prompt twice in every version
        assert last.optimized_rows == 1 and calls.sizes.count(1) == cfg.steps
        rows = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
        result = ar.optimize(rlvr, rows, ar.compute_targets(base, rows, cfg), cfg)
        for ours, theirs in zip(last.deltas, result.deltas):
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_two_images_rebuilt_for_the_base(pair):
    """The base model's prompt rebuilt from a prefill: on 5.x from the recorded
    tiles and the encoded features (image sizes inferred), on 4.57 the forward's
    own inputs. Either way the base encodes the images as the RLVR model did."""
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=2)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg):
        rlvr.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert torch.equal(seen_base.hidden, seen_rlvr.hidden)


def test_video_prompt(pair):
    """A prompt with an image and a video: parity with the published loop, and
    patch()ed generate equal to optimize."""
    base, rlvr = pair
    inputs = make_inputs(sizes=((64, 40),), frames=3)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=8)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert_matches_published(result, pub, n_visual=n_visual(inputs), hidden=64, steps=8)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=False)
        last = handle.last
    assert torch.equal(seen_base.hidden, seen_rlvr.hidden)
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)


def test_video_with_num_return_sequences(pair):
    base, rlvr = pair
    inputs = make_inputs(sizes=(), frames=2)
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=3)
    torch.manual_seed(0)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        last = handle.last
    assert last.replayed and last.optimized_rows == 1
    assert torch.equal(seen_base.hidden, seen_rlvr.hidden)


def test_ambiguous_tilings_are_settled_by_value(pair):
    """Images of 3 and 5 tiles whose features have the same 4 x 3 grid: the tile
    count alone (8) allows 3 + 5 and 5 + 3; encoding the candidates settles it."""
    base, rlvr = pair
    ad = ar.get_adapter(rlvr)
    assert sorted(n for n, _ in ad._sizes_for(4, 3)) == [3, 5]
    inputs = make_inputs(sizes=((48, 32), (64, 40)))
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=2)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert handle.last is not None and handle.last.replayed
    assert torch.equal(seen_base.hidden, seen_rlvr.hidden)


def test_precomputed_features_are_refused(pair):
    """5.x: encoded images without the vision tower's recorded inputs cannot be
    given to the base model; say so."""
    _, rlvr = pair
    ad = ar.get_adapter(rlvr)
    inputs = make_inputs()
    with torch.no_grad():
        enc = rlvr.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    if not hasattr(enc, "pooler_output"):
        pytest.skip("transformers 4.57 generate passes the pixels to the forward")
    with pytest.raises(RuntimeError, match="pixel_values"):
        ad.prompt_from_forward({"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": enc}}, [])
