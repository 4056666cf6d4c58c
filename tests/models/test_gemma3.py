"""The replay engine and patch() on a tiny random Gemma 3 pair (SigLIP vision
tower, Gemma 3 text model with alternating sliding-window and full-attention
layers), on transformers 4.57.x and 5.x: per-layer masks and rotary tables,
the (1 + weight) lens norm, parity with the published loop, patch()ed generate."""

import math

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from actreplay_ext.core import LayerInputs, capture_prefill, run_layers
from actreplay_ext.models.gemma3 import Gemma3Adapter, LayerTypeKwargs
from helpers import assert_matches_published, LayerBatchSizes, replay, replay_and_published

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
    pytest.skip("this transformers has no Gemma 3", allow_module_level=True)

IMAGE_TOKEN_ID, BOI_ID, EOI_ID, BOS_ID, EOS_ID, PAD_ID = 5, 3, 4, 1, 2, 0
TOKENS_PER_IMAGE = 16  # mm_tokens_per_image: (32 / 4)^2 = 64 patches pooled 2 x 2
IMAGE_SIZE, PATCH = 32, 4
WINDOW = 16  # sliding window; the two-image prompt is 55 tokens, its replay prefix 45
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
LR = 1e-3
SHARPEN = 30.0  # the ratio rule then selects real subsets (e.g. 2, 6, 16 of the 32 visual tokens)
NOISE = 0.3
PROJECTION_STD = 0.03  # image embeddings of about the text embeddings' size (the default init is zeros)
THR = 4.0  # direct-mode entropy threshold: the mask is then E_base < E_rlvr on a real subset


def make_model(seed=0, sharpen=SHARPEN):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3Config(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                         layer_types=LAYER_TYPES, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH),
        mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=IMAGE_TOKEN_ID, boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model = transformers.Gemma3ForConditionalGeneration._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # zero-initialised: every image would embed to 0
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, PROJECTION_STD)
    return tiny.finish(model, sharpen)


@pytest.fixture(scope="module")
def pair():
    base = make_model()
    return base, tiny.perturbed_copy(base, NOISE, seed=1234)


