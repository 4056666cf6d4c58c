"""Batches: per-row offsets equal to running the rows one by one, left padding,
identical rows optimised once (Pass@K sampling), and the sdpa attention path."""

import pytest
import torch
from helpers import LayerBatchSizes, replay, replay_and_published

import actreplay_ext as ar
from actreplay_ext import tiny

LR = 1e-3


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair("qwen2_5_vl")


def row_inputs(inputs, b, images_per_row):
    """Row b of a batch built by tiny.make_inputs, without its left padding."""
    keep = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][b:b + 1, keep]
    grids = inputs["image_grid_thw"]
    per = images_per_row
    g = grids[b * per:(b + 1) * per]
    start = int(grids[: b * per].prod(-1).sum())
    out["image_grid_thw"] = g
    out["pixel_values"] = inputs["pixel_values"][start:start + int(g.prod(-1).sum())]
    return out


def test_batch_equals_rows_one_by_one(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)], batch=3, left_pad=[0, 3, 0], seed=4)
    assert int((inputs["attention_mask"] == 0).sum()) == 3
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=8)
    batch = replay(base, rlvr, inputs, cfg)
    assert isinstance(batch.deltas, list) and len(batch.deltas) == 3 and batch.optimized_rows == 3
    total_loss = 0.0
    for b in range(3):
        one = row_inputs(inputs, b, 1)
        single = ar.optimize(rlvr, one, ar.compute_targets(base, one, cfg), cfg)
        scale = float(single.deltas.abs().max())
        assert scale > 0
        assert float((batch.deltas[b] - single.deltas).abs().max()) <= 1e-5 * max(scale, 1.0) + 1e-6 * 0
        assert float((batch.deltas[b] - single.deltas).abs().max() / scale) <= 1e-4
        total_loss += single.losses[0]
    # The batch loss is the sum of the rows' losses (each row normalised by its own count).
    assert batch.losses[0] == pytest.approx(total_loss, rel=1e-5)


@pytest.mark.parametrize("options", [dict(optimizer="lbfgs"), dict(optimizer="lbfgs", lr=0.5),
                                     dict(tol=0.6), dict(optimizer="lbfgs", tol=0.3)],
                         ids=["lbfgs", "lbfgs-long-first-step", "sgd-tol", "lbfgs-tol"])
def test_batch_rows_descend_alone_with_any_optimizer_and_tol(pair, options):
    """lbfgs's state (curvature pairs, best point, accept test, step scale) and
    tol's gradient-norm test are per row: a batch once shared one of each, so a
    row's offsets depended on the other rows. Each row equals itself alone."""
    base, rlvr = pair
    inputs = tiny.make_inputs(base, images=[(8, 8)], batch=3, left_pad=[0, 3, 0], seed=4)
    cfg = ar.ReplayConfig(layers=3, lr=options.pop("lr", LR if options.get("optimizer") != "lbfgs" else None),
                          steps=8, **options)
    batch = replay(base, rlvr, inputs, cfg)
    assert isinstance(batch.deltas, list) and len(batch.deltas) == 3
    evaluations = []
    for b in range(3):
        one = row_inputs(inputs, b, 1)
        single = ar.optimize(rlvr, one, ar.compute_targets(base, one, cfg), cfg)
        scale = float(single.deltas.abs().max())
        assert scale > 0
        assert float((batch.deltas[b] - single.deltas).abs().max() / scale) <= 1e-4, b
        evaluations.append(len(single.losses))
    assert len(batch.losses) == max(evaluations)  # the batch goes on while any row does


def test_identical_rows_are_optimised_once(pair):
    base, rlvr = pair
    one = tiny.make_inputs(base, images=[(8, 8)])
    four = tiny.make_inputs(base, images=[(8, 8)])
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
        if k in four:
            four[k] = torch.cat([one[k]] * 4)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=5)
    result = ar.optimize(rlvr, four, ar.compute_targets(base, four, cfg), cfg)
    single = ar.optimize(rlvr, one, ar.compute_targets(base, one, cfg), cfg)
    assert result.optimized_rows == 1 and len(result.deltas) == 4
    for d in result.deltas:
        assert torch.equal(d, single.deltas)
    assert result.losses == single.losses


def test_pass_at_k_sampling_optimises_once(pair):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=4)
    with LayerBatchSizes(rlvr.model.language_model.layers[1]) as calls, ar.patch(rlvr, base=base, config=cfg) as handle:
        torch.manual_seed(0)
        out = rlvr.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=4)
    batch_sizes = calls.sizes
    assert out.shape[0] == 4
    assert handle.last.optimized_rows == 1 and len(handle.last.deltas) == 4
    # The replay loop ran layer 1 once per step on one row; generate ran it on 4.
    assert batch_sizes.count(1) == cfg.steps and set(batch_sizes) == {1, 4}


def test_sdpa_matches_the_published_loop():
    base, rlvr = tiny.make_pair("qwen2_vl", attn_implementation="sdpa")
    inputs = tiny.make_inputs(base, images=[(8, 8)], video=(2, 4, 4))
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=10)
    result, pub = replay_and_published(base, rlvr, inputs, cfg)
    assert result.selected == pub["selected"]
    assert float((result.deltas - pub["deltas"]).abs().max() / pub["deltas"].abs().max()) <= 1e-4


def test_pass_at_k_with_two_images(pair):
    """transformers 5.18 repeats each encoded image K times in a row when it
    expands the prompt (rows then see [a, a] and [b, b]); the base model is
    given the images in the order the RLVR rows received them."""
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr, images=[(8, 8), (4, 6)])
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=3)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    assert handle.last.n_visual == [22, 22] and len(handle.last.deltas) == 2
    assert handle.last.optimized_rows in (1, 2) and len(handle.last.losses) == 3


def test_right_padded_batch_equals_rows_one_by_one(pair):
    """Rows of different lengths padded on the right (pads after the text): per-row
    offsets and losses as for each row alone (1e-5, float32)."""
    base, rlvr = pair
    singles = [tiny.make_inputs(base, images=images, text_len=n, seed=10 + i)
               for i, (images, n) in enumerate([([(8, 8)], 16), ([(4, 4)], 9), ([(4, 8)], 12)])]
    width = max(s["input_ids"].shape[1] for s in singles)
    batch = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in singles[0]:
            batch[key] = torch.stack([torch.nn.functional.pad(s[key][0], (0, width - s[key].shape[1]),
                                                              value=tiny.PAD_ID if key == "input_ids" else 0)
                                      for s in singles])
    batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in singles])
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in singles])
    assert int((batch["attention_mask"][:, -1] == 0).sum()) == 2  # two rows end in padding
    # The 4-token row's loss oscillates at lr 1e-3 (its gradient is normalised by
    # 4 tokens), which amplifies float32 rounding to 1e-4; at 3e-4 it falls smoothly.
    cfg = ar.ReplayConfig(layers=3, lr=3e-4, steps=8)
    got = ar.optimize(rlvr, batch, ar.compute_targets(base, batch, cfg), cfg)
    assert got.n_visual == [16, 4, 8] and got.optimized_rows == 3
    total = 0.0
    for b, one in enumerate(singles):
        single = ar.optimize(rlvr, one, ar.compute_targets(base, one, cfg), cfg)
        scale = float(single.deltas.abs().max())
        assert scale > 0
        assert float((got.deltas[b] - single.deltas).abs().max()) <= 1e-5 * scale
        total += single.losses[0]
    assert got.losses[0] == pytest.approx(total, rel=1e-5)
