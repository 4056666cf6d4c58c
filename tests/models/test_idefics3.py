"""The replay engine and patch() on tiny random Idefics3 and SmolVLM pairs
(SigLIP-like vision tower, pixel-shuffle connector, Llama text model at
model.model.text_model): parity with the published loop, and patch()ed
generate equal to optimize + apply, on transformers 4.57.x and 5.x."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from actreplay_ext.core import capture_prefill
from actreplay_ext.models.idefics3 import Idefics3Adapter
from helpers import assert_matches_published, replay, replay_and_published

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN_ID, FAKE_AROUND_ID, GLOBAL_IMG_ID = 990, 991, 992
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
IMAGE_SIZE, PATCH, SCALE = 112, 14, 2
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2 // SCALE**2  # 64 patches, pixel-shuffled by 2x2: 16 tokens
LR = 1e-3
SHARPEN = 45.0  # the ratio rule then selects real subsets of the visual tokens
NOISE = 0.3  # enough drift that the matched-alignment loss is not a float32 cancellation
FAMILIES = ("idefics3", "smolvlm")
# The random connector (a LayerNorm'd 128-wide input through one Linear) gives
# image features ~10x the norm of the text embeddings; the decoder layers then
# move the visual residual stream by ~3%, the base/RLVR KL is ~1e-3 and the
# loss is float32 rounding of the top-k log-softmax. Scaled down, the features
# are on the text embeddings' scale, as the LLaVA projector's are.
FEATURE_SCALE = 0.05


def make_model(family, seed=0, sharpen=SHARPEN):
    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration),
        "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration),
    }[family]
    cfg = cfg_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        scale_factor=SCALE, image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_ID)
    model = model_cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # image features on the scale of the text embeddings, see FEATURE_SCALE
        model.model.connector.modality_projection.proj.weight.mul_(FEATURE_SCALE)
    return tiny.finish(model, sharpen)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    base = make_model(request.param)
    return base, tiny.perturbed_copy(base, NOISE, seed=1234)


def image_ids():
    """One image as the Idefics3 processor writes it: <fake_token_around_image>
    <global-img> <image>*n <fake_token_around_image> (here plain text ids)."""
    return [FAKE_AROUND_ID, GLOBAL_IMG_ID] + [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + [FAKE_AROUND_ID]


def make_inputs(n_images=2, text_len=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(3, 900, (text_len // 2,), generator=g).tolist()
    for _ in range(n_images):
        ids += image_ids() + torch.randint(3, 900, (2,), generator=g).tolist()
    ids += torch.randint(3, 900, (text_len - text_len // 2,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(1, n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)}


def hooks_of(model):
    mods = [model, model.model.vision_model, *model.model.text_model.layers]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


def test_adapter_locates_the_parts(pair):
    base, _ = pair
    ad = ar.get_adapter(base)
    assert isinstance(ad, Idefics3Adapter)
    assert {"Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"} <= set(ar.supported_families())
    assert ad.decoder_layers() is base.model.text_model.layers and ad.num_layers == 4
    assert ad.final_norm() is base.model.text_model.norm and ad.norm_eps() == pytest.approx(1e-6)
    assert ad.unembed() is base.lm_head.weight and ad.vocab_size == 1000 and ad.hidden_size == 64
    assert ad.vision_tower() is base.model.vision_model
    assert ad.visual_token_ids() == [IMAGE_TOKEN_ID] and ad.image_tokens() == TOKENS_PER_IMAGE


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_optimize_matches_published_loop(pair, alignment):
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15, alignment=alignment)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)

    assert_matches_published(result, pub, n_visual=2 * TOKENS_PER_IMAGE, hidden=64, steps=15)


def greedy_scores(model, inputs, n=3):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def test_patch_generate_equals_optimize(pair):
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15)
    before = hooks_of(rlvr)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        assert hooks_of(rlvr) > before
        seq_patch, scores_patch = greedy_scores(rlvr, inputs)
        last = handle.last
    assert hooks_of(rlvr) == before  # no hooks remain
    result = replay(base, rlvr, inputs, cfg)
    assert last is not None and last.replayed
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)
    assert last.losses == pytest.approx(result.losses, rel=1e-6)
    with ar.apply(rlvr, result):
        seq_apply, scores_apply = greedy_scores(rlvr, inputs)
    assert hooks_of(rlvr) == before
    _, scores_plain = greedy_scores(rlvr, inputs)
    assert torch.equal(seq_patch, seq_apply)
    assert torch.allclose(scores_patch, scores_apply, rtol=0, atol=1e-5)
    # ... and the offsets do reach the generation.
    assert float((scores_apply - scores_plain).abs().max()) > 1e-3


def prefill_inputs(model, rows):
    """Records the layer-0 input of each prefill (registered before patch(), so
    it sees the input before the offsets are added)."""
    def grab(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] > 1:
            rows.append(h.detach().clone())
    return model.model.text_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)


@pytest.mark.parametrize("n_images", [1, 2])
def test_pass_at_k_optimises_once(pair, n_images):
    """generate(num_return_sequences=2) optimises once per prompt (steps loss
    evaluations, identical rows sharing one loop row); the base model gets the
    images in the order the RLVR rows received them, which transformers 5.18
    makes [a, a] and [b, b] for a two-image prompt (4.57: [a, b] twice)."""
    base, rlvr = pair
    inputs = make_inputs(n_images=n_images)
    steps = []
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5, callback=lambda step, loss: steps.append(step))
    seen = []
    rec = prefill_inputs(rlvr, seen)
    batch_sizes = []
    count = rlvr.model.text_model.layers[1].register_forward_hook(
        lambda mod, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        torch.manual_seed(0)
        with ar.patch(rlvr, base=base, config=cfg) as handle:
            out = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
            last = handle.last
    finally:
        rec.remove()
        count.remove()
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert steps == list(range(cfg.steps))  # one optimisation
    assert list(last.n_visual) == [n_images * TOKENS_PER_IMAGE] * 2 and len(last.deltas) == 2

    # The rows generate gave the RLVR model, among the two orders it may use.
    pix = inputs["pixel_values"][0]
    as_given = pix.unsqueeze(0).repeat(2, 1, 1, 1, 1)
    candidates = [as_given]
    if n_images == 2:
        candidates.append(torch.stack([pix[[0, 0]], pix[[1, 1]]]))
    ids = inputs["input_ids"].repeat(2, 1)
    adapter = ar.get_adapter(rlvr)
    matches = []
    for pv in candidates:
        rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv}
        if torch.allclose(capture_prefill(adapter, rows).hidden0, seen[0], rtol=0, atol=1e-6):
            matches.append(rows)
    assert len(matches) == 1
    rows = matches[0]
    identical = rows["pixel_values"] is as_given
    assert last.optimized_rows == (1 if identical else 2)
    if identical:  # the loop ran layer 1 on one row per step; generate on 2
        assert batch_sizes.count(1) == cfg.steps and set(batch_sizes) == {1, 2}
    result = ar.optimize(rlvr, rows, ar.compute_targets(base, rows, cfg), cfg)
    for ours, theirs in zip(last.deltas, result.deltas):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_batch_with_padding_images_and_left_padding(pair):
    """Two prompts with one and two images: pixel_values [2, 2, ...] with an
    all-zero padding image for the first, a pixel_attention_mask that masks
    part of the last image, and left padding; patch()ed generate
    equals optimize on the same batch (5.x rebuilds the padded layout from
    the vision tower's call, which saw the real images only)."""
    base, rlvr = pair
    one, two = make_inputs(n_images=1, seed=1), make_inputs(n_images=2, seed=2)
    pad = two["input_ids"].shape[1] - one["input_ids"].shape[1]
    ids = torch.stack([torch.cat([torch.full((pad,), PAD_ID), one["input_ids"][0]]), two["input_ids"][0]])
    mask = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), one["attention_mask"][0]]),
                        two["attention_mask"][0]])
    pv = torch.zeros(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    pv[0, 0] = one["pixel_values"][0, 0]
    pv[1] = two["pixel_values"][0]
    # The last image is padded on the right (as the processor pads a batch's images): 2 patch columns masked.
    pixel_mask = torch.zeros(2, 2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    pixel_mask[0, 0] = 1
    pixel_mask[1, 0] = 1
    pixel_mask[1, 1, :, : IMAGE_SIZE - 2 * PATCH] = 1
    pv[1, 1, :, :, IMAGE_SIZE - 2 * PATCH:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "pixel_attention_mask": pixel_mask}
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**batch, max_new_tokens=2, do_sample=False)
        last = handle.last
    result = ar.optimize(rlvr, batch, ar.compute_targets(base, batch, cfg), cfg)
    unmasked = dict(batch, pixel_attention_mask=torch.ones_like(pixel_mask))
    assert not torch.allclose(ar.compute_targets(base, unmasked, cfg).entropy,
                              ar.compute_targets(base, batch, cfg).entropy, atol=1e-4)  # the mask matters
    assert last.n_visual == [TOKENS_PER_IMAGE, 2 * TOKENS_PER_IMAGE] and last.optimized_rows == 2
    assert last.losses == pytest.approx(result.losses, rel=1e-6)
    for ours, theirs in zip(last.deltas, result.deltas):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_unseen_vision_inputs_are_an_error(pair):
    """Precomputed image features (no vision-tower call recorded) cannot be given
    to the base model: a clear error, not a silent replay against the wrong prompt."""
    _, rlvr = pair
    ad = ar.get_adapter(rlvr)
    ids = make_inputs(n_images=1)["input_ids"]
    feats = torch.zeros(1, TOKENS_PER_IMAGE, 64)
    for kwargs in ({"input_ids": ids, "mm_encoder_outputs": {"image": feats}},
                   {"input_ids": ids, "image_hidden_states": feats}):
        with pytest.raises(RuntimeError, match="pass pixel_values"):
            ad.prompt_from_forward(kwargs, [])
    # Encoded images that match none of the recorded ones, or the wrong number of them.
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    call = [((), {"pixel_values": pixels, "patch_attention_mask": torch.ones(2, 8, 8, dtype=torch.bool)})]
    a, b, c = torch.randn(3, TOKENS_PER_IMAGE, 64)
    two_rows = ids.repeat(2, 1)
    with pytest.raises(RuntimeError, match="cannot match"):
        ad.prompt_from_forward({"input_ids": two_rows, "mm_encoder_outputs": {"image": torch.stack([a, b, c, a])}}, call)
    with pytest.raises(RuntimeError, match="image tokens"):
        ad.prompt_from_forward({"input_ids": two_rows, "mm_encoder_outputs": {"image": torch.stack([a, a, b, b])}}, call)
    good = ad.prompt_from_forward({"input_ids": two_rows, "mm_encoder_outputs": {"image": torch.stack([a, b])}}, call)
    assert torch.equal(good["pixel_values"][:, 0], pixels) and bool(good["pixel_attention_mask"].all())
    # A text-only forward needs no pixels.
    assert set(ad.prompt_from_forward({"input_ids": ids, "mm_encoder_outputs": {}}, [])) == {"input_ids"}


def test_direct_substitution_matches_published(pair):
    """mode="direct" through patch()ed generate: the prefill's last logits equal
    the published substitution's (on 5.x the base prompt is rebuilt from the
    vision tower's call, as for the replay)."""
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(mode="direct", thresholds=[2.5, 2.5, 2.5])
    ref_out = reference.published_direct(rlvr, base, inputs, cfg)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        _, scores = greedy_scores(rlvr, inputs, n=2)
    _, plain = greedy_scores(rlvr, inputs, n=2)
    assert handle.last.selected == ref_out["counts"]
    assert 0 < sum(ref_out["counts"]) < 3 * inputs["input_ids"].numel()  # real subsets, text included
    assert torch.allclose(scores[0], ref_out["logits"][:, -1], rtol=0, atol=1e-5)
    assert not torch.allclose(scores[0], plain[0], atol=1e-3)  # the substitution changes the answer's logits
