"""Plain-PyTorch oracles of the four operators, with the operators' signatures.

They materialise full ``[N, V]`` logits and are written for clarity, not speed:
tests compare the C++/CUDA kernels against them (usually on float64 copies of
the inputs), and the benchmarks use them as the baseline. They compute in
float32, or float64 when given float64 inputs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["rms_norm", "lens_logits", "topk_desc_lower_index", "lens_entropy", "select_tokens", "replay_scatter",
           "topk_kl", "topk_logp"]


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm(hidden: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``h * rsqrt(mean(h^2) + eps) * w`` in the accumulation dtype."""
    x = hidden.to(_acc(hidden))
    if norm_weight is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(x.dtype)


def lens_logits(
    hidden: torch.Tensor, unembed: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """Full logit lens ``[N, V]``."""
    x = rms_norm(hidden, norm_weight, eps)
    return x @ unembed.to(x.dtype).T


def topk_desc_lower_index(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries per row in descending order, equal values in
    increasing index order (``torch.topk`` leaves tie order unspecified); NaN
    is the largest value, as in ``torch.topk``."""
    if k == 0:
        n = logits.shape[0]
        return logits.new_empty((n, 0)), torch.empty((n, 0), dtype=torch.long, device=logits.device)
    if bool(logits.isnan().any()):  # stable sorts: by value (NaN as +inf), then NaN first
        by_value = logits.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
        order = by_value.argsort(dim=-1, descending=True, stable=True)
        nan_first = logits.isnan().gather(1, order).int().argsort(dim=-1, descending=True, stable=True)
        order = order.gather(1, nan_first)[:, :k]
        return logits.gather(1, order), order
    kth = logits.topk(k, dim=-1).values[:, -1:]
    above = logits > kth
    at_kth = logits == kth
    # Among values equal to the k-th, keep the lowest indices.
    room = k - above.sum(-1, keepdim=True)
    keep = above | (at_kth & (at_kth.cumsum(-1) <= room))
    idx = keep.nonzero()[:, 1].view(logits.shape[0], k)  # increasing index per row
    vals = logits.gather(1, idx)
    order = vals.argsort(dim=-1, descending=True, stable=True)
    return vals.gather(1, order), idx.gather(1, order)


def lens_entropy(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    topk: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operator's contract: for float16/bfloat16 inputs the normalised hidden
    state is rounded to the input dtype (as the model's RMSNorm returns it, and
    as the CUDA GEMM reads it) and the products and sums are float32; float32
    and float64 inputs keep their own precision throughout."""
    if topk < 0 or topk > unembed.shape[0]:
        raise ValueError(f"topk must be in [0, V={unembed.shape[0]}], got {topk}")
    x = rms_norm(hidden, norm_weight, eps)
    if hidden.dtype in (torch.float16, torch.bfloat16):
        x = x.to(hidden.dtype).to(x.dtype)
    logits = x @ unembed.to(x.dtype).T
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse[:, None]
    # A -inf logit has probability 0 and adds 0 (not 0 * -inf); a +inf one makes the row NaN, as in torch.
    entropy = -torch.where(logp == -math.inf, 0.0, logp.exp() * logp).sum(-1)
    vals, idx = topk_desc_lower_index(logits, topk)
    return entropy, lse, vals, idx


def _layer_values(value: Union[float, Sequence[float]], L: int) -> list:
    vals = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return vals * L if len(vals) == 1 else vals


def _count_for(value: float, n_cand: int) -> int:
    """A count (value >= 1, floored) or a fraction of n_cand, clamped to [0, n_cand]; NaN picks none."""
    c = math.floor(value) if value >= 1 else value * n_cand
    if c != c or c <= 0:
        return 0
    return n_cand if c >= n_cand else int(math.floor(c))


def select_tokens(
    entropy: torch.Tensor,
    candidates: torch.Tensor,
    rule: str = "ratio",
    value: Union[float, Sequence[float]] = 0.4,
    side: str = "low",
) -> torch.Tensor:
    """The mask lives on ``entropy``'s device, whatever device ``candidates`` is on."""
    L, N = entropy.shape
    values = _layer_values(value, L)
    mask = torch.zeros(L, N, dtype=torch.bool, device=entropy.device)
    cand_idx = candidates.to(entropy.device).nonzero().flatten()
    if cand_idx.numel() == 0:
        return mask
    for layer in range(L):
        e = entropy[layer, cand_idx]
        v = values[layer]
        if rule == "ratio":
            low = e <= v * e.max()
        elif rule == "absolute":
            low = e < v
        elif rule == "topk":
            low = None
        else:
            raise ValueError(f"unknown rule {rule!r}")
        if low is not None and side == "low":
            mask[layer, cand_idx[low]] = True
            continue
        count = int(low.sum()) if low is not None else _count_for(v, cand_idx.numel())
        # Stable sort over candidates in index order: ties keep the lower index first.
        order = torch.sort(e, descending=(side == "high"), stable=True).indices
        mask[layer, cand_idx[order[:count]]] = True
    return mask


def replay_scatter(
    hidden: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, mode: str = "add"
) -> torch.Tensor:
    if mode == "add":
        return hidden.index_add(0, positions, values)
    if mode == "replace":
        return hidden.index_copy(0, positions, values)
    raise ValueError(f"mode must be 'add' or 'replace', got {mode!r}")


def topk_kl(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    eps: float,
    target_idx: torch.Tensor,
    target_logp: torch.Tensor,
) -> torch.Tensor:
    """Materialises the full-vocabulary logits, as the published code does."""
    logits = lens_logits(hidden, unembed, norm_weight, eps)
    q = torch.log_softmax(logits.gather(1, target_idx), dim=-1)
    lp = target_logp.to(q.dtype)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - q), torch.zeros_like(q))
    return terms.sum(-1)


def topk_logp(
    hidden: torch.Tensor,
    unembed: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    eps: float,
    target_idx: torch.Tensor,
) -> torch.Tensor:
    """``log_softmax`` of the logit lens gathered at ``target_idx`` (full logits first)."""
    logits = lens_logits(hidden, unembed, norm_weight, eps)
    return torch.log_softmax(logits.gather(1, target_idx), dim=-1)
