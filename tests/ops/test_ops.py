"""The four operators against their float64 oracles, their gradients, their
registrations (opcheck) and their argument errors, on CPU and (when present) CUDA."""

import os

import pytest
import torch
from helpers import TOL, rel_err

from actreplay_ext import ops
from actreplay_ext import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_lens(n, v, d, dtype, device, seed, norm=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * scale).to(dtype)
    unembed = (torch.randn(v, d, generator=g) / d**0.5 * 4).to(dtype)
    weight = (torch.rand(d, generator=g) + 0.5).to(dtype) if norm else None
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(hidden), mv(unembed), mv(weight)


def f64(t):
    return None if t is None else t.double().cpu()


def check_topk_indices(idx, ref_idx, vals_ref, logits_ref, k, tol):
    """Indices must match exactly wherever the reference value is separated
    from its neighbours (and from the first value left out) by more than `tol`."""
    if k == 0:
        return
    idx = idx.cpu()
    if k < logits_ref.shape[1]:
        nxt = logits_ref.topk(k + 1, dim=-1).values[:, k]
    else:
        nxt = torch.full_like(logits_ref[:, 0], -1e300)
    padded = torch.cat([vals_ref[:, :1] + 1e300, vals_ref, nxt[:, None]], dim=1)
    gap = torch.minimum(padded[:, :-2] - padded[:, 1:-1], padded[:, 1:-1] - padded[:, 2:])
    untied = gap > tol
    assert torch.equal(idx[untied], ref_idx[untied])
    return untied.float().mean()


def contract_logits(hidden, unembed, weight, eps):
    """The lens logits as lens_entropy's contract defines them (reference.lens_entropy),
    in float64: for half/bf16 the normalised rows rounded to the input dtype. The
    normalisation runs where the inputs are: it is then the operator's bit for bit."""
    x = ref.rms_norm(hidden, weight, eps)
    if hidden.dtype in (torch.float16, torch.bfloat16):
        x = x.to(hidden.dtype)
    return x.cpu().double() @ unembed.cpu().double().T


#: logit error allowed against contract_logits, relative to the largest logit: float32 sums
CONTRACT_TOL = 1e-5


