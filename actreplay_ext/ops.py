"""Python face of the `actreplay` operators: keyword-friendly wrappers, autograd
formulas and fake (meta) implementations so that `torch.compile` can trace them.

The kernels themselves are C++/CUDA (csrc/) and registered as
``torch.ops.actreplay.*`` when ``actreplay_ext._C`` is imported. Plain-PyTorch
oracles with the same signatures live in :mod:`actreplay_ext.reference`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

import actreplay_ext._C  # noqa: F401  (registers torch.ops.actreplay)

__all__ = ["lens_entropy", "select_tokens", "replay_scatter", "topk_kl", "topk_logp", "result_dtype"]

_ops = torch.ops.actreplay


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the operators' floating-point results (and sums) for inputs of `dtype`:
    float64 for float64, else float32. The replay adds its offsets and keeps its targets
    in it, so that a float64 model's replay loses nothing to a float32 rounding."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return result_dtype(t.dtype)


def lens_entropy(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    topk: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logit-lens entropy, log-sum-exp and top-k of each row of ``hidden``.

    ``z = RMSNorm(hidden) @ unembed.T`` (RMSNorm in float32 when ``norm_weight``
    is given), reduced without materialising ``[N, V]`` logits. Precision, on
    every device: float32 and float64 inputs stay in their dtype; for bfloat16
    and float16 the normalised hidden state is rounded to the input dtype (as the
    model's own RMSNorm returns it) and the products and sums are float32 (the
    tensor-core GEMM on CUDA). ``reference.lens_entropy`` is this contract. Returns
    ``(entropy[N], lse[N], topk_logits[N, topk], topk_idx[N, topk])``; top-k in
    descending order, ties broken by lower index. A row with a NaN logit has NaN
    entropy and lse, and its top-k ranks NaN first (as ``torch.topk``); a +inf
    logit gives lse +inf and entropy NaN. Not differentiable.
    """
    return _ops.lens_entropy(hidden, unembed, norm_weight, float(eps), int(topk))


def select_tokens(
    entropy: torch.Tensor,
    candidates: torch.Tensor,
    rule: str = "ratio",
    value: Union[float, Sequence[float]] = 0.4,
    side: str = "low",
) -> torch.Tensor:
    """Boolean ``[L, N]`` mask of the tokens each layer row selects (SPEC §3-4).

    ``rule="ratio"``: ``E <= value * max(E over candidates)``;
    ``rule="absolute"``: ``E < value``; ``rule="topk"``: the ``value`` lowest
    (``value >= 1`` is a count, ``0 <= value < 1`` a fraction of the candidates,
    floored). ``side="high"`` picks as many tokens as the low side would, from
    the highest entropies. ``value`` is one number or one per row.
    """
    if isinstance(value, (int, float)):
        value = [float(value)]
    return _ops.select_tokens(entropy, candidates, rule, [float(v) for v in value], side)


def replay_scatter(
    hidden: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, mode: str = "add"
) -> torch.Tensor:
    """``hidden`` with ``values`` added (``"add"``) or written (``"replace"``) at
    rows ``positions``. Differentiable in ``values`` and ``hidden``."""
    return _ops.replay_scatter(hidden, positions, values, mode)


def topk_kl(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    eps: float,
    target_idx: torch.Tensor,
    target_logp: torch.Tensor,
) -> torch.Tensor:
    """Per-row ``sum_j p_j (log p_j - log_softmax(z[target_idx])_j)``, ``p = exp(target_logp)``,
    from the ``k`` gathered unembedding rows only. Differentiable in ``hidden``; the
    gradient takes each row of ``p`` to sum to 1 (log-probabilities, as targets are).

    The forward keeps ``log q`` [M, k] (in the result type, float32 or float64 for
    float64 inputs, whatever the targets' type) and the backward reads it instead
    of recomputing the ``k`` dot products of each row (``topk_kl_logq``: the same
    values and gradients, bitwise, as ``torch.ops.actreplay.topk_kl``, which
    recomputes them)."""
    return _ops.topk_kl_logq(hidden, unembed, norm_weight, float(eps), target_idx, target_logp)[0]


