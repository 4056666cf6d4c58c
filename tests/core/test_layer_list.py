"""ReplayConfig(layers=[...]): the replay layers as an explicit list (the
authors' form) as well as a count. The layers left out below the deepest select
no token; everything else is the count's machinery, checked against the
published loop extended to lists, against the count form where they must
agree, and through targets files and `actreplay run`."""

import dataclasses

import pytest
import torch
from helpers import replay, replay_and_published

import actreplay_ext as ar
from actreplay_ext import reference, tiny

LR = 1e-3


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair("qwen2_5_vl")


# ------------------------------------------------------------- the config


@pytest.mark.parametrize("bad", [[], [3, 1], [1, 1], [-1], [True], [1.0], ["2"], (0, 2, 2)])
def test_bad_lists_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"'layers' must be a count >= 1 or a non-empty list .* ascending"):
        ar.ReplayConfig(layers=bad)


def test_a_list_0_to_n_is_the_count_n():
    listed = ar.ReplayConfig(layers=[0, 1, 2])
    assert listed.layers == 3 and listed == ar.ReplayConfig(layers=3)
    assert listed.replay_layers == (0, 1, 2) and listed.depth == 3 and listed.off_layers() == []


def test_list_properties_and_round_trips():
    cfg = ar.ReplayConfig(layers=[1, 3], rule="absolute", thresholds=[0.5, 2.0])
    assert cfg.layers == (1, 3) and cfg.replay_layers == (1, 3) and cfg.depth == 4
    assert cfg.off_layers() == [0, 2]
    assert cfg.thresholds_by_layer() == [0.0, 0.5, 0.0, 2.0]
    assert cfg.as_dict()["layers"] == [1, 3]  # JSON values
    assert ar.ReplayConfig(**cfg.as_dict()) == cfg
    assert dataclasses.replace(cfg, lr=1.0).layers == (1, 3)  # a copy keeps the list


def test_a_listed_layer_below_the_inject_layer_is_refused_and_a_range_is_a_list():
    """The loss reads layers inject_layer and deeper: listing a layer above the
    offsets is a mistake (a count below inject_layer is the published mid replay)."""
    with pytest.raises(ValueError, match=r"'layers' lists \[0\] below 'inject_layer' \(2\)"):
        ar.ReplayConfig(layers=[0, 3], inject_layer=2)
    assert ar.ReplayConfig(layers=16, inject_layer=15).replay_layers == tuple(range(16))
    assert ar.ReplayConfig(layers=[2, 3], inject_layer=2).replay_layers == (2, 3)
    assert ar.ReplayConfig(layers=range(3)).layers == 3 and ar.ReplayConfig(layers=range(1, 4)).layers == (1, 2, 3)


def test_list_constraints_name_the_field():
    with pytest.raises(ValueError, match=r"'inject_layer' must be an int in \[0, 4\)"):
        ar.ReplayConfig(layers=[1, 3], inject_layer=4)
    with pytest.raises(ValueError, match=r"one float per replay layer \(2\)"):
        ar.ReplayConfig(layers=[1, 3], rule="absolute", thresholds=[0.5, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"one float per replay layer \(2\)"):
        ar.ReplayConfig(mode="direct", layers=[0, 2])  # the published seven thresholds do not fit
    base, rlvr = tiny.make_pair("qwen2_5_vl")  # 4 decoder layers
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    with pytest.raises(ValueError, match=r"config.layers = \(1, 4\) exceeds the 4 decoder layers"):
        ar.compute_targets(base, inputs, ar.ReplayConfig(layers=[1, 4]))


# ------------------------------------------------------------- the replay


@pytest.mark.parametrize("layers,extra", [([1, 3], {}), ([0, 2], {"select": "high"}), ([2], {}),
                                          ([0, 3], {"rule": "absolute", "thresholds": [1.0, 0.8]}),
                                          ([1, 2], {"inject_layer": 1})])
def test_list_matches_the_published_loop(pair, layers, extra):
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)], video=(2, 4, 4))
    cfg = ar.ReplayConfig(layers=layers, lr=LR, steps=8, **extra)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert result.selected == pub["selected"] and len(result.selected) == cfg.depth
    assert all(result.selected[l] == 0 for l in cfg.off_layers()) and sum(result.selected) > 0
    assert float((result.deltas - pub["deltas"]).abs().max() / pub["deltas"].abs().max()) <= 1e-4
    for ours, theirs in zip(result.losses, pub["losses"]):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)


