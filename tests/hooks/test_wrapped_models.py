"""Models inside wrappers: `torch.compile(model)` and a PEFT `PeftModel` are
patched (and optimised, and applied to) as the model inside them, and a
generate or a forward through the wrapper is replayed as through the model.
A wrapper of an unsupported model names both.

peft is not a dependency: `PeftStandIn` and `TunerStandIn` mimic what the
library relies on in peft's `PeftModelForCausalLM` and its tuner
(`BaseTuner`, e.g. `LoraModel`): `peft_config`, `get_base_model()`,
`base_model` (the tuner) whose `model` is the wrapped model, a forward that
calls the tuner, whose forward runs `self.model.forward(...)` (not the
model's `__call__`, so hooks on the model alone miss it), and `generate`
handed down to the model's."""

import pytest
import torch
from helpers import hooks_of

import actreplay_ext as ar
from actreplay_ext import tiny

pytest.importorskip("transformers")


class TunerStandIn(torch.nn.Module):
    """peft.tuners.tuners_utils.BaseTuner's shape."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.peft_config = {"default": object()}

    def forward(self, *args, **kwargs):
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftStandIn(torch.nn.Module):
    """peft.PeftModelForCausalLM's shape (a LoRA-like tuner, not prompt learning)."""

    def __init__(self, model):
        super().__init__()
        self.base_model = TunerStandIn(model)
        self.peft_config = self.base_model.peft_config

    def get_base_model(self):
        return self.base_model.model

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair(noise=0.5)


def cfg():
    return ar.ReplayConfig(layers=3, lr=0.05, steps=3)


def replayed(base, rlvr, x):
    """(logits, greedy tokens) of the patched model itself."""
    with ar.patch(rlvr, base=base, config=cfg()), torch.no_grad():
        return rlvr(**x).logits, rlvr.generate(**x, max_new_tokens=3, do_sample=False)


def test_a_peft_model_is_patched_as_the_model_inside_it(pair):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    logits, tokens = replayed(base, rlvr, x)
    peft = PeftStandIn(rlvr)
    hooks = hooks_of(peft)
    with ar.patch(peft, base=PeftStandIn(base), config=cfg()) as handle, torch.no_grad():
        assert handle.model is rlvr
        assert torch.equal(peft(**x).logits, logits)  # PeftModel -> tuner -> model.forward
        assert torch.equal(peft.generate(**x, max_new_tokens=3, do_sample=False), tokens)
        with pytest.raises(RuntimeError, match="already has a live replay handle"):
            ar.patch(rlvr, base=base, config=cfg())  # the model inside has the handle
    assert hooks_of(peft) == hooks
    with torch.no_grad():
        assert not torch.equal(peft(**x).logits, logits)


def test_optimize_and_apply_take_a_peft_model(pair):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    logits, _ = replayed(base, rlvr, x)
    peft = PeftStandIn(rlvr)
    targets = ar.compute_targets(PeftStandIn(base), x, cfg())
    result = ar.optimize(peft, x, targets, cfg())
    with ar.apply(peft, result), torch.no_grad():
        assert torch.equal(peft(**x).logits, logits)


def test_a_compiled_model_is_patched_as_the_model_inside_it(pair):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    logits, tokens = replayed(base, rlvr, x)
    compiled = torch.compile(rlvr, backend="eager")  # dynamo's tracing, without a code generator's minutes
    with ar.patch(compiled, base=base, config=cfg()) as handle, torch.no_grad():
        assert handle.model is rlvr
        assert torch.equal(compiled.generate(**x, max_new_tokens=3, do_sample=False), tokens)
        assert torch.equal(compiled(**x).logits, logits)  # the replay's hooks run in the compiled forward
    with torch.no_grad():
        assert not torch.equal(compiled(**x).logits, logits)  # and are gone from it after remove()


def test_a_wrapper_of_an_unsupported_model_names_both():
    with pytest.raises(TypeError, match="argument 'model' is a PeftStandIn wrapping a Linear, which is not a "
                                        "supported model family"):
        ar.patch(PeftStandIn(torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="argument 'base' is a OptimizedModule wrapping a Linear, which is not"):
        ar.compute_targets(torch.compile(torch.nn.Linear(2, 2)), {})
