"""What every model family must satisfy, on its tiny random pair from
`tiny.FAMILIES_TINY` (families whose class this transformers lacks are
skipped): the adapter finds the model's parts; the replay equals the published
loop in both alignments; patch()ed generate equals optimize() and apply();
Pass@K rows are optimised once; remove() (or an exception in the loop) leaves
the model as it was; a text-only prompt is not touched.

The suite parametrizes over the registry: where a family's parts are, its
prompts and its replay configurations are its `TinyFamily` entry, so a new
family needs no edit here. What only one family has (deepstack, anyres tiling,
per-type masks, image tiles, ...) is tested in that family's file; the few
extra checks of the generic tests that are one family's own are in
`EXTRA_CHECKS` (optional: a family without an entry gets the generic checks)."""

from dataclasses import dataclass
from functools import reduce
from typing import Callable, Dict, Optional

import pytest
import torch
from helpers import (
    FirstLayer0Input,
    LayerBatchSizes,
    assert_matches_published,
    base_saw,
    greedy_scores,
    hooks_of,
    repeat_rows,
    replay,
    replay_and_published,
)

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.core import capture_prefill
from actreplay_ext.models.gemma3 import Gemma3Adapter
from actreplay_ext.models.idefics3 import Idefics3Adapter
from actreplay_ext.models.llava import LlavaAdapter
from actreplay_ext.models.llava_onevision import LlavaOnevisionAdapter
from actreplay_ext.models.qwen2_vl import QwenVLAdapter
from actreplay_ext.models.qwen3_vl import Qwen3VLAdapter

FAMILIES = tiny.FAMILIES_TINY


def _none(*args):
    pass


@dataclass(frozen=True)
class Extra:
    """One family's own checks, on top of the generic ones."""

    #: the exact adapter class get_adapter must pick (None: the one that lists the class)
    adapter: Optional[type] = None
    #: called with (model, adapter), (result,) of the parity replay, (rlvr, handle.last) after patch
    parts: Callable = _none
    parity: Callable = _none
    after_patch: Callable = _none


def falls_smoothly(result):
    assert result.losses[-1] < 0.8 * result.losses[0]  # the loss falls
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.losses, result.losses[1:]))  # smoothly


def real_subset_at_every_layer(result):
    n = tiny.qwen3_vl_tokens()
    assert all(0 < s < n for s in result.selected)  # a real subset at every layer


def tokens_per_image(n):
    def check(model, ad):
        assert ad.image_tokens() == n

    return check


def gemma3_parts(model, ad):
    tokens_per_image(tiny.GEMMA3_TOKENS_PER_IMAGE)(model, ad)
    assert ad.layer_types() == tiny.GEMMA3_LAYER_TYPES
    # Gemma's RMSNorm scales by 1 + weight; finish() sharpened that (the weight starts at zero).
    lm = model.model.language_model
    assert torch.allclose(ad.lens_norm_weight(), torch.full((64,), tiny.GEMMA3_SHARPEN))
    assert torch.allclose(lm.norm.weight, torch.full((64,), tiny.GEMMA3_SHARPEN - 1.0))


def qwen3_parts(model, ad):
    lm = model.model.language_model
    assert ad.tokens_per_item(torch.tensor([[1, 8, 8], [1, 6, 8], [2, 4, 4]])).tolist() == [16, 12, 8]
    assert ad.layer_loop_module() is lm and ad.deepstack_layers() == 2


def qwen3_moe_parts(model, ad):
    qwen3_parts(model, ad)
    assert "moe" in type(model.model.language_model.layers[0].mlp).__name__.lower()  # the layers really are MoE


def rope_deltas_left_as_generate_set_them(rlvr, last):
    assert rlvr.model.rope_deltas is not None  # generate's own state, left as generate set it


_QWEN2 = Extra(QwenVLAdapter, parity=falls_smoothly)
_IDEFICS3 = Extra(Idefics3Adapter, parts=tokens_per_image(tiny.IDEFICS3_TOKENS_PER_IMAGE))

