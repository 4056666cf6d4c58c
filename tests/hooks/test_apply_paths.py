"""`apply(result)` and `patch(targets=...)` serve the generation paths that
`patch(base=...)` serves, with what patch(base=...) generates: prompts
repeated (beams, Pass@K samples), generate without a cache (each step the
whole sequence), an assistant model (candidates checked with the prompt).
A result made on another model (wider, deeper) is refused by `apply` at
once, in one line naming the argument."""

import dataclasses

import pytest
import torch
from helpers import hooks_of, repeat_rows

import actreplay_ext as ar
from actreplay_ext import tiny

pytest.importorskip("transformers")

PATHS = {
    "no cache": dict(do_sample=False, use_cache=False),
    "beams": dict(do_sample=False, num_beams=2),
    "beams without a cache": dict(do_sample=False, num_beams=2, use_cache=False),
    "samples": dict(do_sample=True, num_return_sequences=2),
}


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair(noise=0.5)


def cfg(**kw):
    return ar.ReplayConfig(**{"layers": 3, "lr": 0.05, "steps": 3, **kw})


def generate(model, inputs, **kw):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=3, **kw)


def patched(base, rlvr, inputs, **kw):
    """What patch(base=...) generates."""
    with ar.patch(rlvr, base=base, config=cfg()):
        return generate(rlvr, inputs, **kw)


@pytest.mark.parametrize("path", list(PATHS))
def test_apply_generates_what_patch_generates(pair, path):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    result = ar.optimize(rlvr, x, ar.compute_targets(base, x, cfg()), cfg())
    with ar.apply(rlvr, result) as handle:
        applied = generate(rlvr, x, **PATHS[path])
    assert handle.last is result
    assert torch.equal(applied, patched(base, rlvr, x, **PATHS[path]))


@pytest.mark.parametrize("own", [True, False], ids=["own assistant", "other assistant"])
def test_apply_with_an_assistant_model_generates_what_patch_generates(pair, own):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    assistant = rlvr if own else tiny.make_model("qwen2_5_vl", seed=4)
    try:
        expected = patched(base, rlvr, x, do_sample=False, assistant_model=assistant)
    except (ValueError, TypeError, NotImplementedError) as e:  # a transformers that refuses the pairing
        pytest.skip(f"assisted decoding unavailable here: {e}")
    result = ar.optimize(rlvr, x, ar.compute_targets(base, x, cfg()), cfg())
    with ar.apply(rlvr, result):
        applied = generate(rlvr, x, do_sample=False, assistant_model=assistant)
    assert torch.equal(applied, expected)


def test_apply_still_refuses_a_prompt_that_only_starts_like_the_learned_one(pair):
    """A longer prompt is served only where what follows the learned one is text."""
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    result = ar.optimize(rlvr, x, ar.compute_targets(base, x, cfg()), cfg())
    image_id = ar.get_adapter(rlvr).visual_token_ids()[0]
    longer = dict(x, input_ids=torch.cat([x["input_ids"], torch.tensor([[image_id]])], 1),
                  attention_mask=torch.ones(1, x["input_ids"].shape[1] + 1, dtype=torch.long))
    with ar.apply(rlvr, result), torch.no_grad():
        with pytest.raises(ValueError, match="row 0 .* not a prompt the result was learned on, nor one followed by"):
            rlvr(**longer)


@pytest.mark.parametrize("path", ["beams", "samples"])
def test_patch_with_the_targets_of_one_prompt_serves_its_repeated_rows(pair, path):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    targets = ar.compute_targets(base, x, cfg())
    with ar.patch(rlvr, targets=targets, config=cfg()) as handle:
        out = generate(rlvr, x, **PATHS[path])
    assert handle.last.optimized_rows == 1 and len(handle.last.deltas) == 2
    assert torch.equal(out, patched(base, rlvr, x, **PATHS[path]))


def test_targets_of_repeated_rows_serve_the_prompt_once(pair):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    twice = repeat_rows(x, 2)  # as generate(num_return_sequences=2) expands it
    one = ar.optimize(rlvr, x, ar.compute_targets(base, twice, cfg()), cfg())
    assert torch.equal(one.deltas, ar.optimize(rlvr, x, ar.compute_targets(base, x, cfg()), cfg()).deltas)


def test_apply_of_a_result_from_a_wider_model_is_refused_at_once(pair):
    base, rlvr = pair
    wide_base, wide = tiny.make_pair(noise=0.5, hidden=128)
    x = tiny.make_inputs(wide)
    result = ar.optimize(wide, x, ar.compute_targets(wide_base, x, cfg()), cfg())
    hooks = hooks_of(rlvr)
    with pytest.raises(ValueError, match=r"^actreplay_ext.apply: argument 'result' holds offsets of hidden size 128, "
                                         r"but the model's hidden size is 64; it was learned on another model$"):
        ar.apply(rlvr, result)
    assert hooks_of(rlvr) == hooks


def test_apply_of_a_mid_replay_from_a_deeper_model_is_refused_at_once(pair):
    base, rlvr = pair
    deep_base, deep = tiny.make_pair(noise=0.5, layers=8)
    x = tiny.make_inputs(deep)
    mid = cfg(layers=8, inject_layer=7)
    result = ar.optimize(deep, x, ar.compute_targets(deep_base, x, mid), mid)
    hooks = hooks_of(rlvr)
    with pytest.raises(ValueError, match=r"^actreplay_ext.apply: argument 'result' adds its offsets at layer "
                                         r"inject_layer=7, but the model has 4 decoder layers \(0 .. 3\)"):
        ar.apply(rlvr, result)
    with pytest.raises(ValueError, match="argument 'result' adds its offsets at layer inject_layer=7"):
        ar.apply(rlvr, dataclasses.replace(result, deltas=result.deltas[:, :64]))  # the width alike
    assert hooks_of(rlvr) == hooks
