"""The replay engine on tiny random Qwen2-VL / Qwen2.5-VL pairs: bfloat16, the
efficiencies of SPEC §5 in effect, targets, configuration and the errors it
raises. (What every family must satisfy, parity with the published loop
included, is tests/models/test_families.py; patch() itself, tests/hooks.)"""

import copy
import dataclasses

import pytest
import torch
from helpers import hooks_of, replay
from helpers import qwen_prompt as prompt

import actreplay_ext as ar
from actreplay_ext import reference, tiny

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
LR = 1e-3  # the tiny sharpened lens: the loss falls smoothly at this rate


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    base, rlvr = tiny.pair(request.param)
    return request.param, base, rlvr


# ------------------------------------------------------------- bfloat16


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
    with pytest.raises(ValueError, match="unknown preset 'x'; valid: deepeyes-7b, mid-replay, mm-eureka-7b, "
                                         "video-r1-7b, vl-rethinker-7b"):
        ar.ReplayConfig.preset("x")
    with pytest.raises(ValueError, match="'alignment' must be one of 'published', 'matched'"):
        ar.ReplayConfig(alignment="diagonal")
    with pytest.raises(ValueError, match=r"'steps' must be an int in \[1, 2\*\*31 - 1\]"):
        ar.ReplayConfig(steps=0)
    with pytest.raises(ValueError, match="'lr' must be >= 0"):
        ar.ReplayConfig(lr=-1.0)
    with pytest.raises(ValueError, match="'topk_tokens'"):
        ar.ReplayConfig(rule="topk")


@pytest.mark.parametrize("kw", [dict(), dict(select="high"), dict(rule="topk", topk_tokens=2)])
def test_topv_1_is_refused_with_its_reason(kw):
    """A softmax over one target is 1 for both models: the loss and the offsets would be 0."""
    with pytest.raises(ValueError, match=r"^ReplayConfig: 'topv' must be >= 2 for mode='tokens', got 1: .* over one "
                                         r"token both are 1, so the loss and the offsets would be 0"):
        ar.ReplayConfig(topv=1, **kw)
    with pytest.raises(ValueError, match="'topv' must be >= 2"):  # also reached by a copy
        dataclasses.replace(ar.ReplayConfig(mode="direct", topv=1), mode="tokens", thresholds=None, layers=3)
    assert ar.ReplayConfig(topv=2, **kw).topv == 2
    assert ar.ReplayConfig(mode="direct", topv=1).topv == 1  # direct mode has no KL: topv is not read


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