def test_listed_layers_select_as_the_count_does(pair):
    """Selection is per layer: a listed layer's tokens and targets are the count's at that layer."""
    base, _ = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    full = ar.compute_targets(base, inputs, ar.ReplayConfig(layers=4))
    some = ar.compute_targets(base, inputs, ar.ReplayConfig(layers=[1, 3]))
    assert some.selected_counts() == [0, full.selected_counts()[1], 0, full.selected_counts()[3]]
    for l in (1, 3):
        assert torch.equal(some.selected[l], full.selected[l])
        assert torch.equal(some.target_idx[l], full.target_idx[l])
        assert torch.equal(some.target_logp[l], full.target_logp[l])


def test_mid_replay_in_the_authors_form_is_the_count_form(pair):
    """layers=[m], inject_layer=m (the authors' way to write the mid replay) learns
    exactly what layers=m+1, inject_layer=m learns."""
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    listed = replay(base, rlvr, inputs, ar.ReplayConfig(layers=[2], inject_layer=2, lr=0.05, steps=5))
    counted = replay(base, rlvr, inputs, ar.ReplayConfig(layers=3, inject_layer=2, lr=0.05, steps=5))
    assert listed.selected == counted.selected and float(listed.deltas.abs().max()) > 0
    assert torch.equal(listed.deltas, counted.deltas) and listed.losses == counted.losses


def test_patch_generate_with_a_list_equals_apply(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=[1, 3], lr=0.05, steps=4)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    result = replay(base, rlvr, inputs, cfg)
    assert handle.last.selected == result.selected and handle.last.config["layers"] == [1, 3]
    torch.testing.assert_close(handle.last.deltas, result.deltas, rtol=1e-6, atol=1e-7)
    with ar.apply(rlvr, result):
        again = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, again)


def test_direct_substitution_at_listed_layers_matches_published():
    base, rlvr = tiny.make_pair("qwen2_5_vl", noise=0.2)
    inputs = tiny.make_inputs(base, images=[(8, 8)], video=(2, 4, 4))
    cfg = ar.ReplayConfig(mode="direct", layers=[0, 2], thresholds=[2.5, 2.5])
    full = reference.published_direct(rlvr, base, inputs, ar.ReplayConfig(mode="direct", thresholds=[2.5] * 3))
    ref_out = reference.published_direct(rlvr, base, inputs, cfg)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        with torch.no_grad():
            ours = rlvr(**inputs).logits
    assert handle.last.selected == ref_out["counts"] == [full["counts"][0], 0, full["counts"][2]]
    assert ref_out["counts"][0] > 0 and full["counts"][1] > 0  # layer 1 would have substituted
    torch.testing.assert_close(ours, ref_out["logits"], rtol=0, atol=1e-5)
    assert not torch.allclose(ref_out["logits"], full["logits"], atol=1e-4)


# ------------------------------------------------------------- files


def test_targets_file_with_a_list(pair, tmp_path):
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=[1, 3], lr=0.05, steps=3)
    targets = ar.compute_targets(base, inputs, cfg)
    targets.save(str(tmp_path / "t.safetensors"))
    loaded = ar.ReplayTargets.load(str(tmp_path / "t.safetensors"))
    assert loaded.config["layers"] == [1, 3] and loaded.layers == 4
    a, b = ar.optimize(rlvr, inputs, targets, cfg), ar.optimize(rlvr, inputs, loaded, cfg)
    assert torch.equal(a.deltas, b.deltas)
    with pytest.raises(ValueError, match="another configuration"):
        ar.optimize(rlvr, inputs, loaded, ar.ReplayConfig(layers=4, lr=0.05, steps=3))
    result_path = str(tmp_path / "r.safetensors")
    a.save(result_path)
    assert ar.ReplayResult.load(result_path).config["layers"] == [1, 3]
