"""The replay engine and patch() on tiny random Qwen2-VL / Qwen2.5-VL pairs:
parity with the published loop, the efficiencies of SPEC §5 in effect, and
hooks that leave the model exactly as it was."""

import copy

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny
from helpers import PYTHON_DIR, assert_matches_published, replay

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
LR = 1e-3  # the tiny sharpened lens: the loss falls smoothly at this rate


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    base, rlvr = tiny.make_pair(request.param)
    return request.param, base, rlvr


def prompt(model, **kw):
    kw.setdefault("images", [(8, 8)])
    return tiny.make_inputs(model, **kw)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_optimize_matches_published_loop(pair, alignment):
    _, base, rlvr = pair
    inputs = prompt(base, images=[(8, 8), (4, 6)], video=(2, 4, 4))
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=15, alignment=alignment)
    targets = ar.compute_targets(base, inputs, cfg)
    result = ar.optimize(rlvr, inputs, targets, cfg)
    pub = reference.published_replay(rlvr, base, inputs, cfg)

    assert_matches_published(result, pub, n_visual=16 + 6 + 8, hidden=64, steps=15)
    assert result.losses[-1] < 0.8 * result.losses[0]  # the loss falls
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.losses, result.losses[1:]))  # smoothly


def test_bfloat16_tracks_float32(pair):
    family, base, rlvr = pair
    inputs = prompt(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=10)
    pub = reference.published_replay(rlvr, base, inputs, cfg)
    base16, rlvr16 = base.to(torch.bfloat16), copy.deepcopy(rlvr).to(torch.bfloat16)
    try:
        inputs16 = dict(inputs, pixel_values=inputs["pixel_values"].to(torch.bfloat16))
        targets = ar.compute_targets(base16, inputs16, cfg)
        result = ar.optimize(rlvr16, inputs16, targets, cfg)
        pub16 = reference.published_replay(rlvr16, base16, inputs16, cfg)
    finally:
        base.float()
    for ours, theirs in zip(result.losses, pub16["losses"]):
        assert abs(ours - theirs) <= 5e-2 * abs(theirs)
    cos = torch.nn.functional.cosine_similarity(result.deltas.flatten(), pub16["deltas"].flatten(), dim=0)
    assert float(cos) >= 0.99
    cos32 = torch.nn.functional.cosine_similarity(result.deltas.flatten(), pub["deltas"].flatten(), dim=0)
    assert float(cos32) >= 0.9  # and bf16 stays near the float32 answer


# ------------------------------------------------------ SPEC §5 in effect


class CallCounter:
    def __init__(self, modules):
        self.counts = {name: 0 for name in modules}
        self.lengths = {name: [] for name in modules}
        # Forward (post) hooks: they fire only when the module actually ran.
        self.handles = [m.register_forward_hook(self._hook(name), with_kwargs=True) for name, m in modules.items()]

    def _hook(self, name):
        def hook(mod, args, kwargs, output):
            self.counts[name] += 1
            x = args[0] if args else next(iter(kwargs.values()))
            self.lengths[name].append(x.shape[-2] if x.dim() >= 2 else None)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("alignment", ["published", "matched"])
def test_efficiencies_are_in_effect(pair, alignment):
    _, base, rlvr = pair
    inputs = prompt(rlvr, text_len=20)  # 10 text tokens follow the image
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=6, alignment=alignment)
    targets = ar.compute_targets(base, inputs, cfg)
    layers = rlvr.model.language_model.layers
    modules = {"visual": rlvr.model.visual, "lm_head": rlvr.lm_head,
               **{f"layer{l}": layers[l] for l in range(len(layers))}}
    flags = {n: p.requires_grad for n, p in rlvr.named_parameters()}
    counter = CallCounter(modules)
    try:
        result = ar.optimize(rlvr, inputs, targets, cfg)
    finally:
        counter.remove()
    c = counter.counts
    assert c["visual"] == 1  # the vision tower runs once per prompt (§5.1)
    assert c["lm_head"] == 0  # never over the sequence (§5.2)
    # §5.2: the deepest layer needed is layers-2 (published: inputs) or layers-1 (matched).
    deepest = cfg.layers - 1 if alignment == "matched" else cfg.layers - 2
    deepest = min(deepest, max(l for l, s in enumerate(result.selected) if s) - (alignment == "published"))
    for l in range(len(layers)):
        assert c[f"layer{l}"] == (cfg.steps if l <= deepest else 0), (l, c)
    # §5.3: the loop runs on the prefix ending at the last visual token.
    ids = inputs["input_ids"][0]
    last_visual = int((ids == tiny.IMAGE_TOKEN_ID).nonzero().max())
    assert set(counter.lengths["layer0"]) == {last_visual + 1} and last_visual + 1 < ids.numel()
    # §5.6: weights take no part in autograd, and their flags come back.
    assert {n: p.requires_grad for n, p in rlvr.named_parameters()} == flags
    assert all(flags.values())


