"""The logit-lens analysis (actreplay analyze): per-token entropy and
KL(base || RLVR) against the full models run with hooks, and the decile table."""

import pytest
import torch

from actreplay_ext import analysis, get_adapter, tiny
from actreplay_ext.models.calls import layer_output


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair("qwen2_5_vl", noise=0.2)


def full_model_outputs(model, inputs):
    """Every decoder layer's output at the visual tokens, from the whole model's forward."""
    ad = get_adapter(model)
    outs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, layer_output(o)))
             for l, layer in enumerate(ad.decoder_layers())]
    state = ad.model_state()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        ad.restore_state(state)
    vis = ad.visual_mask(inputs["input_ids"])[0]
    return [outs[l][0, vis].detach() for l in range(len(outs))]


@torch.no_grad()
def oracle(base, rlvr, inputs):
    """Entropy and KL with the full vocabulary in float64."""
    result = []
    for hb, hr in zip(full_model_outputs(base, inputs), full_model_outputs(rlvr, inputs)):
        logp = []
        for model, h in ((base, hb), (rlvr, hr)):
            ad = get_adapter(model)
            x = h.double()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ad.norm_eps()) * ad.final_norm().weight.double()
            logp.append(torch.log_softmax(x @ ad.unembed().double().T, -1))
        p = logp[0].exp()
        result.append({"entropy": -(p * logp[0]).sum(-1), "kl": (p * (logp[0] - logp[1])).sum(-1)})
    return result


def test_lens_kl_matches_the_full_models(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr, images=[(8, 8), (4, 6)], video=(2, 4, 4), seed=3)
    got = analysis.lens_kl(base, rlvr, inputs)
    want = oracle(base, rlvr, inputs)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g["entropy"].shape == (16 + 6 + 8,)
        torch.testing.assert_close(g["entropy"].double(), w["entropy"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g["kl"].double(), w["kl"], rtol=1e-4, atol=1e-4)
        assert float(w["kl"].min()) > 1e-3  # the perturbed pair really differs at every token


def test_lens_kl_of_a_model_with_itself_is_zero(pair):
    base, _ = pair
    stats = analysis.lens_kl(base, base, tiny.make_inputs(base, seed=1), layers=2)
    assert len(stats) == 2
    for s in stats:
        assert float(s["kl"].abs().max()) < 1e-5
        assert float(s["entropy"].min()) > 0


def test_lens_kl_of_a_text_only_prompt_is_empty(pair):
    base, rlvr = pair
    assert analysis.lens_kl(base, rlvr, tiny.make_inputs(rlvr, images=[], seed=1)) == []


def test_lens_kl_rejects_bad_layers(pair):
    base, rlvr = pair
    with pytest.raises(ValueError, match=r"layers must be in 1\.\.4, got 5"):
        analysis.lens_kl(base, rlvr, tiny.make_inputs(rlvr), layers=5)


def test_deciles_partition_the_tokens_in_entropy_order():
    acc = analysis.Analysis()
    g = torch.Generator().manual_seed(0)
    for n in (37, 58):  # two prompts; 95 tokens per layer
        acc.add([{"entropy": torch.rand(n, generator=g) * 3, "kl": torch.rand(n, generator=g)} for _ in range(3)])
    rows = acc.deciles()
    assert [r["layer"] for r in rows] == [l for l in range(3) for _ in range(10)]
    stats = acc.layers()
    for l in range(3):
        mine = [r for r in rows if r["layer"] == l]
        assert sum(r["tokens"] for r in mine) == 95
        assert all(a["entropy_hi"] <= b["entropy_lo"] for a, b in zip(mine, mine[1:]))
        # bucket 1 holds the lowest-entropy tokens: its mean KL is theirs
        low = torch.argsort(stats[l].entropy)[: mine[0]["tokens"]]
        assert mine[0]["mean_kl"] == pytest.approx(float(stats[l].kl[low].mean()))
    hist = acc.histogram(bins=7)
    assert len(hist) == 21 and sum(r["count"] for r in hist if r["layer"] == 1) == 95
