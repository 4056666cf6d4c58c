"""The replay loop's update rules (`ReplayConfig.optimizer`).

"sgd" is the published plain gradient descent, `delta -= lr * grad` after every
loss evaluation, and the default.

"lbfgs" is limited-memory BFGS with one loss and gradient evaluation per step
and no per-model step size: the published lr = 10 suits Qwen2.5-VL-7B, while a
random tiny model's loss rises at lr >= 1 and the best step size of the tiny
families spans 0.003 ... 1. Its first step moves the offsets by `lr` times the
norm of the visual tokens' hidden states (the input of the offset layer), so
it is relative to the model's own scale; after that the quasi-Newton step from
the last (up to) 8 changes of offsets and gradients is taken whole. A step
that raises the loss is undone and retried shorter (the minimum of the
quadratic through the two losses and the slope, kept within 0.1 ... 0.5 of the
step), so no evaluation is spent on a line search while the loss goes down.
It returns the best offsets it evaluated: never worse than its start, and
their loss is the minimum of its losses (no update follows its last
evaluation). Its effect on benchmark accuracy is not measured yet: the
published numbers were obtained with "sgd".
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..config import OPTIMIZERS

__all__ = ["UpdateRule", "Sgd", "Lbfgs", "make_rule", "RowRules"]


class UpdateRule:
    """One optimiser's state over one loop. `update` changes `delta` in place
    after the loss and its gradient at `delta` are known; `finish` gives the
    offsets to return, from the last `delta` and its loss when it was evaluated."""

    #: Whether an update follows the last evaluation (the published loop's 25
    #: updates after 25 evaluations), or the last evaluation only scores.
    update_after_last = True

    def update(self, delta: torch.Tensor, grad: torch.Tensor, loss: float) -> None:
        raise NotImplementedError

    def finish(self, delta: torch.Tensor, loss: float) -> torch.Tensor:
        return delta


class Sgd(UpdateRule):
    def __init__(self, lr: float):
        self.lr = lr

    def update(self, delta, grad, loss):
        delta -= self.lr * grad  # exactly the published update


class Lbfgs(UpdateRule):
    update_after_last = False
    MEMORY = 8  # pairs kept: [n_visual, D] float32 each of s and y

    def __init__(self, first: float, scale: float):
        self.first_length = first * scale  # the first step's length
        self.pairs: List[Tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / s.y), oldest first
        self.fraction = 1.0  # of the step `direction` taken from the best point
        self.best_loss = float("inf")
        self.best_delta: Optional[torch.Tensor] = None
        self.best_grad: Optional[torch.Tensor] = None
        self.direction: Optional[torch.Tensor] = None

    def _quasi_newton(self, g: torch.Tensor) -> torch.Tensor:
        """-H g by the two-loop recursion, H0 = (s.y / y.y) I from the newest pair."""
        q = g.clone()
        coefficients = []
        for s, y, rho in reversed(self.pairs):
            a = rho * float((s * q).sum())
            coefficients.append(a)
            q -= a * y
        s, y, _ = self.pairs[-1]
        q *= float((s * y).sum()) / float((y * y).sum())
        for (s, y, rho), a in zip(self.pairs, reversed(coefficients)):
            q += (a - rho * float((y * q).sum())) * s
        return -q

    def update(self, delta, grad, loss):
        if loss <= self.best_loss:  # a new best point: learn the curvature from the step that reached it
            if self.best_delta is not None:
                s, y = delta.detach() - self.best_delta, grad - self.best_grad
                sy = float((s * y).sum())
                if sy > 1e-12 * float(s.norm()) * float(y.norm()):  # positive curvature only
                    self.pairs = (self.pairs + [(s, y, 1.0 / sy)])[-self.MEMORY:]
            self.best_loss, self.best_delta, self.best_grad = loss, delta.detach().clone(), grad.detach().clone()
            if self.pairs:
                self.direction = self._quasi_newton(grad)
            else:
                norm = float(grad.norm())
                self.direction = -grad * (self.first_length / norm if norm > 0 else 0.0)
            self.fraction = 1.0
        else:  # the loss rose: back to the best point, a shorter step along the same direction
            delta.copy_(self.best_delta)
            slope = float((self.best_grad * self.direction).sum()) * self.fraction  # d loss / d t at t = 0
            curvature = loss - self.best_loss - slope
            shrink = -slope / (2.0 * curvature) if curvature > 0 else 0.25
            self.fraction *= min(max(shrink, 0.1), 0.5)
        delta += self.fraction * self.direction

    def finish(self, delta, loss):  # the loop stops after an evaluation: `delta` is scored
        return delta if self.best_delta is None or loss <= self.best_loss else self.best_delta


def make_rule(optimizer: str, lr: float, hidden_visual: torch.Tensor) -> UpdateRule:
    """The rule `optimizer` with step size `lr`; `hidden_visual` (the visual
    tokens' hidden states at the offset layer's input) sets lbfgs's scale."""
    if optimizer == "sgd":
        return Sgd(lr)
    if optimizer == "lbfgs":
        return Lbfgs(lr, float(hidden_visual.float().norm()))
    raise ValueError(f"actreplay_ext: unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


class RowRules:
    """The update rule and the `tol` test of each prompt row of a batch, so a
    batch gives every row the offsets it gets alone. sgd without tol is one rule
    over all rows (the rows' gradients are independent and its update
    elementwise); lbfgs's curvature pairs, best point, step scale and accept
    test, and tol's gradient norms, are each row's own. A row that meets tol
    stops updating while the others go on; the loop ends when every row has
    stopped."""

    def __init__(self, optimizer: str, lr: float, hidden_visual: torch.Tensor, n_visual: List[int],
                 tol: Optional[float]):
        if optimizer == "sgd" and tol is None:
            n_visual = [sum(n_visual)]  # nothing per row: the published update on all offsets at once
        #: whether `observe` and `update` need each row's loss (`LossPlan.row_losses`)
        self.needs_losses = optimizer != "sgd"
        bounds = [0]
        for n in n_visual:
            bounds.append(bounds[-1] + n)
        self.slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        self.rules = [make_rule(optimizer, lr, hidden_visual[s]) for s in self.slices]
        self.update_after_last = self.rules[0].update_after_last
        self.row_of_token = torch.repeat_interleave(torch.arange(len(n_visual)), torch.tensor(n_visual)).to(
            hidden_visual.device)
        self.tol = tol
        self.first_norm: List[Optional[float]] = [None] * len(n_visual)
        self.active = [n > 0 for n in n_visual]
        self.last_loss = [0.0] * len(n_visual)

    def observe(self, grad: torch.Tensor, row_losses: Optional[List[float]], step: int) -> bool:
        """Record each active row's loss at this evaluation and apply tol (the
        gradient norm at most tol times the row's first); whether any row goes on."""
        norms = None
        if self.tol is not None:  # one reduction and one host sync for all rows
            sq = torch.zeros(len(self.slices), device=grad.device, dtype=torch.float32)
            norms = sq.index_add_(0, self.row_of_token, grad.float().pow(2).sum(1)).sqrt().tolist()
        for r in range(len(self.slices)):
            if not self.active[r]:
                continue
            if row_losses is not None:
                self.last_loss[r] = row_losses[r]
            if norms is not None:
                if self.first_norm[r] is None:
                    self.first_norm[r] = norms[r]
                elif step > 0 and norms[r] <= self.tol * self.first_norm[r]:
                    self.active[r] = False
        return any(self.active)

    def update(self, delta: torch.Tensor, grad: torch.Tensor, row_losses: Optional[List[float]]) -> None:
        for r, s in enumerate(self.slices):
            if self.active[r]:
                self.rules[r].update(delta[s], grad[s], None if row_losses is None else row_losses[r])

    def finish(self, delta: torch.Tensor) -> torch.Tensor:
        pieces = [rule.finish(delta[s], loss) for rule, s, loss in zip(self.rules, self.slices, self.last_loss)]
        return pieces[0] if len(pieces) == 1 else torch.cat([p.detach() for p in pieces])