def test_base_pass_runs_only_the_layers_it_needs(pair):
    _, base, _ = pair
    inputs = prompt(base)
    layers = base.model.language_model.layers
    counter = CallCounter({"lm_head": base.lm_head, **{f"layer{l}": layers[l] for l in range(len(layers))}})
    try:
        ar.compute_targets(base, inputs, ar.ReplayConfig(layers=2))
    finally:
        counter.remove()
    assert counter.counts == {"lm_head": 0, "layer0": 1, "layer1": 1, "layer2": 0, "layer3": 0}


# ------------------------------------------------------------- patch()


def hooks_of(model):
    mods = [model, model.model.visual, *model.model.language_model.layers]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


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


def test_patch_result_equals_optimize(pair):
    _, base, rlvr = pair
    inputs = prompt(rlvr, video=(2, 4, 4))
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=4)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=False)
    result = replay(base, rlvr, inputs, cfg)
    assert torch.allclose(handle.last.deltas, result.deltas, rtol=0, atol=1e-6)
    assert handle.last.losses == pytest.approx(result.losses, rel=1e-6)


def test_remove_restores_the_model_bitwise(pair):
    _, base, rlvr = pair
    inputs = prompt(rlvr)
    before_hooks = hooks_of(rlvr)
    state = getattr(rlvr.model, "rope_deltas", None)
    with torch.no_grad():
        ref_logits = rlvr(**inputs).logits
    handle = ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=2, lr=LR, steps=2))
    assert hooks_of(rlvr) > before_hooks
    with torch.no_grad():
        patched_logits = rlvr(**inputs).logits
    assert not torch.equal(ref_logits, patched_logits)  # a plain forward is a prefill too
    handle.remove()
    assert hooks_of(rlvr) == before_hooks
    with torch.no_grad():
        assert torch.equal(rlvr(**inputs).logits, ref_logits)
    assert all(p.requires_grad for p in rlvr.parameters())
    del state


def test_exception_inside_the_loop_leaves_the_model_clean(pair):
    _, base, rlvr = pair
    inputs = prompt(rlvr)
    with torch.no_grad():
        ref_logits = rlvr(**inputs).logits
    before_hooks = hooks_of(rlvr)

    def boom(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=2, lr=LR, steps=3, callback=boom)):
            rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert hooks_of(rlvr) == before_hooks
    assert all(p.requires_grad for p in rlvr.parameters())
    with torch.no_grad():
        assert torch.equal(rlvr(**inputs).logits, ref_logits)


def test_text_only_prompt_is_unchanged(pair):
    _, base, rlvr = pair
    inputs = tiny.make_inputs(rlvr, images=[])
    plain = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    with ar.patch(rlvr, base=base, config=ar.ReplayConfig(layers=2, lr=LR, steps=2)) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, out)
    assert handle.last is not None and not handle.last.replayed and "no visual tokens" in handle.last.note


def test_apply_adds_the_offsets(pair):
    _, base, rlvr = pair
    inputs = prompt(rlvr)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=3)
    result = replay(base, rlvr, inputs, cfg)
    with ar.patch(rlvr, base=base, config=cfg):
        with torch.no_grad():
            patched = rlvr(**inputs).logits
    with ar.apply(rlvr, result):
        with torch.no_grad():
            applied = rlvr(**inputs).logits
    assert torch.allclose(applied, patched, atol=1e-5)
    assert hooks_of(rlvr) == 0


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


# ----------------------------------------------------- targets and config