#: Family-specific extra checks, by family name; optional.
EXTRA_CHECKS: Dict[str, Extra] = {
    "qwen2_vl": _QWEN2,
    "qwen2_5_vl": _QWEN2,
    "llava": Extra(LlavaAdapter, parts=tokens_per_image(tiny.LLAVA_TOKENS_PER_IMAGE)),
    "llava_onevision": Extra(LlavaOnevisionAdapter),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "gemma3": Extra(Gemma3Adapter, parts=gemma3_parts),
    "qwen3_vl": Extra(Qwen3VLAdapter, parts=qwen3_parts, parity=real_subset_at_every_layer,
                      after_patch=rope_deltas_left_as_generate_set_them),
    "qwen3_vl_moe": Extra(Qwen3VLAdapter, parts=qwen3_moe_parts, after_patch=rope_deltas_left_as_generate_set_them),
}
assert set(EXTRA_CHECKS) <= set(FAMILIES), "EXTRA_CHECKS names a family the tiny registry lacks"


def extra(name) -> Extra:
    return EXTRA_CHECKS.get(name, Extra())


def _param(name, *values, id=None):
    fam = FAMILIES[name]
    skip = pytest.mark.skipif(not fam.available, reason=f"this transformers has no {fam.class_name}")
    return pytest.param(name, *values, id=id or name, marks=skip)


NAMES = [_param(name) for name in FAMILIES]
PATCH_CASES = [_param(name, kw, id="-".join([name, *(f"{k}={v}" for k, v in kw.items())]))
               for name, fam in FAMILIES.items() for kw in fam.patch_prompts]


class Pairs(dict):
    """(base, rlvr) per family, built on first use."""

    def __missing__(self, name):
        self[name] = tiny.pair(name)
        return self[name]


@pytest.fixture(scope="module")
def pairs():
    return Pairs()


def prompt(name, model, purpose=None, **kw):
    """The family's parity prompt, or the one for `purpose` (its TinyFamily.prompts);
    without the empty pixel tensors of a prompt with no images."""
    return {k: v for k, v in FAMILIES[name].prompt(model, purpose, **kw).items() if v.numel() > 0}


def n_visual(model, inputs):
    return int(ar.get_adapter(model).visual_mask(inputs["input_ids"]).sum())


def attr(obj, path):
    return reduce(getattr, path.split("."), obj)


# ------------------------------------------------------------------ adapter


@pytest.mark.parametrize("name", NAMES)
def test_adapter_locates_the_parts(pairs, name):
    base, _ = pairs[name]
    fam, e = FAMILIES[name], extra(name)
    ad = ar.get_adapter(base)
    assert fam.class_name in type(ad).model_classes and type(base).__name__ == fam.class_name
    assert e.adapter is None or type(ad) is e.adapter
    assert fam.class_name in ar.supported_families()
    text = attr(base, fam.text_model_path)
    assert ad.text_model() is text
    assert ad.decoder_layers() is text.layers and ad.num_layers == 4
    assert ad.final_norm() is text.norm and ad.norm_eps() == pytest.approx(1e-6)
    assert ad.unembed() is base.lm_head.weight and ad.vocab_size == 1000 and ad.hidden_size == 64
    assert ad.vision_tower() is attr(base, fam.vision_tower_path)
    assert ad.visual_token_ids() == list(fam.visual_token_ids)
    assert n_visual(base, fam.prompt(base)) == fam.n_visual  # the registry's count of the parity prompt
    e.parts(base, ad)


# ------------------------------------------------------------------- parity


@pytest.mark.parametrize("alignment", ["published", "matched"])
@pytest.mark.parametrize("name", NAMES)
def test_optimize_matches_published_loop(pairs, name, alignment):
    fam = FAMILIES[name]
    base, rlvr = pairs[name]
    inputs = fam.prompt(base)
    cfg = ar.ReplayConfig(layers=fam.layers, lr=fam.lr, steps=fam.steps, alignment=alignment)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)

    assert_matches_published(result, pub, n_visual=fam.n_visual, hidden=64, steps=fam.steps)
    extra(name).parity(result)


# ------------------------------------------------------------------- patch