def topk_logp(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    eps: float,
    target_idx: torch.Tensor,
) -> torch.Tensor:
    """``log_softmax(z[target_idx])`` per row ``[M, k]`` (float32; float64 for float64
    inputs), computed exactly as ``topk_kl`` computes it: targets made from the
    same rows give a KL of exactly 0 and a gradient of exactly 0. Not differentiable."""
    return _ops.topk_logp(hidden, unembed, norm_weight, float(eps), target_idx)


# ---------------------------------------------------------------- fake tensors
#
# A call that mixes a meta tensor (no data) with real ones dispatches to the Meta kernel,
# which register_fake registers: without a check it would return uninitialised memory on the
# real tensors' device. Under FakeTensorMode (torch.compile, opcheck) every tensor reports
# the one device it fakes, so the check passes there.


def _one_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Refuse a mix of meta and real tensors, naming the meta argument."""
    given = {name: t for name, t in tensors.items() if t is not None}
    meta = [name for name, t in given.items() if t.device.type == "meta"]
    real = [name for name in given if name not in meta]
    if meta and real:
        raise ValueError(
            f"actreplay.{op}: argument '{meta[0]}' is on the meta device (a tensor without data, e.g. a weight "
            f"accelerate offloaded) but '{real[0]}' is on {given[real[0]].device}; all tensors must be on one device"
        )


@torch.library.register_fake("actreplay::lens_entropy")
def _lens_entropy_fake(hidden, unembed, norm_weight, eps, topk=0):
    _one_device("lens_entropy", hidden=hidden, unembed=unembed, norm_weight=norm_weight)
    torch._check(hidden.dim() == 2 and unembed.dim() == 2, lambda: "hidden and unembed must be 2-D")
    torch._check(unembed.shape[1] == hidden.shape[1], lambda: "unembed must be [V, D]")
    torch._check(0 <= topk <= unembed.shape[0], lambda: "topk must be in [0, V]")
    n, dt = hidden.shape[0], _result_dtype(hidden)
    return (
        hidden.new_empty((n,), dtype=dt),
        hidden.new_empty((n,), dtype=dt),
        hidden.new_empty((n, topk), dtype=dt),
        hidden.new_empty((n, topk), dtype=torch.int64),
    )


@torch.library.register_fake("actreplay::select_tokens")
def _select_tokens_fake(entropy, candidates, rule, value, side):
    _one_device("select_tokens", entropy=entropy, candidates=candidates)
    torch._check(entropy.dim() == 2, lambda: "entropy must be [L, N]")
    return entropy.new_empty(entropy.shape, dtype=torch.bool)


@torch.library.register_fake("actreplay::replay_scatter")
def _replay_scatter_fake(hidden, positions, values, mode):
    _one_device("replay_scatter", hidden=hidden, positions=positions, values=values)
    torch._check(values.shape[0] == positions.shape[0], lambda: "positions/values length mismatch")
    return torch.empty_like(hidden)


@torch.library.register_fake("actreplay::topk_kl")
def _topk_kl_fake(hidden, unembed, norm_weight, eps, target_idx, target_logp):
    _one_device("topk_kl", hidden=hidden, unembed=unembed, norm_weight=norm_weight, target_idx=target_idx,
                target_logp=target_logp)
    torch._check(target_idx.shape[0] == hidden.shape[0], lambda: "target_idx must be [M, k]")
    return hidden.new_empty((hidden.shape[0],), dtype=_result_dtype(hidden))


@torch.library.register_fake("actreplay::topk_logp")
def _topk_logp_fake(hidden, unembed, norm_weight, eps, target_idx):
    _one_device("topk_logp", hidden=hidden, unembed=unembed, norm_weight=norm_weight, target_idx=target_idx)
    torch._check(target_idx.shape[0] == hidden.shape[0], lambda: "target_idx must be [M, k]")
    return hidden.new_empty(tuple(target_idx.shape), dtype=_result_dtype(hidden))


@torch.library.register_fake("actreplay::topk_kl_logq")
def _topk_kl_logq_fake(hidden, unembed, norm_weight, eps, target_idx, target_logp):
    _one_device("topk_kl_logq", hidden=hidden, unembed=unembed, norm_weight=norm_weight, target_idx=target_idx,
                target_logp=target_logp)
    torch._check(target_idx.shape[0] == hidden.shape[0], lambda: "target_idx must be [M, k]")
    dtype = _result_dtype(hidden)
    return hidden.new_empty((hidden.shape[0],), dtype=dtype), hidden.new_empty(tuple(target_idx.shape), dtype=dtype)


@torch.library.register_fake("actreplay::topk_kl_backward_logq")
def _topk_kl_backward_logq_fake(grad_kl, hidden, unembed, norm_weight, eps, target_idx, target_logp, logq):
    _one_device("topk_kl_backward_logq", grad_kl=grad_kl, hidden=hidden, unembed=unembed, norm_weight=norm_weight,
                target_idx=target_idx, target_logp=target_logp, logq=logq)
    return torch.empty_like(hidden)


@torch.library.register_fake("actreplay::topk_kl_backward")
def _topk_kl_backward_fake(grad_kl, hidden, unembed, norm_weight, eps, target_idx, target_logp):
    _one_device("topk_kl_backward", grad_kl=grad_kl, hidden=hidden, unembed=unembed, norm_weight=norm_weight,
                target_idx=target_idx, target_logp=target_logp)
    return torch.empty_like(hidden)


# -------------------------------------------------------------------- autograd


def _no_grad_for(ctx, names_and_flags, op):
    for name, needed in names_and_flags:
        if needed:
            raise RuntimeError(
                f"actreplay.{op} is differentiable in 'hidden' only; argument '{name}' "
                f"requires grad (detach it, or freeze the model weights)"
            )


def _topk_kl_setup(ctx, inputs, output):
    hidden, unembed, norm_weight, eps, target_idx, target_logp = inputs
    ctx.save_for_backward(hidden, unembed, norm_weight, target_idx, target_logp)
    ctx.eps = eps


def _topk_kl_backward(ctx, grad_kl):
    hidden, unembed, norm_weight, target_idx, target_logp = ctx.saved_tensors
    needs = ctx.needs_input_grad
    _no_grad_for(
        ctx,
        [("unembed", needs[1]), ("norm_weight", needs[2]), ("target_logp", needs[5])],
        "topk_kl",
    )
    grad_hidden = None
    if needs[0]:
        grad_hidden = _ops.topk_kl_backward(
            grad_kl.contiguous(), hidden, unembed, norm_weight, ctx.eps, target_idx, target_logp
        )
    return grad_hidden, None, None, None, None, None


torch.library.register_autograd(
    "actreplay::topk_kl", _topk_kl_backward, setup_context=_topk_kl_setup
)


def _topk_kl_logq_setup(ctx, inputs, output):
    hidden, unembed, norm_weight, eps, target_idx, target_logp = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden, unembed, norm_weight, target_idx, target_logp, output[1])
    ctx.eps = eps


def _topk_kl_logq_backward(ctx, grad_kl, _grad_logq):
    hidden, unembed, norm_weight, target_idx, target_logp, logq = ctx.saved_tensors
    needs = ctx.needs_input_grad
    _no_grad_for(ctx, [("unembed", needs[1]), ("norm_weight", needs[2]), ("target_logp", needs[5])], "topk_kl")
    grad_hidden = None
    if needs[0]:
        grad_hidden = _ops.topk_kl_backward_logq(
            grad_kl.contiguous(), hidden, unembed, norm_weight, ctx.eps, target_idx, target_logp, logq
        )
    return grad_hidden, None, None, None, None, None


torch.library.register_autograd(
    "actreplay::topk_kl_logq", _topk_kl_logq_backward, setup_context=_topk_kl_logq_setup
)


def _topk_kl_double_backward(ctx, grad_grad_hidden):
    raise RuntimeError(
        "actreplay.topk_kl: double backward (a gradient of its gradient, create_graph=True) is not "
        "implemented; the replay needs first derivatives only"
    )


# Its backward op records a node that refuses a second derivative, instead of none (a silent zero).
torch.library.register_autograd(
    "actreplay::topk_kl_backward", _topk_kl_double_backward, setup_context=lambda ctx, inputs, output: None
)
torch.library.register_autograd(
    "actreplay::topk_kl_backward_logq", _topk_kl_double_backward, setup_context=lambda ctx, inputs, output: None
)


def _lens_entropy_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _lens_entropy_backward(ctx, *grads):
    return None, None, None, None, None


# Not differentiable: the outputs never claim requires_grad, whatever the inputs.
torch.library.register_autograd(
    "actreplay::lens_entropy", _lens_entropy_backward, setup_context=_lens_entropy_setup
)
torch.library.register_autograd(
    "actreplay::topk_logp", lambda ctx, grad: (None,) * 5, setup_context=_lens_entropy_setup
)


def _replay_scatter_setup(ctx, inputs, output):
    hidden, positions, values, mode = inputs
    ctx.save_for_backward(positions)
    ctx.mode = mode


def _replay_scatter_backward(ctx, grad_out):
    (positions,) = ctx.saved_tensors
    grad_values = grad_out.index_select(0, positions) if ctx.needs_input_grad[2] else None
    grad_hidden = None
    if ctx.needs_input_grad[0]:
        # Overwritten rows do not depend on `hidden`.
        grad_hidden = grad_out if ctx.mode == "add" else grad_out.index_fill(0, positions, 0)
    return grad_hidden, None, grad_values, None


torch.library.register_autograd(
    "actreplay::replay_scatter", _replay_scatter_backward, setup_context=_replay_scatter_setup
)


# -------------------------------------------------------------------- autocast
#
# Without an autocast kernel the operators ran with autocast still on, so the at:: calls inside
# the C++ kernels were autocast (their products came back bfloat16 to a float32 kernel: "expected
# scalar type Float but found BFloat16"). Under autocast the lens operators (a matmul fused with a
# softmax reduction: autocast keeps softmax, log_softmax and kl_div in float32) compute in the
# common dtype of their operands (autocast's "promote" rule): with consistent operands, exactly
# what they compute without autocast. The others only turn autocast off.

#: per operator, the positions of the arguments autocast brings to one dtype: the lens operands (hidden,
#: unembed, norm_weight), whose dtypes must agree; none for replay_scatter and select_tokens
_PROMOTED_UNDER_AUTOCAST = {
    "lens_entropy": (0, 1, 2), "topk_logp": (0, 1, 2), "topk_kl": (0, 1, 2), "topk_kl_logq": (0, 1, 2),
    "topk_kl_backward": (1, 2, 3), "topk_kl_backward_logq": (1, 2, 3), "replay_scatter": (), "select_tokens": (),
}

_autocast_lib = torch.library.Library("actreplay", "IMPL")  # kept alive: its registrations last as long


def _promoted(args: tuple, positions: Sequence[int]) -> tuple:
    """`args` with the floating-point tensors at `positions` cast to their widest dtype."""
    floats = [args[i] for i in positions if isinstance(args[i], torch.Tensor) and args[i].is_floating_point()]
    if not floats:
        return args
    dtype = floats[0].dtype
    for t in floats[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(a.to(dtype) if i in positions and isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for i, a in enumerate(args))


def _autocast_kernel(name: str, device_type: str):
    op = getattr(_ops, name).default
    positions = _PROMOTED_UNDER_AUTOCAST[name]

    def kernel(*args):
        with torch.autocast(device_type, enabled=False):  # excludes this key: the call goes to the kernel
            return op(*_promoted(args, positions))

    return kernel


for _name in _PROMOTED_UNDER_AUTOCAST:
    for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _autocast_lib.impl(_name, _autocast_kernel(_name, _device_type), _key)
