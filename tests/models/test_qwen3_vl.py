"""The replay engine and patch() on a tiny random Qwen3-VL pair, whose text
model adds deepstack visual features after its first decoder layers: parity
with the published loop, the residual stream the engine reads equal to the
whole model's, and patch()ed generate equal to optimize, on transformers
4.57.x and 5.x."""

import inspect

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from actreplay_ext.core import LayerInputs, capture_prefill, distinct_rows, run_layers
from actreplay_ext.models.qwen3_vl import Deepstack, Qwen3VLAdapter
from helpers import assert_matches_published, LayerBatchSizes, rel_max, replay, replay_and_published

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
    pytest.skip("this transformers has no Qwen3-VL", allow_module_level=True)

IMAGE_ID, VIDEO_ID, START_ID, END_ID = 990, 991, 992, 993
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
PATCH, MERGE, TEMPORAL = 16, 2, 2
PIXEL_DIM = 3 * TEMPORAL * PATCH * PATCH
DEEPSTACK_FROM = [0, 2]  # vision blocks whose features are added after text layers 0 and 1
LR = 1e-3
SHARPEN = 30.0  # the ratio rule then selects real subsets (6-10 of the 28 visual tokens per layer)
NOISE = 0.3  # enough drift that the matched-alignment loss is not a float32 cancellation
IMAGES = ((8, 8), (6, 8))  # patch grids: 16 + 12 visual tokens


def config(config_cls, **text):
    """A tiny Qwen3-VL(-MoE) config; `text` adds text-model fields (the MoE's experts)."""
    return config_cls(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_theta=10000.0,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **text),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                           out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=DEEPSTACK_FROM),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
        vision_end_token_id=END_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def make_model(seed=0, sharpen=SHARPEN):
    torch.manual_seed(seed)
    return tiny.build(transformers.Qwen3VLForConditionalGeneration, config(transformers.Qwen3VLConfig), sharpen)


@pytest.fixture(scope="module")
def pair():
    base = make_model()
    return base, tiny.perturbed_copy(base, NOISE, seed=1234)


