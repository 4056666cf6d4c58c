"""Property-based fuzzing of the four operators against their oracles
(hypothesis: shapes, dtypes, value ranges, duplicate positions) and of the
selection invariants."""

import torch
from helpers import TOL, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from actreplay_ext import ops
from actreplay_ext import reference as ref

EXAMPLES = settings(max_examples=200, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def tensor(draw, shape, dtype, scale):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@EXAMPLES
@given(st.data())
def test_lens_entropy_fuzz(data):
    n = data.draw(st.integers(0, 12))
    v = data.draw(st.integers(1, 300))
    d = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(0, v))
    dtype = data.draw(DTYPES)
    scale = data.draw(st.sampled_from([0.01, 1.0, 30.0]))
    norm = data.draw(st.booleans())
    h = tensor(data.draw, (n, d), dtype, scale)
    U = tensor(data.draw, (v, d), dtype, 1.0)
    w = (tensor(data.draw, (d,), torch.float32, 0.3) + 1).to(dtype) if norm else None
    ent, lse, vals, idx = ops.lens_entropy(h, U, w, 1e-6, k)
    r = ref.lens_entropy(h.double(), U.double(), None if w is None else w.double(), 1e-6, k)
    assert vals.shape == (n, k) and idx.shape == (n, k)
    if n == 0:
        return
    tol = TOL[dtype]
    # Entropies below one nat compare absolutely (a relative error of ~0 is meaningless).
    assert rel_err(ent, r[0], floor=float(n) ** 0.5) <= tol
    assert rel_err(lse, r[1], floor=1.0) <= tol
    if k:
        assert rel_err(vals, r[2], floor=1.0) <= tol
        # Whatever the ties, the returned indices hold the returned values.
        logits = ref.lens_logits(h.double(), U.double(), None if w is None else w.double(), 1e-6)
        assert rel_err(logits.gather(1, idx), r[2], floor=1.0) <= tol
        assert bool((vals[:, 1:] <= vals[:, :-1]).all())


@EXAMPLES
@given(st.data())
def test_topk_kl_fuzz(data):
    m = data.draw(st.integers(0, 10))
    v = data.draw(st.integers(1, 300))
    d = data.draw(st.integers(1, 40))
    k = data.draw(st.integers(1, 60))
    dtype = data.draw(DTYPES)
    norm = data.draw(st.booleans())
    h = tensor(data.draw, (m, d), dtype, data.draw(st.sampled_from([0.1, 1.0, 10.0])))
    U = tensor(data.draw, (v, d), dtype, 1.0)
    w = (tensor(data.draw, (d,), torch.float32, 0.3) + 1).to(dtype) if norm else None
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    idx = torch.randint(0, v, (m, k), generator=g)  # duplicates allowed
    lp = torch.log_softmax(torch.randn(m, k, generator=g) * data.draw(st.sampled_from([0.5, 3.0])), -1)
    out = ops.topk_kl(h, U, w, 1e-6, idx, lp)
    r = ref.topk_kl(h.double(), U.double(), None if w is None else w.double(), 1e-6, idx, lp.double())
    assert out.shape == (m,) and bool(torch.isfinite(out).all())
    if m:
        assert rel_err(out, r, floor=1e-3 * m**0.5) <= TOL[dtype]


@EXAMPLES
@given(st.data())
def test_replay_scatter_fuzz(data):
    t = data.draw(st.integers(1, 40))
    d = data.draw(st.integers(1, 24))
    mode = data.draw(st.sampled_from(["add", "replace"]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    if mode == "add":
        pos = torch.randint(0, t, (data.draw(st.integers(0, 3 * t)),), generator=g)  # with duplicates
    else:
        pos = torch.randperm(t, generator=g)[: data.draw(st.integers(0, t))]
    h = torch.randn(t, d, generator=g).to(dtype)
    vals = torch.randn(pos.numel(), d, generator=g).to(dtype)
    out = ops.replay_scatter(h, pos, vals, mode)
    expect = ref.replay_scatter(h.double(), pos, vals.double(), mode)
    # Repeated half-precision additions round after each add, as the oracle in that dtype would.
    same_dtype = ref.replay_scatter(h, pos, vals, mode)
    assert rel_err(out, expect, floor=1.0) <= TOL[dtype] or torch.allclose(out, same_dtype)


@EXAMPLES
@given(st.data())
def test_select_tokens_fuzz_and_invariants(data):
    L = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(0, 60))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    levels = data.draw(st.sampled_from([3, 1000]))  # few levels: many ties
    ent = (torch.rand(L, n, generator=g) * levels).floor() / levels * 5
    cand = torch.rand(n, generator=g) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    rule = data.draw(st.sampled_from(["ratio", "topk", "absolute"]))
    value = {"ratio": data.draw(st.sampled_from([0.0, 0.4, 1.0])),
             "topk": data.draw(st.sampled_from([0.3, 1, 5, 100])),
             "absolute": data.draw(st.sampled_from([0.5, 2.5]))}[rule]
    low = ops.select_tokens(ent, cand, rule, value, "low")
    high = ops.select_tokens(ent, cand, rule, value, "high")
    assert torch.equal(low, ref.select_tokens(ent, cand, rule, value, "low"))
    assert torch.equal(high, ref.select_tokens(ent, cand, rule, value, "high"))
    assert torch.equal(low.sum(1), high.sum(1))  # the high rule picks as many as the low rule
    assert not bool(low[:, ~cand].any() or high[:, ~cand].any())
    if rule == "ratio" and value == 1.0:
        assert bool((low == cand.unsqueeze(0)).all())  # ratio 1.0 picks every candidate
