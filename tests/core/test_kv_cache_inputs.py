"""Inputs that continue from a KV cache are refused by name: the replay reads a prompt's
activations from position 0, and a forward given a filled cache reads the prompt from
the cache's positions on (the offsets came out some 0.03 off, without a word). An empty
cache changes nothing and is accepted."""

import pytest
import torch
from helpers import qwen_prompt as prompt

import actreplay_ext as ar
from actreplay_ext import tiny

CFG = ar.ReplayConfig(layers=3, lr=0.05, steps=3)
REFUSED = r"^actreplay_ext: argument 'inputs' carries a KV cache \('{key}' {held}\); the replay reads the whole prompt"


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair(noise=0.5)


def _filled_cache(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True).past_key_values


@pytest.mark.parametrize("key", ["past_key_values", "cache"])
def test_a_filled_cache_is_refused_by_every_entry_point(pair, key):
    base, rlvr = pair
    inputs = prompt(rlvr)
    cache = _filled_cache(rlvr, inputs)
    n = cache.get_seq_length()
    assert n == inputs["input_ids"].shape[1]
    cached = dict(inputs, **{key: cache})
    targets = ar.compute_targets(base, inputs, CFG)
    match = REFUSED.format(key=key, held=f"holds {n} cached positions")
    with pytest.raises(ValueError, match=match):
        ar.compute_targets(base, cached, CFG)
    with pytest.raises(ValueError, match=match):
        ar.optimize(rlvr, cached, targets, CFG)
    with pytest.raises(ValueError, match=match):
        ar.core.replay_loss(rlvr, cached, targets, torch.zeros(sum(targets.n_visual), 64), CFG)


def test_a_legacy_tuple_cache_is_refused(pair):
    base, rlvr = pair
    inputs = prompt(rlvr)
    legacy = ((torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16)),)
    with pytest.raises(ValueError, match=REFUSED.format(key="past_key_values", held="is a tuple")):
        ar.compute_targets(base, dict(inputs, past_key_values=legacy), CFG)


def test_an_empty_cache_changes_nothing(pair):
    transformers = pytest.importorskip("transformers")
    base, rlvr = pair
    inputs = prompt(rlvr)
    want = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, CFG), CFG)
    empty = dict(inputs, past_key_values=transformers.DynamicCache())
    got = ar.optimize(rlvr, empty, ar.compute_targets(base, empty, CFG), CFG)
    assert got.losses == want.losses and torch.equal(got.deltas, want.deltas)