def make_inputs(n_images=2, seed=0, token_types=True):
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(10, 900, (6,), generator=g).tolist()
    for _ in range(n_images):
        ids += [BOI_ID] + [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + [EOI_ID] + torch.randint(10, 900, (3,), generator=g).tolist()
    ids += torch.randint(10, 900, (6,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)}
    if token_types:  # as the Gemma 3 processor returns them: 1 at image tokens
        inputs["token_type_ids"] = (input_ids == IMAGE_TOKEN_ID).long()
    return inputs


def hooks_of(model):
    mods = [model, model.model.vision_tower, model.model.language_model, *model.model.language_model.layers]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


def allowed(mask):
    """[..., q, k] bool: where a 4-D attention mask (bool or additive float) lets q see k."""
    return mask if mask.dtype == torch.bool else torch.isfinite(mask) & (mask == 0)


def test_adapter_locates_the_parts(pair):
    base, _ = pair
    ad = ar.get_adapter(base)
    lm = base.model.language_model
    assert isinstance(ad, Gemma3Adapter)
    assert "Gemma3ForConditionalGeneration" in ar.supported_families()
    assert ad.decoder_layers() is lm.layers and ad.num_layers == 4
    assert ad.final_norm() is lm.norm and ad.norm_eps() == pytest.approx(1e-6)
    assert ad.unembed() is base.lm_head.weight and ad.vocab_size == 1000 and ad.hidden_size == 64
    assert ad.vision_tower() is base.model.vision_tower
    assert ad.visual_token_ids() == [IMAGE_TOKEN_ID] and ad.image_tokens() == TOKENS_PER_IMAGE
    assert ad.layer_types() == LAYER_TYPES
    # Gemma's RMSNorm scales by 1 + weight; finish() sharpened that (the weight starts at zero).
    assert torch.allclose(ad.lens_norm_weight(), torch.full((64,), SHARPEN))
    assert torch.allclose(lm.norm.weight, torch.full((64,), SHARPEN - 1.0))


def test_lens_is_the_models_own_head(pair):
    """Norm + unembedding with lens_norm_weight() reproduces the model's logits
    (so: 1 + weight, and no final-logit softcapping in Gemma3ForConditionalGeneration)."""
    base, _ = pair
    ad = ar.get_adapter(base)
    inputs = make_inputs()
    seen = {}
    h = ad.final_norm().register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
    try:
        with torch.no_grad():
            logits = base(**inputs).logits[0]
    finally:
        h.remove()
    lens = reference.lens_logits(seen["h"][0], ad.unembed(), ad.lens_norm_weight(), ad.norm_eps())
    assert torch.allclose(lens, logits, rtol=1e-5, atol=1e-4)
    wrong = reference.lens_logits(seen["h"][0], ad.unembed(), ad.final_norm().weight, ad.norm_eps())
    assert not torch.allclose(wrong, logits, rtol=1e-3, atol=1e-2)


def test_captured_masks_are_per_type_with_image_blocks(pair):
    """The prefill carries each attention type's mask: the sliding one hides
    positions WINDOW or more back, and with token_type_ids image tokens see the
    later tokens of their own image (not those of the next image)."""
    base, _ = pair
    inputs = make_inputs()
    pre = capture_prefill(ar.get_adapter(base), inputs)
    assert isinstance(pre.layers.per_layer, LayerTypeKwargs) and pre.layers.per_layer.types == LAYER_TYPES
    T = pre.input_ids.shape[1]
    assert pre.prefix_len > WINDOW
    full = allowed(pre.layers.per_layer.per_type["full_attention"]["attention_mask"])[0, 0]
    slid = allowed(pre.layers.per_layer.per_type["sliding_attention"]["attention_mask"])[0, 0]
    assert full.shape == slid.shape == (T, T)
    assert full[T - 1, 0] and not slid[T - 1, 0] and slid[T - 1, T - WINDOW + 1]
    img = pre.visual[0].nonzero().squeeze(1)
    first, second = img[:TOKENS_PER_IMAGE], img[TOKENS_PER_IMAGE:]
    for m in (full, slid):
        assert m[first[0], first[-1]] and not m[first[0], second[0]]
    causal = capture_prefill(ar.get_adapter(base), make_inputs(token_types=False))
    assert not allowed(causal.layers.per_layer.per_type["full_attention"]["attention_mask"])[0, 0, first[0], first[-1]]


@pytest.mark.parametrize("prefix", [False, True])
def test_engine_layers_equal_the_whole_model(pair, prefix):
    """run_layers from the captured prefill gives every layer's output as the
    whole model does, on the full prompt and on the replay prefix; with layer
    0's kwargs for every layer (no per-type arguments) it does not."""
    base, _ = pair
    ad = ar.get_adapter(base)
    inputs = make_inputs()
    outs = {}
    hooks = reference.record_layer_outputs(ad, 4, outs.__setitem__)
    try:
        with torch.no_grad():
            base(**inputs)
    finally:
        for h in hooks:
            h.remove()
    pre = capture_prefill(ad, inputs)
    P = pre.prefix_len if prefix else pre.input_ids.shape[1]
    inputs_p = pre.layers.prefix(P)
    ours, layer0_only = [], []
    with torch.no_grad():
        run_layers(ad, pre.hidden0[:, :P], inputs_p, 0, 4, lambda l, i, o: ours.append(o))
        run_layers(ad, pre.hidden0[:, :P], LayerInputs(inputs_p.kwargs), 0, 4, lambda l, i, o: layer0_only.append(o))
    for l in range(4):
        assert torch.allclose(ours[l], outs[l][:, :P], rtol=1e-5, atol=1e-5), l
    assert torch.allclose(layer0_only[0], outs[0][:, :P], rtol=1e-5, atol=1e-5)  # layer 0 is its own
    assert not torch.allclose(layer0_only[1], outs[1][:, :P], rtol=1e-3, atol=1e-3)  # full attention differs


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_optimize_matches_published_loop(pair, alignment):
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15, alignment=alignment)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)

    assert_matches_published(result, pub, n_visual=2 * TOKENS_PER_IMAGE, hidden=64, steps=15)


@pytest.mark.parametrize("n_images", [1, 2])
def test_patch_generate_equals_apply_optimize(pair, n_images):
    base, rlvr = pair
    inputs = make_inputs(n_images=n_images)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15)
    before = hooks_of(rlvr)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        assert hooks_of(rlvr) > before
        patched = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
        last = handle.last
    assert hooks_of(rlvr) == before  # no hooks remain
    result = replay(base, rlvr, inputs, cfg)
    assert last is not None and last.replayed and sum(last.selected) > 0
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)
    assert last.losses == pytest.approx(result.losses, rel=1e-6)
    with ar.apply(rlvr, result):
        applied = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert hooks_of(rlvr) == before
    assert torch.equal(patched, applied)


