"""The operators under torch.autocast: they compute as without it. The lens operators
(lens_entropy, topk_logp, topk_kl and its backward) take their operands (hidden,
unembed, norm_weight) in the common dtype, the widest of the three (autocast's
"promote" rule), so a bfloat16 hidden state meets float32 weights; outside autocast
that mix stays an error. Before, the C++ kernels ran with autocast on and failed
("expected scalar type Float but found BFloat16") even on float32 inputs."""

import pytest
import torch

from actreplay_ext import ops

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _lens(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    h, U, w = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g) / 2, torch.rand(16, generator=g) + 0.5
    idx = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(6)])
    lp = torch.log_softmax(torch.randn(6, 5, generator=g), -1)
    return h.to(device, dtype), U.to(device, dtype), w.to(device, dtype), idx.to(device), lp.to(device)


def _every_operator(h, U, w, idx, lp):
    """Each operator's outputs, and topk_kl's gradient in `hidden`, as a flat list of tensors."""
    hg = h.detach().clone().requires_grad_()
    kl = ops.topk_kl(hg, U, w, 1e-6, idx, lp)
    (grad,) = torch.autograd.grad(kl.sum(), hg)
    raw_grad = torch.ops.actreplay.topk_kl_backward(torch.ones_like(kl), h, U, w, 1e-6, idx, lp)
    positions = torch.tensor([1, 3], device=h.device)
    return [*ops.lens_entropy(h, U, w, 1e-6, 5), ops.topk_logp(h, U, w, 1e-6, idx), kl.detach(), grad, raw_grad,
            ops.replay_scatter(h, positions, h[:2] * 2, "add"),
            ops.select_tokens(ops.lens_entropy(h, U, w, 1e-6, 0)[0].reshape(2, 3).contiguous(),
                              torch.ones(3, dtype=torch.bool, device=h.device), "ratio", 0.6, "low")]


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_operators_compute_as_without_autocast(device, dtype, autocast_dtype):
    args = _lens(device, dtype)
    want = _every_operator(*args)
    with torch.autocast(device, dtype=autocast_dtype):
        got = _every_operator(*args)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
def test_lens_operands_of_mixed_dtypes_are_promoted_under_autocast(device, autocast_dtype):
    h, U, w, idx, lp = _lens(device)
    low = h.to(autocast_dtype)  # e.g. a layer output under autocast, read by the float32 lm_head
    with torch.autocast(device, dtype=autocast_dtype):
        got = [*ops.lens_entropy(low, U, w, 1e-6, 5), ops.topk_logp(low, U, w, 1e-6, idx),
               ops.topk_kl(low, U, w, 1e-6, idx, lp),
               ops.lens_entropy(h, U.to(autocast_dtype), w, 1e-6, 5)[0]]
    want = [*ops.lens_entropy(low.float(), U, w, 1e-6, 5), ops.topk_logp(low.float(), U, w, 1e-6, idx),
            ops.topk_kl(low.float(), U, w, 1e-6, idx, lp),
            ops.lens_entropy(h, U.to(autocast_dtype).float(), w, 1e-6, 5)[0]]
    for g, w_ in zip(got, want):
        assert torch.equal(g, w_)
    with pytest.raises(TypeError, match="'unembed' must have the dtype of 'hidden'"):  # the contract outside
        ops.lens_entropy(low, U, w, 1e-6, 5)


def test_the_gradient_reaches_a_low_precision_hidden_state_under_autocast(device):
    h, U, w, idx, lp = _lens(device)
    low = h.bfloat16().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        kl = ops.topk_kl(low, U, w, 1e-6, idx, lp)
    (grad,) = torch.autograd.grad(kl.sum(), low)
    full = low.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(ops.topk_kl(full, U, w, 1e-6, idx, lp).sum(), full)
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, want.bfloat16())
