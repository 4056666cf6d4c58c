"""Gemma 3 (SigLIP vision tower, Gemma 3 text model with alternating
sliding-window and full-attention layers) beyond what every family must
satisfy (tests/models/test_families.py), on transformers 4.57.x and 5.x:
per-layer masks and rotary tables, the (1 + weight) lens norm, Pass@K with
two images, direct substitution, bfloat16."""

import math

import pytest
import torch
from helpers import LayerBatchSizes, replay

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from actreplay_ext.core import LayerInputs, capture_prefill, in_internal_forward, run_layers
from actreplay_ext.models.gemma3 import LayerTypeKwargs

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
    pytest.skip("this transformers has no Gemma 3", allow_module_level=True)

FAM = tiny.FAMILIES_TINY["gemma3"]
TOKENS_PER_IMAGE = tiny.GEMMA3_TOKENS_PER_IMAGE
WINDOW = tiny.GEMMA3_WINDOW  # sliding window; the two-image prompt is 55 tokens, its replay prefix 45
LAYER_TYPES = tiny.GEMMA3_LAYER_TYPES
LR, NOISE = FAM.lr, FAM.noise
THR = 4.0  # direct-mode entropy threshold: the mask is then E_base < E_rlvr on a real subset


@pytest.fixture(scope="module")
def pair():
    return FAM.pair()


def make_inputs(**kw):
    return tiny.gemma3_inputs(None, **kw)


def allowed(mask):
    """[..., q, k] bool: where a 4-D attention mask (bool or additive float) lets q see k."""
    return mask if mask.dtype == torch.bool else torch.isfinite(mask) & (mask == 0)


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


def test_pass_at_k_with_two_images(pair):
    """generate(num_return_sequences=2, do_sample=True) repeats the prompt; the
    identical rows (equal per-type masks and rotary tables included) are
    optimised once. The offsets equal optimize() on the rows the model saw:
    the prompt twice, except that 5.x generate gives a two-image prompt's rows
    the images [a, a] and [b, b] (see Gemma3Adapter.encoded_order), which the
    base model's prompt must follow. (One image:
    test_families.py::test_pass_at_k_optimises_once.)"""
    base, rlvr = pair
    inputs = make_inputs(n_images=2)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5, alignment="matched")  # the loop runs layer 0 at least
    seen = []
    layer0 = rlvr.model.language_model.layers[0]  # registered before patch(): sees the input without offsets
    # the model's own calls (the library's passes call the layer too, in_internal_forward)
    hook = layer0.register_forward_pre_hook(lambda mod, args, kwargs: None if in_internal_forward() else seen.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        torch.manual_seed(0)
        with ar.patch(rlvr, base=base, config=cfg) as handle, \
                LayerBatchSizes(layer0) as sizes:
            out = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
            last = handle.last
    finally:
        hook.remove()
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert list(last.n_visual) == [2 * TOKENS_PER_IMAGE] * 2

    def rows_with(images):
        rows = {k: v.repeat(2, 1) for k, v in inputs.items() if k != "pixel_values"}
        rows["pixel_values"] = inputs["pixel_values"][images]
        return rows

    candidates = [rows_with([0, 1, 0, 1]), rows_with([0, 0, 1, 1])]
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
    base = FAM.model().to(torch.bfloat16)
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
