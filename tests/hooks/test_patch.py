"""patch() on tiny random Qwen2-VL / Qwen2.5-VL pairs: the offsets added at the
prefill only, one replay per prefill, targets instead of a base model, a
conversation that grows, a prefill without input_ids. (patch() against
optimize() and apply(), and remove(), for every family: tests/models/test_families.py.)"""

import pytest
import torch
from helpers import PYTHON_DIR
from helpers import qwen_prompt as prompt

import actreplay_ext as ar
from actreplay_ext import tiny

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
LR = 1e-3


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    base, rlvr = tiny.pair(request.param)
    return request.param, base, rlvr


def test_patch_generate_equals_offsets_added_by_hand(pair):
    _, base, rlvr = pair
    inputs = prompt(rlvr)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=5)  # large enough to change the answer
    plain = rlvr.generate(**inputs, max_new_tokens=8, do_sample=False)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        patched = rlvr.generate(**inputs, max_new_tokens=8, do_sample=False)
        result = handle.last
    assert result is not None and result.replayed and len(result.losses) == 5

    # By hand: the same offsets added to the layer-0 input at the prefill only.
    visual = (inputs["input_ids"] == tiny.IMAGE_TOKEN_ID)[0]
    calls = []

    def add_offsets(mod, args, kwargs):
        h = args[0]
        if h.shape[1] == inputs["input_ids"].shape[1]:  # the prefill
            calls.append("prefill")
            h = h.clone()
            h[0, visual] = h[0, visual] + result.deltas.to(h.dtype)
            return (h,) + args[1:], kwargs
        calls.append("decode")
        return None

    hook = rlvr.model.language_model.layers[0].register_forward_pre_hook(add_offsets, with_kwargs=True)
    try:
        by_hand = rlvr.generate(**inputs, max_new_tokens=8, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(patched, by_hand)
    assert calls.count("prefill") == 1 and calls.count("decode") == 7
    with torch.no_grad():  # the offsets matter
        l0 = rlvr(**inputs).logits[:, -1]
    assert not torch.equal(plain, patched) or float(result.deltas.abs().max()) > 0
    assert l0 is not None


def test_patch_replays_once_per_prefill_and_not_in_decode(pair):
    _, base, rlvr = pair
    inputs = prompt(rlvr)
    seen = []
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=3, callback=lambda step, loss: seen.append(step))
    with ar.patch(rlvr, base=base, config=cfg):
        rlvr.generate(**inputs, max_new_tokens=5, do_sample=False)
        rlvr.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert seen == [0, 1, 2, 0, 1, 2]


def test_patch_without_base_warns_and_accepts_targets(pair):
    _, base, rlvr = pair
    inputs = prompt(rlvr)
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=2)
    with pytest.warns(UserWarning, match="generation is unchanged"):
        handle = ar.patch(rlvr, config=cfg)
    try:
        plain = rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.last is None
        handle.set_targets(ar.compute_targets(base, inputs, cfg))
        rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.last is not None and handle.last.replayed
        del plain
    finally:
        handle.remove()


def test_two_turn_conversation_replays_each_prefill():
    import sys

    sys.path.insert(0, PYTHON_DIR)
    import agent_loop

    base, rlvr = tiny.make_pair("qwen2_5_vl")
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=3)
    turn1 = dict(model=rlvr, **prompt(rlvr))
    seen = []
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**agent_loop.model_inputs(turn1), max_new_tokens=3, do_sample=False)
        seen.append(handle.last)
        turn2 = agent_loop.add_image(turn1, out[:, turn1["input_ids"].shape[1]:], (4, 8), seed=7)
        rlvr.generate(**agent_loop.model_inputs(turn2), max_new_tokens=3, do_sample=False)
        seen.append(handle.last)
        handle.reset()
        assert handle.last is None
    assert [sum(r.n_visual) for r in seen] == [16, 24]
    inputs2 = agent_loop.model_inputs(turn2)
    fresh = ar.optimize(rlvr, inputs2, ar.compute_targets(base, inputs2, cfg), cfg)
    assert torch.allclose(seen[1].deltas, fresh.deltas, rtol=0, atol=1e-6)


def test_prefill_without_input_ids_warns_instead_of_silently_skipping():
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    embeds = rlvr.get_input_embeddings()(torch.tensor([[5, 6, 7, 8]]))
    with ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=2, lr=LR, steps=2)) as handle:
        with pytest.warns(UserWarning, match="without input_ids"):
            with torch.no_grad():
                rlvr(inputs_embeds=embeds, attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert "no input_ids" in handle.last.note
