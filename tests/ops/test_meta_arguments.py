"""A meta tensor (no data: e.g. a weight accelerate keeps offloaded) among real arguments
is a one-line error naming it, for every operator, through the Python face and the raw
torch.ops.actreplay.* alike. Such a call dispatches to the fake kernel, which used to
return uninitialised memory. Calls with every tensor on the meta device (shape inference)
still work; FakeTensor tracing is covered by opcheck in test_ops.py."""

import pytest
import torch

from actreplay_ext import ops


def _arguments(device):
    """Per raw operator, its arguments by name (in schema order), small and valid."""
    g = torch.Generator().manual_seed(0)
    h, U, w = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g), torch.rand(16, generator=g) + 0.5
    idx = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(6)])
    lp = torch.log_softmax(torch.randn(6, 5, generator=g), -1)
    h, U, w, idx, lp = (t.to(device) for t in (h, U, w, idx, lp))
    grad, logq = torch.ones(6, device=device), torch.ops.actreplay.topk_kl_logq(h, U, w, 1e-6, idx, lp)[1]
    lens = dict(hidden=h, unembed=U, norm_weight=w, eps=1e-6)
    return {
        "lens_entropy": dict(lens, topk=5),
        "topk_logp": dict(lens, target_idx=idx),
        "topk_kl": dict(lens, target_idx=idx, target_logp=lp),
        "topk_kl_logq": dict(lens, target_idx=idx, target_logp=lp),
        "topk_kl_backward": dict(grad_kl=grad, **lens, target_idx=idx, target_logp=lp),
        "topk_kl_backward_logq": dict(grad_kl=grad, **lens, target_idx=idx, target_logp=lp, logq=logq),
        "replay_scatter": dict(hidden=h, positions=torch.tensor([1, 3], device=device),
                               values=torch.randn(2, 16, device=device), mode="add"),
        "select_tokens": dict(entropy=torch.rand(2, 6, device=device),
                              candidates=torch.ones(6, dtype=torch.bool, device=device), rule="ratio", value=[0.4],
                              side="low"),
    }


OPERATORS = list(_arguments("cpu"))


def _tensor_names(args):
    return [name for name, v in args.items() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", OPERATORS)
def test_one_meta_argument_is_named(name, device):
    args = _arguments(device)[name]
    op = getattr(torch.ops.actreplay, name).default
    for meta in _tensor_names(args):
        given = dict(args, **{meta: args[meta].to("meta")})
        first_real = next(n for n in _tensor_names(args) if n != meta)
        with pytest.raises(ValueError, match=rf"^actreplay\.{name}: argument '{meta}' is on the meta device \(a "
                                             rf"tensor without data, .*\) but '{first_real}' is on {device}"):
            op(*given.values())


@pytest.mark.parametrize("name", OPERATORS)
def test_one_real_argument_among_meta_ones_is_an_error(name, device):
    args = _arguments(device)[name]
    op = getattr(torch.ops.actreplay, name).default
    for real in _tensor_names(args):
        given = {n: v.to("meta") if isinstance(v, torch.Tensor) and n != real else v for n, v in args.items()}
        with pytest.raises(ValueError, match=rf"^actreplay\.{name}: argument '\w+' is on the meta device .* but "
                                             rf"'{real}' is on {device}"):
            op(*given.values())


@pytest.mark.parametrize("name", OPERATORS)
def test_all_meta_arguments_infer_shapes(name):
    args = _arguments("cpu")[name]
    op = getattr(torch.ops.actreplay, name).default
    real = op(*args.values())
    fake = op(*(v.to("meta") if isinstance(v, torch.Tensor) else v for v in args.values()))
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    for r, f in zip(real, fake):
        assert f.device.type == "meta" and f.shape == r.shape and f.dtype == r.dtype


def test_the_python_face_names_the_meta_argument(device):
    h, U, w = torch.randn(3, 8, device=device), torch.randn(10, 8, device=device), torch.rand(8, device=device)
    meta_w = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match="^actreplay.lens_entropy: argument 'norm_weight' is on the meta device"):
        ops.lens_entropy(h, U, meta_w, 1e-6, 2)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]], device=device)
    lp = torch.log_softmax(torch.randn(3, 2, device=device), -1)
    with pytest.raises(ValueError, match="^actreplay.topk_logp: argument 'unembed' is on the meta device"):
        ops.topk_logp(h, U.to("meta"), w, 1e-6, idx)
    # through autograd (a hidden state that requires grad) as the replay loop calls it
    with pytest.raises(ValueError, match="^actreplay.topk_kl_logq: argument 'norm_weight' is on the meta device"):
        ops.topk_kl(h.clone().requires_grad_(), U, meta_w, 1e-6, idx, lp)
    with pytest.raises(ValueError, match="^actreplay.replay_scatter: argument 'values' is on the meta device"):
        ops.replay_scatter(h, torch.tensor([0], device=device), torch.empty(1, 8, device="meta"), "add")
    with pytest.raises(ValueError, match="^actreplay.select_tokens: argument 'candidates' is on the meta device"):
        ops.select_tokens(torch.rand(2, 3, device=device), torch.ones(3, dtype=torch.bool, device="meta"))
