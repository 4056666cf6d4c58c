"""A replay handle's life, alike for the three kinds (patch, patch in direct
mode, apply): active from the call that makes it until `remove()` or the end
of its with-block, and never silently re-entered after; a patched model
dropped without `remove()` is freed with its base model; a handle kept to
read `last` holds neither the base model nor the prompt's tensors; a copy of
a patched model (deepcopy, torch.save) comes out unpatched while the original
stays patched."""

import copy
import gc
import weakref

import pytest
import torch
from helpers import hooks_of

import actreplay_ext as ar
from actreplay_ext import tiny

pytest.importorskip("transformers")


def cfg():
    return ar.ReplayConfig(layers=3, lr=0.05, steps=3)


def direct_cfg():
    return ar.ReplayConfig.preset("deepeyes-7b", layers=3, thresholds=[5.0, 5.0, 5.0])


KINDS = {
    "patch": lambda base, rlvr, x: ar.patch(rlvr, base=base, config=cfg()),
    "direct": lambda base, rlvr, x: ar.patch(rlvr, base=base, config=direct_cfg()),
    "apply": lambda base, rlvr, x: ar.apply(rlvr, ar.optimize(rlvr, x, ar.compute_targets(base, x, cfg()), cfg())),
}


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair(noise=0.5)


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_handle_is_active_on_return_until_remove(pair, kind):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    plain, hooks = logits(rlvr, x), hooks_of(rlvr)
    handle = KINDS[kind](base, rlvr, x)  # no with-block: active all the same
    assert isinstance(handle, ar.ReplayHandle) and handle.active
    assert not torch.equal(logits(rlvr, x), plain)
    handle.remove()
    handle.remove()  # a second remove() does nothing
    assert not handle.active and hooks_of(rlvr) == hooks
    assert torch.equal(logits(rlvr, x), plain)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_removed_handle_cannot_be_entered_again(pair, kind):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    plain, hooks = logits(rlvr, x), hooks_of(rlvr)
    handle = KINDS[kind](base, rlvr, x)
    with handle:
        assert handle.active
    with pytest.raises(RuntimeError, match="was removed.*cannot be entered again"):
        with handle:
            pass
    assert hooks_of(rlvr) == hooks and torch.equal(logits(rlvr, x), plain)


@pytest.mark.parametrize("kind", list(KINDS))
def test_nested_blocks_of_one_handle_keep_it_until_the_outermost_ends(pair, kind):
    """An inner `with h:` once removed the hooks, and the rest of the outer block ran unpatched in silence."""
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    plain = logits(rlvr, x)
    handle = KINDS[kind](base, rlvr, x)
    with handle:
        with handle:
            patched = logits(rlvr, x)
        assert handle.active and torch.equal(logits(rlvr, x), patched)
    assert not handle.active and torch.equal(logits(rlvr, x), plain)


def test_set_targets_on_a_removed_handle_is_an_error(pair):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    with pytest.warns(UserWarning, match="no base model and no targets"):
        handle = ar.patch(rlvr, config=cfg())
    handle.remove()
    with pytest.raises(RuntimeError, match="set_targets.*removed handle"):
        handle.set_targets(ar.compute_targets(base, x, cfg()))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_patched_model_dropped_without_remove_is_freed_with_its_base(kind):
    base, rlvr = tiny.make_pair(noise=0.5)
    x = tiny.make_inputs(rlvr)
    handle = KINDS[kind](base, rlvr, x)
    rlvr.generate(**x, max_new_tokens=2, do_sample=False)
    model_ref, base_ref = weakref.ref(rlvr), weakref.ref(base)
    del rlvr, base, handle
    gc.collect()
    assert model_ref() is None and base_ref() is None


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_handle_kept_after_its_block_holds_neither_the_base_nor_the_prompt(kind, tmp_path):
    base, rlvr = tiny.make_pair(noise=0.5)
    x = tiny.make_inputs(rlvr)
    with KINDS[kind](base, rlvr, x) as handle:
        rlvr.generate(**x, max_new_tokens=2, do_sample=False)
    base_ref, pixels_ref = weakref.ref(base), weakref.ref(x["pixel_values"])
    del base, x
    gc.collect()
    assert base_ref() is None and pixels_ref() is None
    assert handle.last.replayed  # the results stay readable, and save
    handle.last.save(str(tmp_path / "last.safetensors"))
    assert ar.ReplayResult.load(str(tmp_path / "last.safetensors")).n_visual == handle.last.n_visual
    model_ref = weakref.ref(rlvr)
    assert handle.model is rlvr
    del rlvr
    gc.collect()
    assert model_ref() is None and handle.model is None and "removed" in repr(handle)


def _copy(model, how, tmp_path):
    if how == "deepcopy":
        return copy.deepcopy(model)
    torch.save(model, str(tmp_path / "model.pt"))
    return torch.load(str(tmp_path / "model.pt"), weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_copy_of_a_patched_model_comes_out_unpatched(pair, kind, how, tmp_path):
    base, rlvr = pair
    x = tiny.make_inputs(rlvr)
    plain = logits(rlvr, x)
    with KINDS[kind](base, rlvr, x) as handle:
        replayed = logits(rlvr, x)
        twin = _copy(rlvr, how, tmp_path)
        assert handle.active and torch.equal(logits(rlvr, x), replayed)  # the original stays patched
        assert torch.equal(logits(twin, x), plain)  # the copy does not replay
        with KINDS[kind](base, twin, x):  # and takes a handle of its own
            assert torch.equal(logits(twin, x), replayed)
    assert torch.equal(logits(twin, x), plain)


def test_a_copy_of_a_patched_model_with_a_layer_loop_hook_comes_out_unpatched(tmp_path):
    """Qwen3-VL: a hook on the text model records its deepstack features."""
    fam = tiny.FAMILIES_TINY["qwen3_vl"]
    if not fam.available:
        pytest.skip("no Qwen3-VL in this transformers")
    base, rlvr = fam.pair()
    x = fam.prompt(rlvr)
    plain = logits(rlvr, x)
    with ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=3, lr=fam.lr, steps=2)):
        replayed = logits(rlvr, x)
        twin = _copy(rlvr, "torch.save", tmp_path)
        assert torch.equal(logits(rlvr, x), replayed)
    assert not torch.equal(replayed, plain) and torch.equal(logits(twin, x), plain)
