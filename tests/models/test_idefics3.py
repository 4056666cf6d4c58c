"""Idefics3 and SmolVLM (SigLIP-like vision tower, pixel-shuffle connector, Llama
text model at model.model.text_model) beyond what every family must satisfy
(tests/models/test_families.py): Pass@K with two images, batches with padding
images and a pixel mask, vision inputs the base model cannot be given, and
direct substitution, on transformers 4.57.x and 5.x."""

import pytest
import torch
from helpers import greedy_scores

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from actreplay_ext.core import capture_prefill, in_internal_forward

transformers = pytest.importorskip("transformers")

FAMILIES = ("idefics3", "smolvlm")
IMAGE_SIZE, PATCH = tiny.IDEFICS3_IMAGE_SIZE, tiny.IDEFICS3_PATCH
TOKENS_PER_IMAGE = tiny.IDEFICS3_TOKENS_PER_IMAGE
PAD_ID = tiny.PAD_ID
LR = tiny.FAMILIES_TINY["idefics3"].lr


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return tiny.pair(request.param)


def make_inputs(**kw):
    return tiny.idefics3_inputs(None, **kw)


def prefill_inputs(model, rows):
    """Records the layer-0 input of each prefill (registered before patch(), so
    it sees the input before the offsets are added); the library's own passes, which
    call the layer too, are not the model's prefills."""
    def grab(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] > 1 and not in_internal_forward():
            rows.append(h.detach().clone())
    return model.model.text_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)


def test_pass_at_k_with_two_images(pair):
    """generate(num_return_sequences=2) optimises once per prompt (steps loss
    evaluations, identical rows sharing one loop row); the base model gets the
    images in the order the RLVR rows received them, which transformers 5.18
    makes [a, a] and [b, b] for a two-image prompt (4.57: [a, b] twice).
    (One image: test_families.py::test_pass_at_k_optimises_once.)"""
    base, rlvr = pair
    n_images = 2
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
    candidates = [as_given, torch.stack([pix[[0, 0]], pix[[1, 1]]])]
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
        ad.prompt_from_forward({"input_ids": two_rows, "mm_encoder_outputs": {"image": torch.stack([a, b, c, a])}},
                               call)
    with pytest.raises(RuntimeError, match="image tokens"):
        ad.prompt_from_forward({"input_ids": two_rows, "mm_encoder_outputs": {"image": torch.stack([a, a, b, b])}},
                               call)
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