@pytest.mark.parametrize("n_images", [1, 2])
def test_pass_at_k_optimises_once(pair, n_images):
    """generate(num_return_sequences=2, do_sample=True) repeats the prompt; the
    identical rows (equal per-type masks and rotary tables included) are
    optimised once. The offsets equal optimize() on the rows the model saw:
    the prompt twice, except that 5.x generate gives a two-image prompt's rows
    the images [a, a] and [b, b] (see Gemma3Adapter.encoded_order), which the
    base model's prompt must follow."""
    base, rlvr = pair
    inputs = make_inputs(n_images=n_images)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5, alignment="matched")  # the loop runs layer 0 at least
    seen = []
    layer0 = rlvr.model.language_model.layers[0]  # registered before patch(): sees the input without offsets
    hook = layer0.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0] if args else
                                                                                   kwargs["hidden_states"]),
                                            with_kwargs=True)
    try:
        torch.manual_seed(0)
        with ar.patch(rlvr, base=base, config=cfg) as handle, \
                LayerBatchSizes(layer0) as sizes:
            out = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
            last = handle.last
    finally:
        hook.remove()
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert list(last.n_visual) == [n_images * TOKENS_PER_IMAGE] * 2

    def rows_with(images):
        rows = {k: v.repeat(2, 1) for k, v in inputs.items() if k != "pixel_values"}
        rows["pixel_values"] = inputs["pixel_values"][images]
        return rows

    candidates = [rows_with([0, 0])] if n_images == 1 else [rows_with([0, 1, 0, 1]), rows_with([0, 0, 1, 1])]
    prefill = seen[0]
    matching = [r for r in candidates
                if torch.equal(capture_prefill(ar.get_adapter(rlvr), r).hidden0, prefill)]
    assert len(matching) == 1
    rows = matching[0]
    distinct = 1 if rows is candidates[0] else 2
    assert last.optimized_rows == distinct
    assert (1 in sizes.sizes) == (distinct == 1)  # the loop ran on one row only when the rows are equal
    result = ar.optimize(rlvr, rows, ar.compute_targets(base, rows, cfg), cfg)
    for ours, theirs in zip(last.deltas, result.deltas):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    if distinct == 1:
        single = replay(base, rlvr, inputs, cfg)
        assert torch.allclose(last.deltas[1], single.deltas, rtol=0, atol=1e-6)


def test_layer_type_kwargs_rejects_missing_types():
    with pytest.raises(ValueError, match="per_type"):
        LayerTypeKwargs(["sliding_attention", "full_attention"], {"sliding_attention": {}})


def test_direct_mode_matches_published_direct(pair):
    """Direct substitution reads every layer's lens over the whole prompt (longer
    than the sliding window) through the per-type layer arguments too."""
    base, rlvr = pair
    inputs = make_inputs()
    cfg = ar.ReplayConfig(mode="direct", layers=3, thresholds=[THR] * 3)
    pub = reference.published_direct(rlvr, base, inputs, cfg)
    with torch.no_grad():
        plain = rlvr(**inputs).logits
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        with torch.no_grad():
            ours = rlvr(**inputs).logits
    assert handle.last.selected == pub["counts"]
    assert 0 < sum(pub["counts"]) < 3 * inputs["input_ids"].numel()  # real subsets
    assert torch.allclose(ours, pub["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the substitution changes the logits


def test_bfloat16_model_replays(pair):
    """The lens operators take the norm weight in the activations' dtype: a
    bfloat16 Gemma 3 gets 1 + weight rounded to bfloat16 and replays."""
    base = make_model().to(torch.bfloat16)
    rlvr = tiny.perturbed_copy(base, NOISE, seed=1234)
    ad = ar.get_adapter(base)
    assert ad.lens_norm_weight().dtype == torch.bfloat16
    assert torch.equal(ad.lens_norm_weight(), (1.0 + ad.final_norm().weight.float()).bfloat16())
    inputs = make_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=3)
    result = replay(base, rlvr, inputs, cfg)
    assert sum(result.selected) > 0 and all(map(math.isfinite, result.losses))
    assert float(result.deltas.abs().max()) > 0
