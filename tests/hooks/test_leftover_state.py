"""Nothing of a failed or foreign call reaches the next prompt. Under
transformers 5 `generate` encodes the images before its first forward: when it
then raises (a max_length shorter than the prompt), or the user calls the
vision tower (get_image_features) while the model is patched, those calls
belong to no prompt. They once stayed recorded, the next valid prompt claimed
them with its own, looked like one chunk of a longer prompt and was not
replayed (with a warning that blamed a KV cache)."""

import warnings

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny


def replayed(handle):
    return bool(handle.last is not None and handle.last.losses)


@pytest.mark.parametrize("family", tiny.available_families())
def test_a_generate_that_failed_after_encoding_leaves_nothing_behind(family):
    fam = tiny.FAMILIES_TINY[family]
    base, rlvr = fam.pair()
    x = fam.prompt(rlvr, "one_image")
    cfg = ar.ReplayConfig(layers=2, steps=2, lr=fam.lr)
    with ar.patch(rlvr, base=base, config=cfg) as h:
        with pytest.raises(ValueError, match="max_length"):
            rlvr.generate(**x, max_length=2, do_sample=False)  # shorter than the prompt
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no KV-cache warning either
            rlvr.generate(**x, max_new_tokens=2, do_sample=False)
        assert replayed(h), h.last.note


def test_the_users_own_vision_tower_calls_belong_to_no_prompt():
    base, rlvr = tiny.make_pair(noise=0.5)
    x = tiny.make_inputs(rlvr, images=[(8, 8)])
    other = tiny.make_inputs(rlvr, images=[(4, 6)], seed=3)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=2)
    with ar.patch(rlvr, base=base, config=cfg) as h:
        with torch.no_grad():  # the user's own call, another image
            rlvr.model.get_image_features(other["pixel_values"], other["image_grid_thw"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rlvr.generate(**x, max_new_tokens=2, do_sample=False)
        assert replayed(h), h.last.note
        first = h.last.deltas
        # and the replay is the one without the foreign call
    with ar.patch(rlvr, base=base, config=cfg) as h2:
        rlvr.generate(**x, max_new_tokens=2, do_sample=False)
    assert torch.equal(first, h2.last.deltas)
