"""Qwen3-VL, whose text model adds deepstack visual features after its first
decoder layers, beyond what every family must satisfy
(tests/models/test_families.py; Qwen3-VL-MoE is one of those families too):
the deepstack features captured and cut, the residual stream the engine reads
equal to the whole model's, parity on images with a video, without the
deepstack hook, mid-replay and direct mode, Pass@K with two images, batches,
on transformers 4.57.x and 5.x."""

import pytest
import torch
from helpers import rel_max, replay_and_published

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from actreplay_ext.core import LayerInputs, capture_prefill, distinct_rows, in_internal_forward, run_layers
from actreplay_ext.models.qwen3_vl import Deepstack, Qwen3VLAdapter

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
    pytest.skip("this transformers has no Qwen3-VL", allow_module_level=True)

FAM = tiny.FAMILIES_TINY["qwen3_vl"]
IMAGE_ID, VIDEO_ID, END_ID = tiny.QWEN3_IMAGE_ID, tiny.QWEN3_VIDEO_ID, tiny.QWEN3_END_ID
DEEPSTACK_FROM = tiny.QWEN3_DEEPSTACK_FROM  # vision blocks whose features are added after text layers 0 and 1
LR = FAM.lr
make_inputs = tiny.qwen3_vl_inputs
n_tokens = tiny.qwen3_vl_tokens


@pytest.fixture(scope="module")
def pair():
    return FAM.pair()


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


# ------------------------------------------------ the deepstack features


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


# ---------------------------------------------------------- Pass@K, batches


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
        lambda mod, args: seen.append(args[0].detach().clone()) if not seen and not in_internal_forward() else None)
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
