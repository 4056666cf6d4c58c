"""The selection variants and mid-layer injection of SPEC §4, each against the
published loop extended to it, and the role swap."""

import pytest
import torch
from helpers import replay, replay_and_published

import actreplay_ext as ar
from actreplay_ext import reference, tiny

LR = 1e-3


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair("qwen2_5_vl")


VARIANTS = {
    "high": dict(select="high"),
    "topk-count": dict(rule="topk", topk_tokens=5),
    "topk-fraction": dict(rule="topk", topk_tokens=0.25),
    "topk-high": dict(rule="topk", topk_tokens=7, select="high"),
    "absolute": dict(rule="absolute", thresholds=[0.5, 1.0, 0.8]),
    "mid-replay": dict(inject_layer=1),
    "mid-replay-matched": dict(inject_layer=2, alignment="matched"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_published_loop(pair, variant):
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)], video=(2, 4, 4))
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=10, **VARIANTS[variant])
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert result.selected == pub["selected"] and sum(result.selected) > 0
    assert float((result.deltas - pub["deltas"]).abs().max() / pub["deltas"].abs().max()) <= 1e-4
    for ours, theirs in zip(result.losses, pub["losses"]):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    if cfg.inject_layer:
        assert result.selected[: cfg.inject_layer] == [0] * cfg.inject_layer


def test_counts_per_rule(pair):
    base, _ = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])  # 16 visual tokens
    counts = lambda **kw: ar.compute_targets(base, inputs, ar.ReplayConfig(layers=3, **kw)).selected_counts()  # noqa: E731
    low = counts()
    assert counts(select="high") == low  # the high rule picks as many as the low rule
    assert counts(entropy_threshold=1.0) == [16, 16, 16]  # ratio 1.0: every visual token
    assert counts(rule="topk", topk_tokens=5) == [5, 5, 5]
    assert counts(rule="topk", topk_tokens=0.25) == [4, 4, 4]
    assert counts(rule="absolute", thresholds=[1e9, 0.0, 1e9]) == [16, 0, 16]


def test_high_picks_the_highest_entropies(pair):
    base, _ = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    t = ar.compute_targets(base, inputs, ar.ReplayConfig(layers=2, select="high"))
    for l in range(2):
        chosen = t.entropy[l, t.selected[l]]
        rest = torch.ones(16, dtype=torch.bool)
        rest[t.selected[l]] = False
        assert float(chosen.min()) >= float(t.entropy[l, rest].max())


def test_role_swap(pair):
    """Reverse replay: the base model is offset, the RLVR model is the teacher."""
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=4)
    with ar.patch(base, base=rlvr, config=cfg) as handle:
        base.generate(**inputs, max_new_tokens=2, do_sample=False)
    swapped = ar.optimize(base, inputs, ar.compute_targets(rlvr, inputs, cfg), cfg)
    pub = reference.published_replay(base, rlvr, inputs, cfg)
    assert torch.allclose(handle.last.deltas, swapped.deltas, rtol=0, atol=1e-6)
    assert float((swapped.deltas - pub["deltas"]).abs().max() / pub["deltas"].abs().max()) <= 1e-4