@pytest.mark.parametrize("name,kw", PATCH_CASES)
def test_patch_generate_equals_optimize_and_apply(pairs, name, kw):
    """patch()ed generate replays the offsets optimize() finds, and apply()
    of those offsets generates the same tokens and scores; the offsets reach
    the generation; no hook remains."""
    fam = FAMILIES[name]
    base, rlvr = pairs[name]
    inputs = prompt(name, base, **kw)
    cfg = ar.ReplayConfig(layers=fam.layers, lr=fam.lr, steps=fam.patch_steps)
    before = hooks_of(rlvr)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        assert hooks_of(rlvr) > before
        seq_patch, scores_patch = greedy_scores(rlvr, inputs, fam.patch_tokens)
        last = handle.last
    assert hooks_of(rlvr) == before  # no hooks remain
    extra(name).after_patch(rlvr, last)
    result = replay(base, rlvr, inputs, cfg)
    assert last is not None and last.replayed and sum(last.selected) > 0
    assert last.n_visual == [n_visual(base, inputs)]
    assert torch.allclose(last.deltas, result.deltas, rtol=0, atol=1e-6)
    assert last.losses == pytest.approx(result.losses, rel=1e-6)
    with ar.apply(rlvr, result):
        seq_apply, scores_apply = greedy_scores(rlvr, inputs, fam.patch_tokens)
    assert hooks_of(rlvr) == before
    _, scores_plain = greedy_scores(rlvr, inputs, fam.patch_tokens)
    assert torch.equal(seq_patch, seq_apply)
    assert torch.allclose(scores_patch, scores_apply, rtol=0, atol=1e-5)
    # ... and the offsets do reach the generation.
    assert float((scores_apply - scores_plain).abs().max()) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_apply_changes_the_prefill_as_patch_does(pairs, name):
    """The offsets reach the logits (so equal generations mean something), and
    patch() and apply() give the same prefill logits."""
    base, rlvr = pairs[name]
    inputs = prompt(name, base, "prefill")
    fwd = ar.get_adapter(rlvr).forward_inputs(inputs)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=3)  # large enough to change the answer
    result = replay(base, rlvr, inputs, cfg)
    before = hooks_of(rlvr)
    with torch.no_grad():
        plain = rlvr(**fwd).logits
        with ar.patch(rlvr, base=base, config=cfg):
            patched = rlvr(**fwd).logits
        with ar.apply(rlvr, result):
            applied = rlvr(**fwd).logits
    assert torch.allclose(applied, patched, rtol=0, atol=1e-5)
    assert float((applied - plain).abs().max()) > 1e-3
    assert hooks_of(rlvr) == before == 0


@pytest.mark.parametrize("name", NAMES)
def test_pass_at_k_optimises_once(pairs, name):
    """generate(num_return_sequences=2, do_sample=True) on a one-image prompt:
    the two rows are the prompt twice (for the base model too: the two models
    share vision tower and embeddings, so their layer-0 inputs are equal), and
    they are optimised once, as one loop row (steps loss evaluations, layers
    run on one row); the offsets of both rows equal optimize() on the rows and
    on the prompt alone."""
    fam = FAMILIES[name]
    base, rlvr = pairs[name]
    inputs = prompt(name, base, "one_image")
    steps = []
    cfg = ar.ReplayConfig(layers=fam.layers, lr=fam.lr, steps=fam.passk_steps, **fam.passk_config,
                          callback=lambda step, loss: steps.append(step))
    layers = ar.get_adapter(rlvr).decoder_layers()
    torch.manual_seed(0)
    with FirstLayer0Input(rlvr) as seen_rlvr, FirstLayer0Input(base, internal=True) as seen_base, \
            LayerBatchSizes(layers[0]) as calls0, LayerBatchSizes(layers[1]) as calls1, \
            ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=fam.passk_tokens, do_sample=True, num_return_sequences=2)
        last = handle.last
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert steps == list(range(cfg.steps))  # one optimisation
    assert list(last.n_visual) == [n_visual(base, inputs)] * 2 and len(last.deltas) == 2
    assert last.optimized_rows == 1 and torch.equal(last.deltas[0], last.deltas[1])
    # The loop ran layers 0 and 1 once per step on one row; generate on 2.
    for calls in (calls0, calls1):
        assert calls.sizes.count(1) == cfg.steps and set(calls.sizes) == {1, 2}
    assert seen_rlvr.hidden.shape[0] == 2
    assert base_saw(seen_base, seen_rlvr)
    rows = repeat_rows(inputs, 2)
    assert torch.equal(capture_prefill(ar.get_adapter(rlvr), rows).hidden0, seen_rlvr.hidden)
    result = ar.optimize(rlvr, rows, ar.compute_targets(base, rows, cfg), cfg)
    alone = replay(base, rlvr, inputs, cfg)
    for ours, theirs in zip(last.deltas, result.deltas):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
        assert torch.allclose(ours, alone.deltas, rtol=0, atol=1e-6)