def test_targets_save_load_roundtrip(pair, tmp_path):
    _, base, rlvr = pair
    inputs = prompt(base)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=3)
    targets = ar.compute_targets(base, inputs, cfg)
    path = str(tmp_path / "t.safetensors")
    targets.save(path)
    loaded = ar.ReplayTargets.load(path)
    assert loaded.selected_counts() == targets.selected_counts() and loaded.n_visual == targets.n_visual
    a = ar.optimize(rlvr, inputs, targets, cfg)
    b = ar.optimize(rlvr, inputs, loaded, cfg)
    assert torch.equal(a.deltas, b.deltas)
    other = prompt(base, seed=5)
    with pytest.raises(ValueError, match="computed for another prompt"):
        ar.optimize(rlvr, other, loaded, cfg)
    with pytest.raises(ValueError, match="another configuration"):
        ar.optimize(rlvr, inputs, loaded, ar.ReplayConfig(layers=3, topv=20))


def test_config_validation_and_presets():
    assert ar.ReplayConfig.preset("vl-rethinker-7b").layers == 24
    assert ar.ReplayConfig.preset("mm-eureka-7b", steps=3).steps == 3
    with pytest.raises(ValueError, match="unknown preset 'x'; valid: deepeyes-7b, mid-replay, mm-eureka-7b, video-r1-7b, vl-rethinker-7b"):
        ar.ReplayConfig.preset("x")
    with pytest.raises(ValueError, match="'alignment' must be one of 'published', 'matched'"):
        ar.ReplayConfig(alignment="diagonal")
    with pytest.raises(ValueError, match="'steps' must be an int >= 1"):
        ar.ReplayConfig(steps=0)
    with pytest.raises(ValueError, match="'lr' must be >= 0"):
        ar.ReplayConfig(lr=-1.0)
    with pytest.raises(ValueError, match="'topk_tokens'"):
        ar.ReplayConfig(rule="topk")


def test_model_mismatches_are_clear_errors(pair):
    family, base, rlvr = pair
    other = tiny.make_model(family, hidden=32, heads=2)
    with pytest.raises(ValueError, match="differ in hidden size: RLVR has 64, base has 32"):
        ar.patch(rlvr, base=other)
    with pytest.raises(ValueError, match="config.layers = 9 exceeds the 4 decoder layers"):
        ar.compute_targets(base, prompt(base), ar.ReplayConfig(layers=9))
    with pytest.raises(ValueError, match="config.topv = 5000 exceeds the vocabulary size V = 1000"):
        ar.compute_targets(base, prompt(base), ar.ReplayConfig(topv=5000, layers=2))
    with pytest.raises(TypeError, match="not a supported model family; supported: .*Qwen2VLForConditionalGeneration"):
        ar.patch(torch.nn.Linear(2, 2))


def test_other_mismatches_name_both_values():
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    for other, what in [(tiny.make_model("qwen2_5_vl", vocab=1200), "vocabulary size: RLVR has 1000, base has 1200"),
                        (tiny.make_model("qwen2_5_vl", layers=5), "number of decoder layers: RLVR has 4, base has 5")]:
        with pytest.raises(ValueError, match=what):
            ar.patch(rlvr, base=other)
    odd = tiny.make_model("qwen2_5_vl")
    odd.config.image_token_id = 980
    with pytest.raises(ValueError, match=r"visual token ids: RLVR has \[990, 991\], base has \[980, 991\]"):
        ar.patch(rlvr, base=odd)


def test_targets_for_another_model_are_refused():
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    inputs = prompt(base)
    cfg = ar.ReplayConfig(layers=2, lr=LR, steps=2)
    targets = ar.compute_targets(base, inputs, cfg)
    other = tiny.make_model("qwen2_5_vl", layers=5)
    with pytest.raises(ValueError, match="made with another model"):
        ar.optimize(other, inputs, targets, cfg)


def test_non_finite_activations_raise_and_leave_the_model_unchanged():
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    inputs = prompt(rlvr)
    with torch.no_grad():
        rlvr.model.language_model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    flags = {n: p.requires_grad for n, p in rlvr.named_parameters()}
    hooks = hooks_of(rlvr)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=3)
    with pytest.raises(FloatingPointError, match="at step 0: the RLVR model's layer 2 input is not finite"):
        replay(base, rlvr, inputs, cfg)
    with pytest.raises(FloatingPointError, match="at step 0"):
        with ar.patch(rlvr, base=base, config=cfg):
            rlvr.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert {n: p.requires_grad for n, p in rlvr.named_parameters()} == flags and hooks_of(rlvr) == hooks
    with pytest.raises(FloatingPointError, match="base model's layer 1 output has a non-finite logit lens"):
        ar.compute_targets(rlvr, inputs, cfg)  # as a base model: layer 1's output is NaN


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
