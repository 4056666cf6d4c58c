"""Operator edge cases: outputs that are not differentiable say so, a second
derivative of topk_kl is a clear error, counts beyond int64 are clamped, and
lens_entropy follows torch.logsumexp / Categorical entropy for +-inf logits and
for finite logits whose range across vocabulary tiles overflows a naive rescale."""

import math

import pytest
import torch

from actreplay_ext import ops
from actreplay_ext import reference as ref

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]


def lens_of(logits: torch.Tensor, device):
    """hidden [N, 1] = 1 and unembed [V, 1] = the logits: the lens reproduces them exactly."""
    hidden = torch.ones(logits.shape[0], 1, device=device)
    return hidden, logits.reshape(-1, 1).contiguous().to(device)


def torch_semantics(z: torch.Tensor):
    lse = torch.logsumexp(z.double(), -1)
    ent = torch.distributions.Categorical(logits=z.double()).entropy()
    return lse, ent


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["neg_inf_in_finite_row", "pos_inf", "huge_range_across_tiles", "all_neg_inf"])
def test_lens_entropy_follows_torch_for_infinite_and_huge_logits(device, case):
    V = 20000  # more than one vocabulary tile on CPU (8192) and on CUDA
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, V, generator=g)
    if case == "neg_inf_in_finite_row":
        z[0, [3, 9000, 19999]] = -math.inf
    elif case == "pos_inf":
        z[0, 12000] = math.inf
    elif case == "huge_range_across_tiles":
        z[0, :100] = -3e34  # the first tile's max, far below
        z[0, 100:8192] = -3e34
        z[0, 15000] = 3e34  # ... a later tile's
    else:
        z[:] = -math.inf
    hidden, unembed = lens_of(z, device)
    ent, lse, vals, idx = ops.lens_entropy(hidden, unembed, None, 1e-6, 5)
    if case == "pos_inf":  # torch: logsumexp +inf, softmax (so the entropy) NaN
        assert float(lse) == math.inf and math.isnan(float(ent))
    elif case == "all_neg_inf":  # torch: logsumexp -inf, softmax NaN
        assert float(lse) == -math.inf and math.isnan(float(ent))
    else:
        want_lse, want_ent = torch_semantics(z)
        assert torch.isfinite(ent).all() and torch.isfinite(lse).all()
        assert abs(float(lse) - float(want_lse)) <= 1e-5 * max(1.0, abs(float(want_lse)))
        assert abs(float(ent) - float(want_ent)) <= 1e-4
    # The oracle agrees with torch's semantics too.
    r_ent, r_lse, r_vals, r_idx = ref.lens_entropy(hidden.cpu(), unembed.cpu(), None, 1e-6, 5)
    assert torch.equal(r_lse.isnan(), lse.cpu().isnan()) and torch.equal(r_ent.isnan(), ent.cpu().isnan())
    if case != "all_neg_inf":
        assert torch.equal(idx.cpu(), r_idx) and torch.equal(vals.cpu(), r_vals)


@pytest.mark.parametrize("device", DEVICES)
def test_lens_entropy_outputs_do_not_claim_gradients(device):
    hidden = torch.randn(4, 8, device=device, requires_grad=True)
    unembed = torch.randn(32, 8, device=device, requires_grad=True)
    outs = ops.lens_entropy(hidden, unembed, None, 1e-6, 3)
    assert not any(o.requires_grad for o in outs)
    with pytest.raises(RuntimeError, match="does not require grad"):
        outs[0].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_kl_second_derivative_is_a_clear_error(device):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 8, generator=g).to(device).requires_grad_()
    unembed = torch.randn(40, 8, generator=g).to(device)
    idx = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(3)]).to(device)
    logp = torch.log_softmax(torch.randn(3, 5, generator=g), -1).to(device)
    kl = ops.topk_kl(hidden, unembed, None, 1e-6, idx, logp).sum()
    (grad,) = torch.autograd.grad(kl, hidden, create_graph=True)
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match="double backward .* is not implemented"):
        torch.autograd.grad(grad.sum(), hidden)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value,expected", [(2.0**63, 7), (2.0**64, 7), (1e300, 7), (6.0, 6), (0.5, 3)])
def test_select_tokens_counts_are_clamped_before_the_cast(device, value, expected):
    e = torch.rand(2, 7).to(device)
    cand = torch.ones(7, dtype=torch.bool, device=device)
    mask = ops.select_tokens(e, cand, "topk", [value], "low")
    assert mask.sum(1).tolist() == [expected, expected]
    assert torch.equal(mask.cpu(), ref.select_tokens(e.cpu(), cand.cpu(), "topk", [value], "low"))
