"""Replaying a model against an exact copy of itself (alignment="matched") is
the identity: the loss is exactly 0 at every step, the offsets stay exactly 0
for any lr, steps and rule, and every generation path transformers' own
generation tests exercise gives bitwise the unpatched result."""

import copy

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import ops, tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def twins():
    model = tiny.make_model("qwen2_5_vl")
    return copy.deepcopy(model), model


@pytest.mark.parametrize("kw", [dict(), dict(lr=1000.0, steps=5), dict(rule="topk", topk_tokens=0.5),
                                dict(select="high"), dict(normalize=False, layers=4)])
def test_the_loss_is_zero_and_the_offsets_stay_zero(twins, kw):
    base, model = twins
    inputs = tiny.make_inputs(model)
    cfg = ar.ReplayConfig(**{"layers": 3, "alignment": "matched", **kw})
    result = ar.optimize(model, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    assert sum(result.selected) > 0
    assert result.losses == [0.0] * cfg.steps
    assert torch.count_nonzero(result.deltas) == 0


def test_topk_logp_is_the_log_q_topk_kl_reads():
    g = torch.Generator().manual_seed(3)
    hidden, unembed, w = torch.randn(6, 16, generator=g), torch.randn(50, 16, generator=g), torch.rand(16, generator=g)
    idx = torch.stack([torch.randperm(50, generator=g)[:7] for _ in range(6)])
    logp = ops.topk_logp(hidden, unembed, w, 1e-6, idx)
    assert torch.allclose(logp, ar.reference.topk_logp(hidden, unembed, w, 1e-6, idx), rtol=0, atol=1e-5)
    h = hidden.clone().requires_grad_()
    kl = ops.topk_kl(h, unembed, w, 1e-6, idx, logp)
    assert torch.count_nonzero(kl) == 0
    (grad,) = torch.autograd.grad(kl.sum(), h)
    assert torch.count_nonzero(grad) == 0


PATHS = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=5),
    "sampling K": dict(do_sample=True, num_return_sequences=3),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "no cache": dict(do_sample=False, use_cache=False),
    "static cache": dict(do_sample=False, cache_implementation="static"),
    "outputs": dict(do_sample=False, output_hidden_states=True, output_attentions=True,
                    return_dict_in_generate=True, output_scores=True),
}


def _generate(model, inputs, kw, assistant=None):
    torch.manual_seed(0)
    extra = {"assistant_model": assistant} if assistant is not None else {}
    return model.generate(**inputs, max_new_tokens=4, **kw, **extra)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "sequences"):  # every tensor output (the cache object aside)
        return a.keys() == b.keys() and all(_same(getattr(a, k), getattr(b, k)) for k in a.keys()
                                            if k not in ("past_key_values", "cache"))
    return a == b


@pytest.mark.parametrize("path", list(PATHS))
def test_every_generation_path_is_bitwise_unpatched(twins, path):
    base, model = twins
    inputs = tiny.make_inputs(model)
    if path == "static cache" and not hasattr(transformers, "StaticCache"):
        pytest.skip("no static cache in this transformers")
    plain = _generate(model, inputs, PATHS[path])
    with ar.patch(model, base=base, config=ar.ReplayConfig(layers=3, alignment="matched")) as handle:
        patched = _generate(model, inputs, PATHS[path])
    assert handle.last.replayed and torch.count_nonzero(handle.last.flat_deltas()) == 0
    assert _same(patched, plain)


@pytest.mark.parametrize("own", [True, False])
def test_assisted_decoding_is_bitwise_unpatched(twins, own):
    """Assisted decoding, with the patched model as its own assistant or with another one."""
    base, model = twins
    inputs = tiny.make_inputs(model)
    assistant = model if own else tiny.make_model("qwen2_5_vl", seed=4)
    try:
        plain = _generate(model, inputs, dict(do_sample=False), assistant=assistant)
    except (ValueError, TypeError, NotImplementedError) as e:  # a transformers that refuses the pairing
        pytest.skip(f"assisted decoding unavailable here: {e}")
    with ar.patch(model, base=base, config=ar.ReplayConfig(layers=3, alignment="matched")):
        patched = _generate(model, inputs, dict(do_sample=False), assistant=assistant)
    assert torch.equal(patched, plain)


def test_train_mode_and_gradient_checkpointing_are_bitwise_unpatched(twins):
    base, model = twins
    inputs = tiny.make_inputs(model)
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    labels = inputs["input_ids"].clone()
    plain = model(**inputs, labels=labels)
    plain.loss.backward()
    plain_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    with ar.patch(model, base=base, config=ar.ReplayConfig(layers=3, alignment="matched")) as handle:
        patched = model(**inputs, labels=labels)
        patched.loss.backward()
    assert handle.last.replayed
    assert torch.equal(patched.logits, plain.logits) and torch.equal(patched.loss, plain.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(plain_grads) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


# ------------------------------------------------------------------ float64
# A float64 model replayed against itself is exact too: the targets stay float64 in the loss
# (they were rounded to float32: losses of 1e-10) and the offsets are added in float64 (a
# float32 rounding changed the hidden state even with zero offsets).


@pytest.fixture(scope="module")
def twins64(twins):
    base, model = twins
    return copy.deepcopy(base).double(), copy.deepcopy(model).double()


@pytest.mark.parametrize("kw", [dict(), dict(lr=1000.0, steps=5), dict(layers=4, normalize=False)])
def test_a_float64_model_against_itself_has_loss_and_offsets_exactly_zero(twins64, kw):
    base, model = twins64
    inputs = tiny.make_inputs(model)
    cfg = ar.ReplayConfig(**{"layers": 3, "alignment": "matched", **kw})
    targets = ar.compute_targets(base, inputs, cfg)
    assert targets.target_logp[0].dtype == torch.float64
    result = ar.optimize(model, inputs, targets, cfg)
    assert sum(result.selected) > 0
    assert result.losses == [0.0] * cfg.steps
    assert torch.count_nonzero(result.deltas) == 0


def test_a_float64_models_targets_round_trip_through_a_file(twins64, tmp_path):
    """Saved float64 targets load as saved (their entropy was refused for not being float32)."""
    base, model = twins64
    inputs = tiny.make_inputs(model)
    cfg = ar.ReplayConfig(layers=3, alignment="matched", steps=3)
    targets = ar.compute_targets(base, inputs, cfg)
    targets.save(str(tmp_path / "t.safetensors"))
    loaded = ar.ReplayTargets.load(str(tmp_path / "t.safetensors"))
    assert loaded.entropy.dtype == torch.float64 and torch.equal(loaded.entropy, targets.entropy)
    assert all(torch.equal(a, b) for a, b in zip(loaded.target_logp, targets.target_logp))
    result = ar.optimize(model, inputs, loaded, cfg)
    assert result.losses == [0.0] * cfg.steps and torch.count_nonzero(result.deltas) == 0


def test_a_float64_model_patched_against_itself_generates_bitwise_unpatched(twins64):
    base, model = twins64
    inputs = tiny.make_inputs(model)
    plain = _generate(model, inputs, PATHS["outputs"])
    with ar.patch(model, base=base, config=ar.ReplayConfig(layers=3, alignment="matched")) as handle:
        patched = _generate(model, inputs, PATHS["outputs"])
    assert handle.last.losses == [0.0] * handle.last.config["steps"]
    assert _same(patched, plain)