def make_inputs(model, images=IMAGES, video=None, text_len=8, seed=0):
    """text, then each image as <vision_start> <image>*(h*w/4) <vision_end> with
    its own text after it, then an optional video (grid t x h x w) as Qwen3-VL
    lays it out, each frame after a timestamp token in its own
    <vision_start> ... <vision_end>, then text; pixel rows in item order."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 900, (n,), generator=g).tolist()  # noqa: E731
    ids = [BOS_ID] + text(text_len // 2)
    for h, w in images:
        ids += [START_ID] + [IMAGE_ID] * (h * w // MERGE**2) + [END_ID] + text(2)
    if video is not None:
        t, h, w = video
        for _ in range(t):
            ids += text(1) + [START_ID] + [VIDEO_ID] * (h * w // MERGE**2) + [END_ID]
    ids += text(text_len - text_len // 2)
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if images:
        out["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in images])
        out["pixel_values"] = torch.randn(sum(h * w for h, w in images), PIXEL_DIM, generator=g)
    if video is not None:
        out["video_grid_thw"] = torch.tensor([list(video)])
        out["pixel_values_videos"] = torch.randn(video[0] * video[1] * video[2], PIXEL_DIM, generator=g)
    # transformers 5.x computes M-RoPE from mm_token_type_ids (and raises without it); 4.57 rejects it in generate.
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        mm = torch.zeros_like(input_ids, dtype=torch.int32)
        mm[input_ids == IMAGE_ID] = 1
        mm[input_ids == VIDEO_ID] = 2
        out["mm_token_type_ids"] = mm
    return out


def n_tokens(images=IMAGES):
    return sum(h * w // MERGE**2 for h, w in images)


def hooks_of(model):
    lm = model.model.language_model
    mods = [model, model.model, model.model.visual, lm, lm.norm, *lm.layers]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


def residual_stream(model, inputs):
    """The whole model's h_out(l) for every layer, read as the input of layer
    l + 1 (of the final norm after the last layer), and its output_hidden_states."""
    lm = model.model.language_model
    readers = [*lm.layers[1:], lm.norm]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, l=l: seen.__setitem__(l, a[0].clone()))
             for l, m in enumerate(readers)]
    ad = ar.get_adapter(model)
    state = ad.model_state()
    try:
        with torch.no_grad():
            out = model(**ad.forward_inputs(inputs), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
        ad.restore_state(state)
    return [seen[l] for l in range(len(readers))], out.hidden_states


# ------------------------------------------------------------------ adapter


def test_adapter_locates_the_parts(pair):
    base, _ = pair
    ad = ar.get_adapter(base)
    assert isinstance(ad, Qwen3VLAdapter)
    assert "Qwen3VLForConditionalGeneration" in ar.supported_families()
    lm = base.model.language_model
    assert ad.decoder_layers() is lm.layers and ad.num_layers == 4
    assert ad.final_norm() is lm.norm and ad.norm_eps() == pytest.approx(1e-6)
    assert ad.unembed() is base.lm_head.weight and ad.vocab_size == 1000 and ad.hidden_size == 64
    assert ad.vision_tower() is base.model.visual
    assert ad.visual_token_ids() == [IMAGE_ID, VIDEO_ID]
    assert ad.tokens_per_item(torch.tensor([[1, 8, 8], [1, 6, 8], [2, 4, 4]])).tolist() == [16, 12, 8]
    assert ad.layer_loop_module() is lm and ad.deepstack_layers() == 2


def test_prefill_captures_the_deepstack_features(pair):
    base, _ = pair
    inputs = make_inputs(base)
    pre = capture_prefill(ar.get_adapter(base), inputs)
    ds = pre.layers.between
    assert isinstance(ds, Deepstack) and ds.layers == len(DEEPSTACK_FROM)
    assert torch.equal(ds.visual, inputs["input_ids"] == IMAGE_ID)
    assert all(e.shape == (n_tokens(), 64) and float(e.abs().max()) > 0 for e in ds.embeds)
    assert base.model.rope_deltas is None  # the capture left the model's state as it was
    # The prefix ends at the last visual token; text after it is cut, no feature row is.
    P = pre.prefix_len
    assert P < pre.input_ids.shape[1]
    cut = pre.layers.prefix(P).between
    assert cut.visual.shape == (1, P) and all(torch.equal(a, b) for a, b in zip(cut.embeds, ds.embeds))
    # Cutting before the second image keeps the first image's feature rows only.
    first_end = int((inputs["input_ids"][0] == END_ID).nonzero()[0])
    early = ds.prefix(first_end)
    assert all(torch.equal(a, b[:16]) for a, b in zip(early.embeds, ds.embeds))


def test_adapter_rejects_a_mismatched_deepstack():
    with pytest.raises(ValueError, match="embeds\\[0\\]"):
        Deepstack(torch.tensor([[True, False, True]]), [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="'visual'"):
        Deepstack(torch.tensor([[1, 0, 1]]), [torch.zeros(2, 4)])


# ------------------------------------------------------- deepstack matters


def test_engine_reads_the_residual_stream_of_the_whole_model(pair):
    """The decoder layers alone, with the deepstack features added after layers
    0 and 1, give exactly the whole model's residual stream at every layer;
    without them they drift from layer 0 on. And what output_hidden_states holds
    (the definition the adapter's docstring documents): on 4.57 the residual
    stream itself, on 5.x the layer's return value, the residual stream less
    the features, at the deepstack layers."""
    base, _ = pair
    inputs = make_inputs(base)
    ad = ar.get_adapter(base)
    pre = capture_prefill(ad, inputs)
    T = pre.hidden0.shape[1]
    inputs_t = pre.layers.prefix(T)
    with_ds, without = [], []
    with torch.no_grad():
        run_layers(ad, pre.hidden0, inputs_t, 0, 4, lambda l, i, o: with_ds.append(o))
        run_layers(ad, pre.hidden0, LayerInputs(inputs_t.kwargs), 0, 4, lambda l, i, o: without.append(o))
    stream, hidden_states = residual_stream(base, inputs)
    vis = pre.visual[0]
    for l in range(4):
        assert torch.allclose(with_ds[l], stream[l], rtol=0, atol=1e-5), l
        assert float((without[l] - stream[l]).abs().max()) > 1e-2, l  # the features matter at every layer
    # Without the features, the visual rows differ after layer 0 and the text rows do not (causal, text first).
    first_vis = int(vis.nonzero()[0])
    assert torch.allclose(without[0][0, :first_vis], stream[0][0, :first_vis], rtol=0, atol=1e-6)
    assert float((without[0][0, vis] - stream[0][0, vis]).abs().min()) > 0
    ds = pre.layers.between
    v4 = transformers.__version__.startswith("4.")
    for l in range(4):
        layer_return = stream[l].clone()
        if l < ds.layers:
            layer_return[0, vis] -= ds.embeds[l]
        expected = stream[l] if (v4 or l >= ds.layers) else layer_return
        if l < 3:  # hidden_states[-1] is the final norm's output
            assert torch.allclose(hidden_states[l + 1], expected, rtol=0, atol=1e-5), l


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_optimize_matches_published_loop(pair, alignment):
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=12, alignment=alignment)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)

    assert_matches_published(result, pub, n_visual=n_tokens(), hidden=64, steps=12)
    assert all(0 < s < n_tokens() for s in result.selected)  # a real subset at every layer


def test_image_and_video_match_published_loop(pair):
    """An image and a two-frame video: the model merges their deepstack
    features into one list over all visual positions; the patched generate
    replays the same offsets."""
    base, rlvr = pair
    inputs = make_inputs(base, images=[(8, 8)], video=(2, 4, 4))
    pre = capture_prefill(ar.get_adapter(base), inputs)
    ids = inputs["input_ids"]
    assert torch.equal(pre.layers.between.visual, (ids == IMAGE_ID) | (ids == VIDEO_ID)) and int(pre.visual.sum()) == 24
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=6)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert result.deltas.shape == (24, 64) and result.selected == pub["selected"]
    assert rel_max(result.deltas, pub["deltas"]) <= 1e-4
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.allclose(handle.last.deltas, result.deltas, rtol=0, atol=1e-6)


def test_text_only_prompt_is_unchanged(pair):
    base, rlvr = pair
    inputs = make_inputs(base, images=[])
    plain = rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
    with ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=3, lr=LR, steps=2)) as handle:
        patched = rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(plain, patched)
    assert not handle.last.replayed and "no visual tokens" in handle.last.note


def test_without_the_deepstack_hook_parity_breaks(pair, monkeypatch):
    """The same run with the adapter's deepstack hook switched off: the engine
    no longer sees the activations of the whole model, and the offsets (and
    targets) leave the published loop's."""
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=4)
    pub = reference.published_replay(rlvr, base, inputs, cfg)
    monkeypatch.setattr(Qwen3VLAdapter, "layer_loop_module", lambda self: None)
    targets = ar.compute_targets(base, inputs, cfg)
    result = ar.optimize(rlvr, inputs, targets, cfg)
    assert result.losses[0] != pytest.approx(pub["losses"][0], rel=1e-3)
    assert rel_max(result.deltas, pub["deltas"]) > 1e-2