# ------------------------------------------------------------- direct mode


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_direct_substitution_matches_published(family):
    base, rlvr = tiny.make_pair(family, noise=0.2)
    inputs = tiny.make_inputs(base, images=[(8, 8)], video=(2, 4, 4))
    cfg = ar.ReplayConfig(mode="direct", thresholds=[2.5, 2.5, 2.5])
    assert cfg.layers == 3
    ref_out = reference.published_direct(rlvr, base, inputs, cfg)
    with torch.no_grad():
        plain = rlvr(**inputs).logits
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        with torch.no_grad():
            ours = rlvr(**inputs).logits
        gen = rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert handle.last.selected == ref_out["counts"]
    assert 0 < sum(ref_out["counts"]) < 3 * inputs["input_ids"].numel()  # real subsets, text included
    assert torch.allclose(ours, ref_out["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the substitution changes the answer's logits
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_direct_presets():
    cfg = ar.ReplayConfig.preset("deepeyes-7b")
    assert cfg.mode == "direct" and cfg.layers == 7 and cfg.thresholds[0] == 4.812
    assert ar.ReplayConfig(mode="direct").thresholds == list(ar.config.DIRECT_THRESHOLDS)
    assert ar.ReplayConfig.preset("mid-replay").inject_layer == 15
    with pytest.raises(ValueError, match="need 'thresholds', one float per replay layer"):
        ar.ReplayConfig(mode="direct", layers=3)


def test_direct_is_recomputed_for_each_new_prompt():
    """A conversation that grows (a new prefill with another image) gets new masks."""
    base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
    cfg = ar.ReplayConfig(mode="direct", thresholds=[2.5, 2.5, 2.5])
    turn1 = tiny.make_inputs(base, images=[(8, 8)], seed=1)
    turn2 = tiny.make_inputs(base, images=[(8, 8), (4, 6)], text_len=24, seed=1)
    expected = [reference.published_direct(rlvr, base, inputs, cfg) for inputs in (turn1, turn2)]
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        for inputs, ref_out in zip((turn1, turn2), expected):
            with torch.no_grad():
                ours = rlvr(**inputs).logits
            assert handle.last.selected == ref_out["counts"]
            assert torch.allclose(ours, ref_out["logits"], rtol=0, atol=1e-5)
    assert expected[0]["counts"] != expected[1]["counts"]


def test_direct_refuses_different_prompts():
    from actreplay_ext.core import capture_prefill, plan_direct
    from actreplay_ext.models import get_adapter

    base, rlvr = tiny.make_pair("qwen2_5_vl")
    a, b = get_adapter(rlvr), get_adapter(base)
    pre_r = capture_prefill(a, tiny.make_inputs(rlvr, seed=1))
    pre_b = capture_prefill(b, tiny.make_inputs(base, seed=2))
    with pytest.raises(ValueError, match="given different prompts"):
        plan_direct(a, pre_r, b, pre_b, ar.ReplayConfig(mode="direct", thresholds=[1.0]))


def test_mid_replay_offsets_go_to_the_input_of_the_inject_layer(pair):
    """patch() and apply() add mid-replay offsets where they were learned: at
    the input of layer inject_layer, not of layer 0."""
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=5, inject_layer=2)
    result = replay(base, rlvr, inputs, cfg)
    assert result.inject_layer == 2 and float(result.deltas.abs().max()) > 0
    visual = (inputs["input_ids"] == tiny.IMAGE_TOKEN_ID)[0]
    layers = rlvr.model.language_model.layers
    seen = []

    def logits_with_offsets_at(layer):
        def add(mod, args, kwargs):
            h = args[0].clone()
            h[0, visual] += result.deltas.to(h.dtype)
            return (h,) + args[1:], kwargs

        hook = layers[layer].register_forward_pre_hook(add, with_kwargs=True)
        try:
            with torch.no_grad():
                return rlvr(**inputs).logits
        finally:
            hook.remove()

    at_layer2, at_layer0 = logits_with_offsets_at(2), logits_with_offsets_at(0)
    assert not torch.allclose(at_layer2, at_layer0)  # where the offsets go matters
    with torch.no_grad():
        with ar.apply(rlvr, result):
            applied = rlvr(**inputs).logits
        with ar.patch(rlvr, base=base, config=cfg) as handle:
            patched = rlvr(**inputs).logits
            seen.append(handle.last)
    torch.testing.assert_close(applied, at_layer2, rtol=0, atol=0)
    torch.testing.assert_close(seen[0].deltas, result.deltas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(patched, at_layer2, rtol=1e-5, atol=1e-5)
    # generation: the prefill only, then decode steps through the KV cache
    with ar.patch(rlvr, base=base, config=cfg):
        out = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    with ar.apply(rlvr, result):
        again = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, again)
