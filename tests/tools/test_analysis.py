"""The logit-lens analysis (actreplay analyze): per-token entropy and
KL(base || RLVR) against the full models run with hooks, and the decile table."""

import pytest
import torch

from actreplay_ext import get_adapter, tiny
from actreplay_ext.models.calls import layer_output
from actreplay_ext.tools import analysis


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


def filled(layers=28, prompts=(40, 25, 33), names=()):
    """An Analysis of synthetic per-layer stats (no model): KL falls with entropy, as in the paper."""
    acc = analysis.Analysis(*names)
    g = torch.Generator().manual_seed(1)
    for n in prompts:
        per = []
        for _ in range(layers):
            e = torch.rand(n, generator=g) * 4
            per.append({"entropy": e, "kl": torch.exp(-e) + 0.1 * torch.rand(n, generator=g)})
        acc.add(per)
    return acc


def test_kl_grid_is_the_mean_kl_and_count_of_each_layer_and_decile():
    acc = filled()
    mean, tokens = acc.kl_grid()
    assert mean.shape == tokens.shape == (28, 10)
    for s in acc.layers():
        order = torch.argsort(s.entropy, stable=True)
        for b, idx in enumerate(torch.tensor_split(order, 10)):  # equal-count buckets, lowest entropy first
            assert int(tokens[s.layer, b]) == idx.numel()
            assert float(mean[s.layer, b]) == pytest.approx(float(s.kl[idx].mean()))
    assert tokens.sum(1).tolist() == [98] * 28
    # the decile table holds the same numbers: the heatmap's counts are in the CSV
    rows = acc.deciles()
    assert [r["tokens"] for r in rows] == tokens.flatten().tolist()
    assert [r["mean_kl"] for r in rows] == pytest.approx(mean.flatten().tolist())


def test_kl_grid_leaves_empty_buckets_nan(tmp_path):
    acc = filled(layers=2, prompts=(6,))
    mean, tokens = acc.kl_grid()
    assert tokens[0].tolist() == [1] * 6 + [0] * 4
    assert not torch.isnan(mean[:, :6]).any() and torch.isnan(mean[:, 6:]).all()
    pytest.importorskip("matplotlib")
    assert len(analysis.plot(acc, str(tmp_path))) == 3  # the empty cells are drawn grey, not an error


def test_representative_layers_keep_the_first_and_last():
    assert analysis.representative_layers(list(range(28))) == [0, 5, 11, 16, 22, 27]
    assert analysis.representative_layers([0, 1, 2]) == [0, 1, 2]
    assert analysis.representative_layers(list(range(7)), k=3) == [0, 3, 6]


def test_csv_rows_name_both_models(tmp_path):
    import csv

    acc = filled(layers=3, names=("Qwen2.5-VL-7B-Instruct", "rlvr-step500"))
    paths = acc.write_csv(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["kl_by_entropy_decile.csv", "entropy_histogram.csv"]
    for path in paths:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0])[:3] == ["base", "rlvr", "layer"]
        assert {(r["base"], r["rlvr"]) for r in rows} == {("Qwen2.5-VL-7B-Instruct", "rlvr-step500")}
    with open(paths[0]) as f:
        assert "tokens" in next(csv.reader(f))


def test_names_default_and_assignable():
    acc = analysis.Analysis()
    assert acc.names == ("base", "RLVR")
    acc.names = ("a", "b")  # as the CLI sets them
    assert (acc.base_name, acc.rlvr_name) == ("a", "b")


def test_titles_name_the_models_and_where_the_counts_are():
    big = analysis.plot_titles(filled(names=("B7", "R7")))
    assert set(big) == {"kl_heatmap.png", "kl_by_entropy_decile.png", "entropy_histogram.png"}
    assert "KL(B7 ‖ R7)" in big["kl_heatmap.png"] and "KL(B7 ‖ R7)" in big["kl_by_entropy_decile.png"]
    assert "B7" in big["entropy_histogram.png"]
    assert "counts per cell in kl_by_entropy_decile.csv" in big["kl_heatmap.png"]
    assert "6 of 28 layers and their mean" in big["kl_by_entropy_decile.png"]
    assert "9-10 tokens per decile" in big["kl_by_entropy_decile.png"]  # 98 tokens in 10 buckets
    small = analysis.plot_titles(filled(layers=4, prompts=(50,)), title="my run")
    assert "my run" in small["kl_heatmap.png"] and "kl_by_entropy_decile.csv" not in small["kl_heatmap.png"]
    assert "all layers" in small["kl_by_entropy_decile.png"] and "5 tokens per decile" in small[
        "kl_by_entropy_decile.png"]
    assert "KL(base ‖ RLVR)" in small["kl_heatmap.png"]


@pytest.mark.parametrize("layers", [28, 3])
def test_plot_writes_the_heatmaps_and_curves(tmp_path, layers):
    pytest.importorskip("matplotlib")
    paths = analysis.plot(filled(layers=layers, names=("B", "R")), str(tmp_path), "synthetic")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["kl_heatmap.png", "kl_by_entropy_decile.png",
                                                    "entropy_histogram.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