def test_mid_replay_matches_published_loop(pair):
    """inject_layer=2: the offset enters after both deepstack layers, which the
    loop runs once, without grad, before the first step."""
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(layers=4, lr=LR, steps=5, inject_layer=2, alignment="matched")
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert result.selected == pub["selected"] and sum(result.selected) > 0
    assert rel_max(result.deltas, pub["deltas"]) <= 1e-4


def test_direct_mode_matches_published_direct(pair):
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(mode="direct", layers=3, thresholds=[2.0, 2.0, 2.0])
    pub = reference.published_direct(rlvr, base, inputs, cfg)
    assert sum(pub["counts"]) > 0
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        with torch.no_grad():
            logits = rlvr(**ar.get_adapter(rlvr).forward_inputs(inputs)).logits
    assert handle.last.selected == pub["counts"]
    assert torch.allclose(logits, pub["logits"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------- patch


def test_patch_generate_equals_optimize(pair):
    base, rlvr = pair
    inputs = make_inputs(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=12)
    before = hooks_of(rlvr)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        assert hooks_of(rlvr) > before
        patched = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
        last = handle.last
    assert hooks_of(rlvr) == before  # no hooks remain
    assert rlvr.model.rope_deltas is not None  # generate's own state, left as generate set it
    result = replay(base, rlvr, inputs, cfg)
    assert last is not None and last.replayed and last.n_visual == [n_tokens()]
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)
    assert last.losses == pytest.approx(result.losses, rel=1e-6)
    with ar.apply(rlvr, result):
        applied = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert hooks_of(rlvr) == before
    assert torch.equal(patched, applied)


def test_apply_changes_the_prefill_as_patch_does(pair):
    """The offsets reach the logits (so equal generations above mean something),
    and patch() and apply() give the same prefill logits."""
    base, rlvr = pair
    inputs = make_inputs(base)
    fwd = ar.get_adapter(rlvr).forward_inputs(inputs)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=3)
    result = replay(base, rlvr, inputs, cfg)
    with torch.no_grad():
        plain = rlvr(**fwd).logits
        with ar.patch(rlvr, base=base, config=cfg):
            patched = rlvr(**fwd).logits
        with ar.apply(rlvr, result):
            applied = rlvr(**fwd).logits
    assert torch.allclose(applied, patched, rtol=0, atol=1e-5)
    assert float((applied - plain).abs().max()) > 1e-3


