"""Every way researchers and eval harnesses call a patched model gives the
right replay or a clear error, never a silent wrong answer: inference mode,
patching twice, prefills over a cache, use_cache=False, failed forwards, apply
on another prompt, non-finite updates, configs, positional calls, train mode,
threads, and the library's own forwards kept out of the user's outputs."""

import copy
import threading

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.core import in_internal_forward

transformers = pytest.importorskip("transformers")
V5 = not transformers.__version__.startswith("4.")
LR = 1e-3


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair("qwen2_5_vl")


def cfg(**kw):
    return ar.ReplayConfig(**{"layers": 3, "lr": LR, "steps": 3, **kw})


def optimized(base, rlvr, inputs, config):
    return ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, config), config)


def greedy(model, inputs, **kw):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, **kw)


# -------------------------------------------------------------- inference mode


def test_inference_mode_around_generate_and_optimize(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    ref = optimized(base, rlvr, inputs, cfg())
    with torch.inference_mode():
        inside = optimized(base, rlvr, inputs, cfg())
        with ar.patch(rlvr, base=base, config=cfg()) as handle:
            greedy(rlvr, inputs)
    assert torch.equal(inside.deltas, ref.deltas)
    assert torch.allclose(handle.last.deltas, ref.deltas, rtol=0, atol=1e-6)
    assert all(p.requires_grad for p in rlvr.parameters())


# ------------------------------------------------------------- one live handle


def test_patching_a_patched_model_is_an_error_naming_the_handle(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    with ar.patch(rlvr, base=base, config=cfg()) as first:
        with pytest.raises(RuntimeError, match="already has a live replay handle.*TokenReplay"):
            ar.patch(rlvr, base=base, config=cfg())
        with pytest.raises(RuntimeError, match="already has a live replay handle"):
            with ar.apply(rlvr, optimized(base, rlvr, inputs, cfg())):
                pass
        assert first.active
    with ar.patch(rlvr, base=base, config=cfg()) as again:  # after remove() it may be patched again
        assert again.active


# --------------------------------------------------- prefills over a KV cache


@pytest.mark.skipif(not V5, reason="prefill chunking with encoded images is transformers 5.x generate")
def test_chunked_prefill_is_not_replayed_in_part_and_warns(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)  # the image tokens span the first two 16-token chunks
    plain = greedy(rlvr, inputs, prefill_chunk_size=16)
    with ar.patch(rlvr, base=base, config=cfg()) as handle:
        with pytest.warns(UserWarning, match="non-empty KV cache or as one chunk of a longer prompt"):
            out = greedy(rlvr, inputs, prefill_chunk_size=16)
    assert torch.equal(out, plain)
    assert "over a KV cache" in handle.last.note and not handle.last.replayed


def test_visual_tokens_over_a_cache_warn_instead_of_decoding_silently(pair):
    """Prefix caching: generate given the cache of the prompt's first text tokens
    runs the rest, images included, over that cache."""
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    head = {k: v[:, :8] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        cache = rlvr(**head, use_cache=True).past_key_values
    plain = greedy(rlvr, inputs, past_key_values=copy.deepcopy(cache))
    with ar.patch(rlvr, base=base, config=cfg()) as handle:
        with pytest.warns(UserWarning, match="over a non-empty KV cache"):
            out = greedy(rlvr, inputs, past_key_values=copy.deepcopy(cache))
    assert torch.equal(out, plain)
    assert "over a KV cache" in handle.last.note and not handle.last.replayed


def test_generate_without_a_cache_replays_once_with_the_same_offsets(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    steps = []
    config = cfg(callback=lambda step, loss: steps.append(step))
    with ar.patch(rlvr, base=base, config=config) as handle:
        cached = greedy(rlvr, inputs)
        with_cache = handle.last
        steps.clear()
        uncached = greedy(rlvr, inputs, use_cache=False)
    assert steps == [0, 1, 2]  # one replay for the prompt, none for the steps that extend it
    assert torch.equal(uncached, cached)
    assert torch.equal(handle.last.deltas, with_cache.deltas)


def test_direct_mode_without_a_cache_substitutes_like_with_one(pair):
    """mode='direct' under generate(use_cache=False): the prompt's plan at every step, in inference mode too."""
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    config = ar.ReplayConfig.preset("deepeyes-7b", layers=3, thresholds=[5.0, 5.0, 5.0])
    with torch.inference_mode(), ar.patch(rlvr, base=base, config=config) as handle:
        cached = greedy(rlvr, inputs)
        uncached = greedy(rlvr, inputs, use_cache=False)
    assert sum(handle.last.selected) > 0 and torch.equal(uncached, cached)


def test_placeholder_tokens_without_images_are_not_replayed(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    text_only = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with ar.patch(rlvr, base=base, config=cfg()) as handle, torch.no_grad():
        rlvr(**text_only)
    assert "without images or videos" in handle.last.note and not handle.last.replayed


# ------------------------------------------------------- per-forward state


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_mid_replay_forward_leaves_nothing_for_the_next_prompt(pair, error):
    """The offsets of a mid replay wait for layer inject_layer's input; a forward
    that raises before it gets there (an Exception, or a KeyboardInterrupt, for
    which forward hooks' always_call does not run) must not hand them to the next prompt."""
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    text = tiny.make_inputs(rlvr, images=[], seed=5)
    with torch.no_grad():
        plain = rlvr(**text).logits
    layer1 = rlvr.model.language_model.layers[1]

    def boom(mod, args):  # in the user's forward, not in the library's own runs of the layers
        if not in_internal_forward():
            raise error("a failure between layer 0 and the inject layer")

    with ar.patch(rlvr, base=base, config=cfg(inject_layer=2)):
        hook = layer1.register_forward_pre_hook(boom)
        try:
            with pytest.raises(error), torch.no_grad():
                rlvr(**inputs)
        finally:
            hook.remove()
        with torch.no_grad():
            after = rlvr(**text).logits
    assert torch.equal(after, plain)


# ------------------------------------------------------------------ apply


def test_apply_refuses_another_prompt_and_broadcasts_over_repeated_rows(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    other = tiny.make_inputs(rlvr, seed=3)  # the same visual-token count, other text
    result = optimized(base, rlvr, inputs, cfg())
    with ar.apply(rlvr, result), torch.no_grad():
        with pytest.raises(ValueError, match="not a prompt the result was learned on"):
            rlvr(**other)
    with ar.patch(rlvr, base=base, config=cfg()) as handle:
        torch.manual_seed(0)
        patched = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    with ar.apply(rlvr, result):
        torch.manual_seed(0)
        applied = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    assert handle.last.optimized_rows == 1
    assert torch.equal(applied, patched)


# ---------------------------------------------------------------- finiteness


def test_an_update_that_overflows_raises(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    with pytest.raises(FloatingPointError, match="offsets are not finite after the update of step 0"):
        optimized(base, rlvr, inputs, cfg(lr=1e300, steps=1))


# ------------------------------------------------------------------- configs


@pytest.mark.parametrize("field,value", [
    ("entropy_threshold", float("inf")), ("entropy_threshold", float("nan")), ("lr", float("inf")),
    ("lr", float("nan")), ("lr", "10"), ("layers", True),  # lr=None is the optimizer's default
    ("optimizer", None), ("optimizer", "SGD"), ("tol", "0.1"), ("tol", float("inf")), ("layers", [2, 1]),
    ("steps", 2.0), ("topv", "50"),
    ("normalize", "no"), ("normalize", 1), ("checkpoint", 1), ("callback", 3), ("alignment", None),
    ("mode", 1), ("inject_layer", -1), ("inject_layer", True),
])
def test_config_fields_are_checked_by_type_and_finiteness(field, value):
    with pytest.raises(ValueError, match=f"'{field}' must"):
        ar.ReplayConfig(**{field: value})


def test_config_inject_layer_with_direct_mode_is_refused():
    with pytest.raises(ValueError, match="'inject_layer' .* applies to mode='tokens'"):
        ar.ReplayConfig(mode="direct", inject_layer=2)
    with pytest.raises(ValueError, match=r"'thresholds\[1\]' must be a finite number"):
        ar.ReplayConfig(rule="absolute", layers=2, thresholds=[1.0, float("nan")])


def test_a_config_changed_after_patch_does_not_reach_the_handle(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    config = cfg()
    ref = optimized(base, rlvr, inputs, cfg())
    with ar.patch(rlvr, base=base, config=config) as handle:
        config.layers = 99
        config.steps = 0
        greedy(rlvr, inputs)
    assert handle.config.layers == 3 and torch.allclose(handle.last.deltas, ref.deltas, rtol=0, atol=1e-6)


# ------------------------------------------------------------ calling styles


def test_a_positional_call_is_replayed_like_a_keyword_call(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with ar.patch(rlvr, base=base, config=cfg()) as handle, torch.no_grad():
        by_name = rlvr(**inputs).logits
        named = handle.last
        by_position = rlvr(inputs["input_ids"], **rest).logits
    assert handle.last.replayed and torch.equal(handle.last.deltas, named.deltas)
    assert torch.equal(by_position, by_name)


def _with_dropout(model, p):
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = p


def test_train_mode_dropout_and_checkpointing_leave_the_replay_deterministic(pair):
    """The loop runs with dropout off (eval mode) and without HF's reentrant
    gradient checkpointing, and the model's modes are restored after."""
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    ref = optimized(base, rlvr, inputs, cfg())
    model = copy.deepcopy(rlvr)
    _with_dropout(model, 0.5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    try:
        first = optimized(base, model, inputs, cfg())
        second = optimized(base, model, inputs, cfg())
        assert torch.equal(first.deltas, second.deltas)
        assert torch.allclose(first.deltas, ref.deltas, rtol=0, atol=1e-6)
        with ar.patch(model, base=base, config=cfg()) as handle:
            model(**inputs)
        assert torch.allclose(handle.last.deltas, ref.deltas, rtol=0, atol=1e-6)
        assert all(m.training for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize("bases", ["shared", "separate"])
def test_two_patched_models_in_two_threads(pair, bases):
    base, rlvr = pair
    other = tiny.perturbed_copy(base, 0.05, seed=77)
    other_base = base if bases == "shared" else copy.deepcopy(base)
    inputs = tiny.make_inputs(rlvr)
    expected = [optimized(b, m, inputs, cfg()).deltas for b, m in ((base, rlvr), (other_base, other))]
    results, errors = [None, None], []

    def run(i, model, model_base):
        try:
            with ar.patch(model, base=model_base, config=cfg()) as handle:
                for _ in range(3):
                    greedy(model, inputs)
                    results[i] = handle.last.deltas
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    pairs = ((rlvr, base), (other, other_base))
    threads = [threading.Thread(target=run, args=(i, m, b)) for i, (m, b) in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert all(p.requires_grad for m in (base, other_base, rlvr, other) for p in m.parameters())
    assert base.model.rope_deltas is None and other_base.model.rope_deltas is None


# ------------------------------------------- the library's forwards are not the user's


def test_internal_forwards_do_not_reach_the_users_outputs(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    with torch.no_grad():
        plain = rlvr(**inputs, output_hidden_states=True, output_attentions=True)
        with ar.patch(rlvr, base=base, config=cfg()) as handle:
            patched = rlvr(**inputs, output_hidden_states=True, output_attentions=True)
    assert handle.last.replayed
    assert len(patched.hidden_states) == len(plain.hidden_states)
    assert len(patched.attentions) == len(plain.attentions)
    # The first hidden state differs at most by the offsets: text positions are untouched.
    text = inputs["input_ids"] != rlvr.config.image_token_id
    assert torch.equal(patched.hidden_states[0][text], plain.hidden_states[0][text])
    assert all(a.shape == b.shape for a, b in zip(patched.attentions, plain.attentions))