# (N, V, D): every N in {0,1,7,1000}, V in {1,5,1000,32000,32003}, D in {8,64,200}
SHAPES = [
    (0, 5, 8),
    (1, 1, 8),
    (1, 5, 64),
    (7, 1000, 200),
    (7, 32003, 64),
    (1, 32000, 200),
    (1000, 1000, 64),
    (1000, 5, 8),
    (200, 32003, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d-V%d-D%d" % s)
@pytest.mark.parametrize("topk", [0, 1, 50, "V"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
def test_lens_entropy_matches_oracle(device, dtype, shape, topk, norm):
    n, v, d = shape
    k = v if topk == "V" else topk
    if k > v:
        pytest.skip("topk > V is an error, tested separately")
    hidden, unembed, weight = make_lens(n, v, d, dtype, device, seed=n * 7 + v + d, norm=norm)
    ent, lse, vals, idx = ops.lens_entropy(hidden, unembed, weight, 1e-6, k)
    r_ent, r_lse, r_vals, r_idx = ref.lens_entropy(f64(hidden), f64(unembed), f64(weight), 1e-6, k)
    assert ent.shape == (n,) and lse.shape == (n,) and vals.shape == (n, k) and idx.shape == (n, k)
    assert ent.dtype == torch.float32 and idx.dtype == torch.int64
    if n == 0:
        return
    tol = TOL[dtype]
    # V = 1 has entropy exactly 0: compare absolutely (floor 1 nat).
    assert rel_err(ent, r_ent, floor=1e-30 if v > 1 else 1.0) <= tol
    assert rel_err(lse, r_lse) <= tol
    if k:
        assert rel_err(vals, r_vals) <= tol
        logits = contract_logits(hidden, unembed, weight, 1e-6)
        c_vals, c_idx = ref.topk_desc_lower_index(logits, k)
        checked = check_topk_indices(idx, c_idx, c_vals, logits, k, CONTRACT_TOL * float(logits.abs().max()))
        if k <= 50:
            assert checked > 0.5  # the comparison is not vacuous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
def test_lens_entropy_many_rows_large_vocab(device, dtype, norm):
    # N = 1000 against V = 32003 (the float64 oracle makes this the slowest case:
    # one top-k size here; every top-k size runs on the shapes above).
    hidden, unembed, weight = make_lens(1000, 32003, 8, dtype, device, seed=77, norm=norm)
    ent, lse, vals, idx = ops.lens_entropy(hidden, unembed, weight, 1e-6, 50)
    r_ent, r_lse, r_vals, r_idx = ref.lens_entropy(f64(hidden), f64(unembed), f64(weight), 1e-6, 50)
    tol = TOL[dtype]
    assert rel_err(ent, r_ent) <= tol and rel_err(lse, r_lse) <= tol and rel_err(vals, r_vals) <= tol
    logits = contract_logits(hidden, unembed, weight, 1e-6)
    c_vals, c_idx = ref.topk_desc_lower_index(logits, 50)
    checked = check_topk_indices(idx, c_idx, c_vals, logits, 50, CONTRACT_TOL * float(logits.abs().max()))
    assert checked > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_lens_entropy_over_row_and_vocabulary_chunks(dtype):
    """N = 4100, V = 40000: the CUDA kernel walks rows in chunks of 4096 (+ 4) and
    the vocabulary in chunks of 16384 (+ 16384 + 7232), each thread summing its
    share of a chunk in float and the block merging in double."""
    hidden, unembed, weight = make_lens(4100, 40000, 16, dtype, "cuda", seed=5)
    ent, lse, vals, idx = ops.lens_entropy(hidden, unembed, weight, 1e-6, 50)
    r_ent, r_lse, r_vals, r_idx = ref.lens_entropy(f64(hidden), f64(unembed), f64(weight), 1e-6, 50)
    tol = TOL[dtype]
    assert rel_err(ent, r_ent) <= tol and rel_err(lse, r_lse) <= tol and rel_err(vals, r_vals) <= tol
    # indices: exact where the contract's values are apart
    logits = contract_logits(hidden, unembed, weight, 1e-6)
    c_vals, c_idx = ref.topk_desc_lower_index(logits, 50)
    assert check_topk_indices(idx, c_idx, c_vals, logits, 50, CONTRACT_TOL * float(logits.abs().max())) > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("topk", [1, 5, 3000])
def test_lens_entropy_rows_with_nan_logits_are_nan(device, dtype, topk):
    """A row with any NaN logit has NaN lse and entropy (a max or a sum that skipped
    the NaN once gave -inf or a finite number), also when every logit is NaN; the
    other rows are untouched, and top-k puts NaN first, lower index first, as
    torch.topk ranks NaN above every number."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=g, dtype=dtype)
    U = torch.randn(3000, 16, generator=g, dtype=dtype)
    h[1, 3] = float("nan")  # every logit of row 1 is NaN
    nan_row = U.clone()
    nan_row[7] = 0.0
    nan_row[7, 0] = float("nan")  # logit 7 of every row is NaN
    ent, lse, vals, idx = ops.lens_entropy(h.to(device), nan_row.to(device), None, 1e-6, topk)
    assert ent.isnan().all() and lse.isnan().all()
    assert idx.cpu()[:, 0].tolist() == [7, 0, 7, 7, 7] and vals.isnan().cpu()[:, 0].all()

    ent, lse, vals, idx = ops.lens_entropy(h.to(device), U.to(device), None, 1e-6, topk)
    r_ent, r_lse, r_vals, r_idx = ref.lens_entropy(f64(h), f64(U), None, 1e-6, topk)
    assert ent[1].isnan() and lse[1].isnan() and r_lse[1].isnan()
    assert idx.cpu()[1].tolist() == list(range(topk)) == r_idx[1].tolist()  # all NaN: in index order
    keep = torch.tensor([0, 2, 3, 4])
    assert rel_err(ent.cpu()[keep], r_ent[keep]) <= TOL[dtype] and rel_err(lse.cpu()[keep], r_lse[keep]) <= TOL[dtype]
    logits = ref.lens_logits(f64(h), f64(U), None, 1e-6)[keep]
    assert check_topk_indices(idx[keep.to(idx.device)], r_idx[keep], r_vals[keep], logits, topk,
                              1e-5 * float(logits.abs().max())) > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lens_entropy_ties_break_to_lower_index(device, dtype):
    # Small integers give exact dot products, so ties are exact ties.
    g = torch.Generator().manual_seed(3)
    hidden = torch.randint(-2, 3, (33, 8), generator=g).to(dtype).to(device)
    unembed = torch.randint(-1, 2, (1003, 8), generator=g).to(dtype).to(device)
    ent, lse, vals, idx = ops.lens_entropy(hidden, unembed, None, 0.0, 60)
    r_ent, r_lse, r_vals, r_idx = ref.lens_entropy(f64(hidden), f64(unembed), None, 0.0, 60)
    assert torch.equal(idx.cpu(), r_idx)
    assert torch.equal(vals.double().cpu(), r_vals)
    assert rel_err(ent, r_ent) <= TOL[dtype] and rel_err(lse, r_lse) <= TOL[dtype]
    # Within each run of equal values, indices increase.
    same = vals[:, 1:] == vals[:, :-1]
    assert same.any() and bool((idx[:, 1:] > idx[:, :-1])[same].all())


def test_lens_entropy_all_negative_logits(device):
    g = torch.Generator().manual_seed(5)
    hidden = torch.rand(64, 32, generator=g).to(device) + 0.1
    unembed = -torch.rand(5000, 32, generator=g).to(device) - 0.1
    ent, lse, vals, idx = ops.lens_entropy(hidden, unembed, None, 1e-6, 50)
    r_ent, r_lse, r_vals, r_idx = ref.lens_entropy(f64(hidden), f64(unembed), None, 1e-6, 50)
    assert bool((vals < 0).all())
    assert rel_err(ent, r_ent) <= 1e-5 and rel_err(lse, r_lse) <= 1e-5
    assert rel_err(vals, r_vals) <= 1e-5


@pytest.mark.parametrize("spread", ["peaked", "flat"])
def test_lens_entropy_logits_of_magnitude_1e4(device, spread):
    g = torch.Generator().manual_seed(11)
    d, v = 64, 4099
    if spread == "peaked":  # random logits of size ~1e4: softmax nearly one-hot
        hidden = torch.randn(40, d, generator=g) * 600
        unembed = torch.randn(v, d, generator=g) / d**0.5 * 5
    else:  # logits ~1e4 + O(1): a meaningful entropy on top of a huge offset
        hidden = torch.full((40, d), 100.0) + torch.randn(40, d, generator=g) * 0.05
        unembed = torch.full((v, d), 1.5625) + torch.randn(v, d, generator=g) * 0.002
    hidden, unembed = hidden.to(device), unembed.to(device)
    ent, lse, vals, idx = ops.lens_entropy(hidden, unembed, None, 1e-6, 50)
    r_ent, r_lse, r_vals, _ = ref.lens_entropy(f64(hidden), f64(unembed), None, 1e-6, 50)
    assert float(r_lse.abs().min()) > 5e3
    assert rel_err(lse, r_lse) <= 1e-5 and rel_err(vals, r_vals) <= 1e-5
    if spread == "peaked":
        # Entropies are ~0 (one-hot softmax); they are checked absolutely, in nats
        # per row, since a relative error of a number near 0 is meaningless.
        assert float((ent.double().cpu() - r_ent).abs().max()) <= 1e-5
    else:
        # float32 logits of size 1e4 carry ~1e-3 absolute rounding, which is the
        # precision any float32 kernel (and the float32 oracle) has here.
        r32 = ref.lens_entropy(hidden, unembed, None, 1e-6, 0)[0]
        assert rel_err(ent, r_ent) <= 2 * rel_err(r32, r_ent) + 1e-6
        assert float(r_ent.min()) > 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 32003, 256), (128, 152064, 3584)], ids=["V32003", "qwen2.5-vl-7b"])
def test_half_precision_lens_follows_its_contract(device, dtype, shape):
    """bf16/f16: the normalised hidden state rounded to the input dtype, float32
    products and sums (reference.lens_entropy). Tight, on both devices: the same
    entropy and lse to float32 accuracy, and the top-k values the contract's logits
    have at the returned indices, which are the contract's top-k values. (Against
    a float32-xn lens the CUDA bf16 top-50 set agreed on only 94-96 % at V = 152064.)"""
    n, v, d = shape
    if device == "cpu" and v > 100000:
        pytest.skip("the 7B shape runs on CUDA only (minutes on two CPU cores)")
    h, U, w = make_lens(n, v, d, dtype, device, seed=21, scale=3.0)
    k = 50
    ent, lse, vals, idx = ops.lens_entropy(h, U, w, 1e-6, k)
    r_ent, r_lse, r_vals, _ = ref.lens_entropy(h, U, w, 1e-6, k)  # float32, where the inputs are
    assert float(r_ent.min()) > 0.5  # not one-hot rows: the entropy is measured, not 0 = 0
    # Logits within tol of the largest logit; lse and entropy then within that, twice
    # that, absolutely. D = 3584 sums on the H200's tensor cores came out 3e-6 of the
    # largest logit off (rms, measured through lse): 5e-5 there, 1e-5 elsewhere.
    tol = 5e-5 if device == "cuda" and d > 1024 else CONTRACT_TOL
    scale = float(r_vals.abs().max())
    assert float((ent - r_ent).abs().max()) <= 2 * tol * scale and float((lse - r_lse).abs().max()) <= tol * scale
    logits = contract_logits(h, U, w, 1e-6)
    at_idx = logits.gather(1, idx.cpu())  # the contract's logits where we say the top-k are
    assert float((vals.cpu() - at_idx).abs().max()) <= tol * scale
    assert float((vals.cpu() - r_vals.cpu()).abs().max()) <= tol * scale
    # and not the float32-xn lens (the CPU op's before), which is farther off than that
    f32 = ref.rms_norm(h, w, 1e-6).cpu().double() @ U.cpu().double().T
    assert float((f32.gather(1, idx.cpu()) - at_idx).abs().max()) > 5 * tol * scale


def test_lens_entropy_float64(device):
    hidden, unembed, weight = make_lens(9, 777, 40, torch.float64, device, seed=1)
    out = ops.lens_entropy(hidden, unembed, weight, 1e-6, 7)
    r = ref.lens_entropy(hidden.cpu(), unembed.cpu(), weight.cpu(), 1e-6, 7)
    assert out[0].dtype == torch.float64
    for a, b in zip(out[:3], r[:3]):
        assert rel_err(a, b) <= 1e-12
    assert torch.equal(out[3].cpu(), r[3])


# ------------------------------------------------------------------ topk_kl


def make_kl(m, v, d, k, dtype, device, seed, norm=True, with_zero_p=False):
    hidden, unembed, weight = make_lens(m, v, d, dtype, device, seed, norm)
    g = torch.Generator().manual_seed(seed + 1)
    idx = (torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(m)]) if m
           else torch.empty(0, k, dtype=torch.long))
    logp = torch.log_softmax(torch.randn(m, k, generator=g) * 2, dim=-1)
    if with_zero_p and m and k > 1:
        logp[:, -1] = float("-inf")
        logp = torch.log_softmax(logp, dim=-1)
    return hidden, unembed, weight, idx.to(device), logp.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 10, 8, 3), (1, 5, 8, 1), (7, 1000, 64, 50), (300, 32003, 200, 50),
                                   (5, 1000, 8, 1000)], ids=lambda s: "M%d-V%d-D%d-k%d" % s)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
def test_topk_kl_matches_oracle(device, dtype, shape, norm):
    m, v, d, k = shape
    args = make_kl(m, v, d, k, dtype, device, seed=m + v + k, norm=norm, with_zero_p=True)
    out = ops.topk_kl(args[0], args[1], args[2], 1e-6, args[3], args[4])
    r = ref.topk_kl(f64(args[0]), f64(args[1]), f64(args[2]), 1e-6, args[3].cpu(), f64(args[4]))
    assert out.shape == (m,) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    if m:
        assert rel_err(out, r) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
def test_topk_kl_backward_matches_oracle(device, dtype, norm):
    h, U, w, idx, lp = make_kl(33, 3001, 96, 50, dtype, device, seed=2, norm=norm, with_zero_p=True)
    h = h.requires_grad_()
    g = torch.randn(33, generator=torch.Generator().manual_seed(9)).to(device)
    (ops.topk_kl(h, U, w, 1e-6, idx, lp) * g).sum().backward()
    h64 = f64(h.detach()).requires_grad_()
    (ref.topk_kl(h64, f64(U), f64(w), 1e-6, idx.cpu(), f64(lp)) * g.double().cpu()).sum().backward()
    assert h.grad.dtype == dtype
    assert rel_err(h.grad, h64.grad) <= TOL[dtype]


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("lp_dtype", [torch.float32, torch.float64], ids=["logp32", "logp64"])
@pytest.mark.parametrize("op", ["ops", "recomputing"])
def test_topk_kl_gradcheck(device, norm, lp_dtype, op):
    """float64 gradients against finite differences, with zero target probabilities,
    from float32 or float64 targets. On CUDA, float32 targets once rounded the float64
    model's log q to float32: the KL lost float64 accuracy and gradcheck failed."""
    h, U, w, idx, lp = make_kl(4, 50, 12, 7, torch.float64, device, seed=4, norm=norm, with_zero_p=True)
    lp = lp.to(lp_dtype)
    fn = ops.topk_kl if op == "ops" else torch.ops.actreplay.topk_kl
    h.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, U, w, 1e-6, idx, lp), (h,))


@pytest.mark.parametrize("lp_dtype", [torch.float32, torch.float64], ids=["logp32", "logp64"])
def test_topk_kl_of_a_float64_model_is_float64_accurate(device, lp_dtype):
    """The float64 KL and log q keep float64 accuracy whatever the targets' type."""
    h, U, w, idx, lp = make_kl(16, 300, 40, 20, torch.float64, device, seed=9, with_zero_p=True)
    lp = lp.to(lp_dtype)
    kl, logq = torch.ops.actreplay.topk_kl_logq(h, U, w, 1e-6, idx, lp)
    expect = ref.topk_kl(h.cpu(), U.cpu(), w.cpu(), 1e-6, idx.cpu(), lp.cpu().double())
    assert kl.dtype == logq.dtype == torch.float64
    assert rel_err(kl, expect) <= 1e-12
    assert torch.equal(logq, ops.topk_logp(h, U, w, 1e-6, idx))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
# (M, V, D, k): the common case; on CUDA D = 8200/8201 keeps xn in global scratch
# (over 32 KiB), vectorised or not, and D = 8192 with k = 2049 fills the shared
# memory with xn so that the logits go to global scratch (float accumulation).
@pytest.mark.parametrize("shape", [(37, 2003, 72, 50), (3, 2003, 8200, 1500), (2, 2003, 8201, 7),
                                   (2, 4099, 8192, 2049)], ids=lambda s: "M%d-V%d-D%d-k%d" % s)
@pytest.mark.parametrize("wide", [False, True], ids=["logp-result-dtype", "logp-float64"])
def test_topk_kl_backward_from_the_saved_logq_is_bitwise_the_recomputing_one(device, dtype, norm, shape, wide):
    """ops.topk_kl keeps log q for its backward (topk_kl_logq): the same kl and the
    same gradient, bit for bit, as torch.ops.actreplay.topk_kl, which recomputes it;
    float64 targets of a float32/bf16/f16 model too (log q is kept in the result type)."""
    if wide and dtype == torch.float64:
        pytest.skip("float64 targets are the result dtype of a float64 model: the case above")
    m, v, d, k = shape
    h, U, w, idx, lp = make_kl(m, v, d, k, dtype, device, seed=11, norm=norm, with_zero_p=True)
    if dtype == torch.float64 or wide:
        lp = lp.double()
    g = torch.randn(m, generator=torch.Generator().manual_seed(5)).to(device)
    grads, outs = [], []
    for fn in (ops.topk_kl, torch.ops.actreplay.topk_kl):
        x = h.clone().requires_grad_()
        out = fn(x, U, w, 1e-6, idx, lp)
        (out * g.to(out.dtype)).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    kl, logq = torch.ops.actreplay.topk_kl_logq(h, U, w, 1e-6, idx, lp)
    assert torch.equal(kl, outs[1]) and torch.equal(logq, ops.topk_logp(h, U, w, 1e-6, idx))


def test_topk_kl_backward_logq_checks_what_it_is_given(device):
    h, U, w, idx, lp = make_kl(4, 30, 8, 5, torch.float32, device, seed=1)
    _, logq = torch.ops.actreplay.topk_kl_logq(h, U, w, 1e-6, idx, lp)
    ones = lambda n: torch.ones(n, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="'grad_kl' must be \\[M\\] with M = 4"):
        torch.ops.actreplay.topk_kl_backward_logq(ones(3), h, U, w, 1e-6, idx, lp, logq)
    with pytest.raises(ValueError, match="'logq' must be the contiguous"):
        torch.ops.actreplay.topk_kl_backward_logq(ones(4), h, U, w, 1e-6, idx, lp, logq[:, :4])
    with pytest.raises(IndexError, match="'target_idx' must hold indices in \\[0, V = 30\\)"):
        torch.ops.actreplay.topk_kl_logq(h, U, w, 1e-6, idx + 30, lp)
    # The backward is a public op too: what it is given directly is checked
    # (a bad index once read out of bounds and crashed the process). Out-of-range
    # indices on CUDA stop the kernel with a device-side assertion, which ends the
    # process's CUDA context: see test_cuda_backward_logq_stops_at_a_bad_index.
    g = ones(4)
    bwd = torch.ops.actreplay.topk_kl_backward_logq
    for bad in (idx + 30, idx - 31, idx.clone().index_fill_(0, torch.tensor([2], device=device), 30)):
        if torch.device(device).type == "cuda":
            break
        with pytest.raises(IndexError, match="topk_kl_backward_logq: argument 'target_idx' must hold indices in "
                                             "\\[0, V = 30\\)"):
            bwd(g, h, U, w, 1e-6, bad, lp, logq)
    with pytest.raises(ValueError, match="topk_kl_backward_logq: argument 'target_idx' must be contiguous"):
        bwd(g, h, U, w, 1e-6, torch.cat([idx, idx], 1)[:, ::2], lp, logq)
    with pytest.raises(ValueError, match="topk_kl_backward_logq: argument 'unembed' must be contiguous"):
        bwd(g, h, U.t().contiguous().t(), w, 1e-6, idx, lp, logq)
    with pytest.raises(TypeError, match="topk_kl_backward_logq: argument 'target_idx' must be int64"):
        bwd(g, h, U, w, 1e-6, idx.int(), lp, logq)
    with pytest.raises(ValueError, match="topk_kl_backward_logq: argument 'target_logp' must have the shape"):
        bwd(g, h, U, w, 1e-6, idx, lp[:, :3].contiguous(), logq)
    with pytest.raises(ValueError, match="topk_kl_backward_logq: argument 'target_idx' must be \\[M, k\\]"):
        bwd(g, h, U, w, 1e-6, idx[:3], lp[:3], logq[:3])
    assert torch.isfinite(bwd(g, h, U, w, 1e-6, idx, lp, logq)).all()  # and good input still works


_BAD_INDEX_ON_CUDA = """
import torch, actreplay_ext
torch.manual_seed(0)
h, U, w = torch.randn(4, 8, device="cuda"), torch.randn(30, 8, device="cuda"), torch.ones(8, device="cuda")
idx = torch.stack([torch.randperm(30)[:5] for _ in range(4)]).cuda()
lp = torch.log_softmax(torch.randn(4, 5), -1).cuda()
_, logq = torch.ops.actreplay.topk_kl_logq(h, U, w, 1e-6, idx, lp)
idx[2, 3] = {bad}
torch.ops.actreplay.topk_kl_backward_logq(torch.ones(4, device="cuda"), h, U, w, 1e-6, idx, lp, logq)
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bad", [30, -1, 2**40])
def test_cuda_backward_logq_stops_at_a_bad_index(bad):
    """On CUDA the backward from log q checks each index as its kernel reads it (no
    host sync): a bad one is a device-side assertion, never a read outside U. Run in
    a child process, since the assertion ends that process's CUDA context."""
    import subprocess
    import sys

    # -P: the child imports the installed package, not a source tree in the cwd (no _C there)
    r = subprocess.run([sys.executable, "-P", "-c", _BAD_INDEX_ON_CUDA.format(bad=bad)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert r.returncode != 0 and "no error" not in r.stdout, r.stdout + r.stderr
    assert "device-side assert" in r.stderr and "illegal memory access" not in r.stderr, r.stderr[-2000:]


def test_topk_kl_refuses_gradients_it_does_not_compute(device):
    h, U, w, idx, lp = make_kl(3, 20, 8, 4, torch.float32, device, seed=0)
    U.requires_grad_()
    h.requires_grad_()
    out = ops.topk_kl(h, U, w, 1e-6, idx, lp).sum()
    with pytest.raises(RuntimeError, match="'unembed' requires grad"):
        out.backward()


# ------------------------------------------------------------ replay_scatter


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("mode", ["add", "replace"])
@pytest.mark.parametrize("tm", [(1, 1), (50, 0), (50, 17), (1000, 640)], ids=lambda s: "T%d-M%d" % s)
def test_replay_scatter_matches_oracle(device, dtype, mode, tm):
    t, m = tm
    g = torch.Generator().manual_seed(t + m)
    hidden = torch.randn(t, 72, generator=g).to(dtype).to(device)
    if mode == "add":
        pos = torch.randint(0, t, (m,), generator=g)  # duplicates accumulate
    else:
        pos = torch.randperm(t, generator=g)[:m]
    values = torch.randn(m, 72, generator=g).to(dtype).to(device)
    out = ops.replay_scatter(hidden, pos.to(device), values, mode)
    expect = ref.replay_scatter(f64(hidden), pos, f64(values), mode)
    assert out.dtype == dtype and out.shape == hidden.shape
    assert rel_err(out, expect) <= TOL[dtype] / 10
    assert out.data_ptr() != hidden.data_ptr()


def test_replay_scatter_duplicates_add_up(device):
    hidden = torch.zeros(4, 3, device=device)
    values = torch.ones(3, 3, device=device)
    out = ops.replay_scatter(hidden, torch.tensor([2, 2, 0], device=device), values, "add")
    assert out[:, 0].tolist() == [1.0, 0.0, 2.0, 0.0]


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_replay_scatter_gradcheck(device, mode):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    pos = torch.tensor([7, 1, 4] if mode == "replace" else [7, 1, 7], device=device)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, v: ops.replay_scatter(h, pos, v, mode), (hidden, values))


# ------------------------------------------------------------- select_tokens


@pytest.mark.parametrize("rule,value", [("ratio", 0.4), ("ratio", 1.0), ("ratio", 0.0), ("absolute", 0.5),
                                        ("topk", 5), ("topk", 0.3), ("topk", 1000), ("ratio", [0.2, 0.5, 0.9])])
@pytest.mark.parametrize("side", ["low", "high"])
@pytest.mark.parametrize("ties", [False, True])
def test_select_tokens_matches_oracle(device, rule, value, side, ties):
    g = torch.Generator().manual_seed(7)
    L, N = 3, 400
    ent = torch.rand(L, N, generator=g)
    if ties:
        ent = (ent * 4).floor() / 4  # only 4 distinct entropies per row
    cand = torch.rand(N, generator=g) < 0.6
    mask = ops.select_tokens(ent.to(device), cand.to(device), rule, value, side)
    expect = ref.select_tokens(ent, cand, rule, value, side)
    assert mask.dtype == torch.bool and torch.equal(mask.cpu(), expect)
    assert not bool(mask.cpu()[:, ~cand].any())


def test_select_tokens_rules_on_a_small_example(device):
    ent = torch.tensor([[0.1, 0.5, 0.2, 1.0, 0.1, 0.9]], device=device)
    cand = torch.tensor([True, True, True, True, True, False], device=device)
    low = ops.select_tokens(ent, cand, "ratio", 0.4, "low")
    assert low.cpu().tolist() == [[True, False, True, False, True, False]]
    high = ops.select_tokens(ent, cand, "ratio", 0.4, "high")  # as many (3), from the top
    assert high.cpu().tolist() == [[False, True, True, True, False, False]]
    two = ops.select_tokens(ent, cand, "topk", 2, "low")  # tie 0.1/0.1 at 0 and 4
    assert two.cpu().tolist() == [[True, False, False, False, True, False]]
    one = ops.select_tokens(ent, cand, "topk", 1, "low")  # lower index wins the tie
    assert one.cpu().tolist() == [[True, False, False, False, False, False]]
    allc = ops.select_tokens(ent, cand, "ratio", 1.0, "low")
    assert torch.equal(allc.cpu()[0], cand.cpu())
    none = ops.select_tokens(ent, torch.zeros_like(cand), "ratio", 0.4, "low")
    assert not bool(none.any())


# ---------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    h, U, w, idx, lp = make_kl(6, 40, 16, 5, torch.float32, device, seed=3)
    hd = h.double().requires_grad_()
    return [
        (torch.ops.actreplay.lens_entropy.default, (h, U, w, 1e-6, 5)),
        (torch.ops.actreplay.lens_entropy.default, (h, U, None, 1e-6, 0)),
        (torch.ops.actreplay.topk_kl.default, (h.clone().requires_grad_(), U, w, 1e-6, idx, lp)),
        (torch.ops.actreplay.topk_kl.default, (hd, U.double(), None, 1e-6, idx, lp.double())),
        (torch.ops.actreplay.topk_kl_backward.default, (torch.ones(6, device=device), h, U, w, 1e-6, idx, lp)),
        (torch.ops.actreplay.replay_scatter.default,
         (h.clone().requires_grad_(), torch.tensor([1, 3], device=device),
          torch.randn(2, 16, device=device, requires_grad=True), "add")),
        (torch.ops.actreplay.replay_scatter.default,
         (h, torch.tensor([4, 0], device=device), torch.randn(2, 16, device=device), "replace")),
        (torch.ops.actreplay.select_tokens.default,
         (torch.rand(2, 6, device=device), torch.ones(6, dtype=torch.bool, device=device), "ratio", [0.4], "low")),
        # the path of ops.topk_kl, which keeps log q for its backward
        (torch.ops.actreplay.topk_kl_logq.default, (h.clone().requires_grad_(), U, w, 1e-6, idx, lp)),
        (torch.ops.actreplay.topk_kl_logq.default, (hd, U.double(), None, 1e-6, idx, lp.double())),
        (torch.ops.actreplay.topk_kl_backward_logq.default,
         (torch.ones(6, device=device), h, U, w, 1e-6, idx, lp,
          torch.ops.actreplay.topk_kl_logq(h, U, w, 1e-6, idx, lp)[1])),
    ]


def test_opcheck_all_operators(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


# ------------------------------------------------------------- bad input


def test_errors_name_the_argument(device):
    h, U, w, idx, lp = make_kl(4, 30, 8, 3, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match=r"'topk' must be in \[0, V\].*V = unembed.size\(0\) = 30"):
        ops.lens_entropy(h, U, w, 1e-6, 31)
    with pytest.raises(ValueError, match="'unembed' must be \\[V, D\\] with D = hidden.size\\(1\\) = 8"):
        ops.lens_entropy(h, U[:, :7].contiguous(), w, 1e-6, 1)
    with pytest.raises(ValueError, match="'hidden' must be contiguous"):
        ops.lens_entropy(torch.randn(8, 4, device=device).t(), U, w, 1e-6, 1)
    with pytest.raises(TypeError, match="'unembed' must have the dtype of 'hidden'"):
        ops.lens_entropy(h, U.half(), w, 1e-6, 1)
    with pytest.raises(TypeError, match="'hidden' must be float32, bfloat16, float16 or float64"):
        ops.lens_entropy(h.int(), U.int(), None, 1e-6, 1)
    with pytest.raises(ValueError, match="'norm_weight' must be \\[D\\]"):
        ops.lens_entropy(h, U, w[:5].contiguous(), 1e-6, 1)
    with pytest.raises(IndexError, match=r"'target_idx' must hold indices in \[0, V = 30\)"):
        ops.topk_kl(h, U, w, 1e-6, idx + 30, lp)
    with pytest.raises(ValueError, match="'target_logp' must have the shape of 'target_idx'"):
        ops.topk_kl(h, U, w, 1e-6, idx, lp[:, :2].contiguous())
    with pytest.raises(ValueError, match="'target_logp' must hold log-probabilities"):
        ops.topk_kl(h, U, w, 1e-6, idx, torch.full_like(lp, float("nan")))
    with pytest.raises(TypeError, match="'target_idx' must be int64"):
        ops.topk_kl(h, U, w, 1e-6, idx.int(), lp)
    vals = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="'positions' and 'values' must have the same length"):
        ops.replay_scatter(h, torch.tensor([0, 1, 2], device=device), vals, "add")
    with pytest.raises(IndexError, match=r"'positions' must hold indices in \[0, T = 4\)"):
        ops.replay_scatter(h, torch.tensor([0, 4], device=device), vals, "add")
    with pytest.raises(ValueError, match="'positions' must be unique for mode='replace'"):
        ops.replay_scatter(h, torch.tensor([1, 1], device=device), vals, "replace")
    with pytest.raises(ValueError, match="'mode' must be 'add' or 'replace'"):
        ops.replay_scatter(h, torch.tensor([1, 2], device=device), vals, "mul")
    with pytest.raises(TypeError, match="'values' must have the dtype of 'hidden'"):
        ops.replay_scatter(h, torch.tensor([1, 2], device=device), vals.double(), "add")
    ent = torch.rand(2, 5, device=device)
    cand = torch.ones(5, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="'rule' must be one of 'ratio', 'topk', 'absolute'"):
        ops.select_tokens(ent, cand, "median", 0.4, "low")
    with pytest.raises(ValueError, match="'side' must be 'low' or 'high'"):
        ops.select_tokens(ent, cand, "ratio", 0.4, "middle")
    with pytest.raises(ValueError, match="'value' must hold 1 value or one per layer"):
        ops.select_tokens(ent, cand, "ratio", [0.1, 0.2, 0.3], "low")
    with pytest.raises(ValueError, match="'value' must be a count"):
        ops.select_tokens(ent, cand, "topk", 2.5, "low")
    with pytest.raises(ValueError, match="'candidates' must be \\[N\\]"):
        ops.select_tokens(ent, cand[:4], "ratio", 0.4, "low")
    bad = ent.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="'entropy' holds NaN"):
        ops.select_tokens(bad, cand, "ratio", 0.4, "low")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_are_an_error():
    h, U, w, idx, lp = make_kl(4, 30, 8, 3, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="'unembed' must be on the device of 'hidden'"):
        ops.lens_entropy(h, U.cuda(), w, 1e-6, 1)