def test_pass_at_k_sampling_optimises_once(pair):
    base, rlvr = pair
    inputs = make_inputs(base, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=4)
    with LayerBatchSizes(rlvr.model.language_model.layers[1]) as calls, ar.patch(rlvr, base=base, config=cfg) as handle:
        torch.manual_seed(0)
        out = rlvr.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    batch_sizes = calls.sizes
    last = handle.last
    assert out.shape[0] == 2 and last.replayed and last.n_visual == [16, 16]
    assert last.optimized_rows == 1 and len(last.deltas) == 2 and torch.equal(last.deltas[0], last.deltas[1])
    # The replay loop ran layer 1 once per step on one row; generate ran it on 2.
    assert batch_sizes.count(1) == cfg.steps and set(batch_sizes) == {1, 2}
    # ... and gave the offsets of the prompt alone.
    alone = replay(base, rlvr, inputs, cfg)
    assert torch.allclose(last.deltas[0], alone.deltas, rtol=0, atol=1e-6)


def test_pass_at_k_with_two_images(pair):
    """Two images in one prompt, K = 2 sampled rows: every row is replayed and
    the base model is given the images in the order the RLVR rows received them
    (transformers 5.18 repeats each encoded image K times in a row), which the
    row deltas prove by equalling a plain optimize on those rows."""
    base, rlvr = pair
    inputs = make_inputs(base, images=[(8, 8), (8, 8)])
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=3)
    seen = []
    hook = rlvr.model.language_model.layers[0].register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().clone()) if not seen else None)
    try:
        with ar.patch(rlvr, base=base, config=cfg) as handle:
            torch.manual_seed(0)
            rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    finally:
        hook.remove()
    last = handle.last
    assert last.replayed and last.n_visual == [32, 32] and len(last.deltas) == 2
    assert last.optimized_rows in (1, 2) and len(last.losses) == 3
    # Rebuild the rows as the RLVR model's layer 0 saw them and optimise them directly.
    ad = ar.get_adapter(rlvr)
    rows = {k: v.repeat(2, 1) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    first, second = inputs["pixel_values"][:64], inputs["pixel_values"][64:]
    for order in ([first, second, first, second], [first, first, second, second]):
        rows["pixel_values"] = torch.cat(order)
        rows["image_grid_thw"] = inputs["image_grid_thw"].repeat(2, 1)
        if torch.allclose(capture_prefill(ad, rows).hidden0, seen[0], rtol=0, atol=1e-6):
            break
    else:
        pytest.fail("the rows generate built match neither image order")
    pre = capture_prefill(ad, rows)
    assert distinct_rows(pre)[0].hidden0.shape[0] == last.optimized_rows
    result = ar.optimize(rlvr, rows, ar.compute_targets(base, rows, cfg), cfg)
    for ours, theirs in zip(last.deltas, result.deltas):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_batch_rows_equal_rows_one_by_one(pair):
    """Two different prompts in one batch (same length): each row's offsets
    equal that prompt alone, so the deepstack features are cut per row."""
    base, rlvr = pair
    a, b = make_inputs(base, seed=0), make_inputs(base, seed=1)
    batch = {k: torch.cat([a[k], b[k]]) for k in a}
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=4)
    result = ar.optimize(rlvr, batch, ar.compute_targets(base, batch, cfg), cfg)
    assert result.optimized_rows == 2
    for row, prompt in zip(result.deltas, (a, b)):
        alone = ar.optimize(rlvr, prompt, ar.compute_targets(base, prompt, cfg), cfg)
        assert torch.allclose(row, alone.deltas, rtol=0, atol=1e-5)
