"""The library's passes see the model the user's forward sees: a pre-hook of the
user's on a decoder layer runs exactly once per pass, as in the model's own
forward. The prefill capture once took layer 0's input after the user's
pre-hooks had run, and the passes then called the layer again: the hook ran
twice and the targets were 0.04 nats off the model's own forward."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny


@pytest.fixture
def pair():
    return tiny.make_pair(noise=0.5)


def shift_hook(calls, amount=0.3):
    def hook(module, args, kwargs):
        calls.append(1)
        if args:
            return (args[0] + amount,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=kwargs["hidden_states"] + amount)
    return hook


@pytest.mark.parametrize("layer", [0, 1])
def test_a_users_layer_pre_hook_runs_once_in_the_base_pass(pair, layer):
    base, _ = pair
    x = tiny.make_inputs(base, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=3)
    calls = []
    handle = ar.get_adapter(base).decoder_layers()[layer].register_forward_pre_hook(shift_hook(calls),
                                                                                    with_kwargs=True)
    try:
        targets = ar.compute_targets(base, x, cfg)
        assert len(calls) == 1  # once, as in a forward of the model
        calls.clear()
        with torch.no_grad():
            out = base(**x, output_hidden_states=True)
        assert len(calls) == 1
    finally:
        handle.remove()
    # the entropies are those of the model's own forward (with the hook) at every replay layer
    ad = ar.get_adapter(base)
    vis = ad.visual_mask(x["input_ids"])[0]
    for l in range(cfg.depth):
        h = out.hidden_states[l + 1][0][vis]
        ent = reference.lens_entropy(h, ad.unembed(), ad.lens_norm_weight(), ad.norm_eps())[0]
        assert torch.allclose(targets.entropy[l], ent, rtol=1e-5, atol=1e-5), l


def test_a_users_layer_pre_hook_runs_once_per_step_in_the_loop_and_in_patch(pair):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=3)
    targets = ar.compute_targets(base, x, cfg)
    calls = []
    handle = ar.get_adapter(rlvr).decoder_layers()[0].register_forward_pre_hook(shift_hook(calls), with_kwargs=True)
    try:
        ar.optimize(rlvr, x, targets, cfg)
        assert len(calls) == cfg.steps  # one pass of layer 0 per step, none in the capture
        calls.clear()
        with ar.patch(rlvr, targets=targets, config=cfg):
            rlvr(**x)
        assert len(calls) == cfg.steps + 1  # the loop's steps, then the model's own forward
    finally:
        handle.remove()
