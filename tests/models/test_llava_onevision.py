"""LLaVA-OneVision (SigLIP vision tower, anyres tiling, Qwen2 text model) beyond
what every family must satisfy (tests/models/test_families.py): the adapter's
token counts against the model's, the base model's images rebuilt from what
transformers 5.x `generate` hands the forward (two images, ambiguous tilings,
videos, Pass@K), on 4.57.x and 5.x."""

import pytest
import torch
from helpers import FirstLayer0Input, assert_matches_published, base_saw, replay_and_published

import actreplay_ext as ar
from actreplay_ext import tiny

transformers = pytest.importorskip("transformers")

FAM = tiny.FAMILIES_TINY["llava_onevision"]
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = tiny.OV_IMAGE_TOKEN_ID, tiny.OV_VIDEO_TOKEN_ID
TILE, MAX_TILES, IMAGES = tiny.OV_TILE, tiny.OV_MAX_TILES, tiny.OV_IMAGES
LR = FAM.lr


@pytest.fixture(scope="module")
def pair():
    return FAM.pair()


def make_inputs(**kw):
    return tiny.llava_onevision_inputs(None, **kw)


def n_visual(inputs):
    return int(torch.isin(inputs["input_ids"], torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])).sum())


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
    two_counts = [f.shape[0] for f in getattr(two, "pooler_output", two)]
    assert ad.image_token_counts(sizes[:2], batch_num_images=[2]) == two_counts == [17, 17]
    video = getattr(video, "pooler_output", video)
    # 4.57 appends the video's newline in the forward, 5.x in get_video_features
    assert ad.video_token_count(3) in (video.shape[1], video.shape[1] + 1) and ad.video_token_count(3) == 13
    with pytest.raises(ValueError, match="batch_num_images"):
        ad.image_token_counts(sizes[:2], batch_num_images=[3])


def test_patch_with_num_return_sequences_two_images(pair):
    """Pass@K: the base model's prefill gets the images the RLVR rows got (the
    two models share vision tower and embeddings, so their layer-0 inputs are
    equal). transformers 5.18 gives a two-image prompt's rows the images [a, a]
    and [b, b]: those rows differ, so they are optimised as two. (One image,
    optimised once: test_families.py::test_pass_at_k_optimises_once.)"""
    base, rlvr = pair
    sizes = ((16, 64), (64, 40))
    inputs = make_inputs(sizes=sizes)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5)
    torch.manual_seed(0)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base, internal=True) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        last = handle.last
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert list(last.n_visual) == [n_visual(inputs)] * 2
    assert seen_rlvr.hidden.shape[0] == 2
    assert base_saw(seen_base, seen_rlvr)


def test_two_images_rebuilt_for_the_base(pair):
    """The base model's prompt rebuilt from a prefill: on 5.x from the recorded
    tiles and the encoded features (image sizes inferred), on 4.57 the forward's
    own inputs. Either way the base encodes the images as the RLVR model did."""
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=2)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base, internal=True) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg):
        rlvr.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert base_saw(seen_base, seen_rlvr)


def test_video_prompt(pair):
    """A prompt with an image and a video: parity with the published loop, and
    patch()ed generate equal to optimize."""
    base, rlvr = pair
    inputs = make_inputs(sizes=((64, 40),), frames=3)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=8)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert_matches_published(result, pub, n_visual=n_visual(inputs), hidden=64, steps=8)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base, internal=True) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=False)
        last = handle.last
    assert base_saw(seen_base, seen_rlvr)
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)


def test_video_with_num_return_sequences(pair):
    base, rlvr = pair
    inputs = make_inputs(sizes=(), frames=2)
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=3)
    torch.manual_seed(0)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base, internal=True) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        last = handle.last
    assert last.replayed and last.optimized_rows == 1
    assert base_saw(seen_base, seen_rlvr)


def test_ambiguous_tilings_are_settled_by_value(pair):
    """Images of 3 and 5 tiles whose features have the same 4 x 3 grid: the tile
    count alone (8) allows 3 + 5 and 5 + 3; encoding the candidates settles it."""
    base, rlvr = pair
    ad = ar.get_adapter(rlvr)
    assert sorted(n for n, _ in ad._sizes_for(4, 3)) == [3, 5]
    inputs = make_inputs(sizes=((48, 32), (64, 40)))
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=2)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base, internal=True) as seen_base, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert handle.last is not None and handle.last.replayed
    assert base_saw(seen_base, seen_rlvr)


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