# -------------------------------------------- the model as it was, after all


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, hooks_of(model),
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_as_before(model, snap):
    state, hooks, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert hooks_of(model) == hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(flags.values())


@pytest.mark.parametrize("name", NAMES)
def test_remove_restores_the_model_bitwise(pairs, name):
    fam = FAMILIES[name]
    base, rlvr = pairs[name]
    inputs = prompt(name, rlvr, "prefill")
    fwd = ar.get_adapter(rlvr).forward_inputs(inputs)
    snap, snap_base = snapshot(rlvr), snapshot(base)
    with torch.no_grad():
        ref_logits = rlvr(**fwd).logits
    handle = ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=2, lr=fam.lr, steps=2))
    assert hooks_of(rlvr) > snap[1]
    with torch.no_grad():
        patched_logits = rlvr(**fwd).logits
    assert not torch.equal(ref_logits, patched_logits)  # a plain forward is a prefill too
    handle.remove()
    assert_as_before(rlvr, snap)
    assert_as_before(base, snap_base)
    with torch.no_grad():
        assert torch.equal(rlvr(**fwd).logits, ref_logits)


@pytest.mark.parametrize("name", NAMES)
def test_exception_inside_the_loop_leaves_the_model_clean(pairs, name):
    fam = FAMILIES[name]
    base, rlvr = pairs[name]
    inputs = prompt(name, rlvr, "prefill")
    fwd = ar.get_adapter(rlvr).forward_inputs(inputs)
    with torch.no_grad():
        ref_logits = rlvr(**fwd).logits
    snap, snap_base = snapshot(rlvr), snapshot(base)

    def boom(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=2, lr=fam.lr, steps=3, callback=boom)):
            rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert_as_before(rlvr, snap)
    assert_as_before(base, snap_base)
    with torch.no_grad():
        assert torch.equal(rlvr(**fwd).logits, ref_logits)


@pytest.mark.parametrize("name", NAMES)
def test_text_only_prompt_is_unchanged(pairs, name):
    fam = FAMILIES[name]
    base, rlvr = pairs[name]
    inputs = prompt(name, rlvr, "text_only")
    assert n_visual(rlvr, inputs) == 0
    plain = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    with ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=2, lr=fam.lr, steps=2)) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, out)
    assert handle.last is not None and not handle.last.replayed and "no visual tokens" in handle.last.note


# ------------------------------------------------------------ the registry


def test_tiny_registry_builds_the_demo_pair():
    """tiny.pair() of a Qwen family is tiny.make_pair()'s pair, bit for bit; the
    old names stay; an unknown family is a clear error."""
    assert tiny.FAMILIES == ("qwen2_vl", "qwen2_5_vl") and set(tiny.FAMILIES) <= set(FAMILIES)
    for ours, demo in zip(tiny.pair("qwen2_5_vl"), tiny.make_pair("qwen2_5_vl")):
        a, b = ours.state_dict(), demo.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(tiny.available_families()) <= set(FAMILIES)
    with pytest.raises(ValueError, match="unknown tiny family 'x'; registered: qwen2_vl, qwen2_5_vl, llava"):
        tiny.pair("x")
