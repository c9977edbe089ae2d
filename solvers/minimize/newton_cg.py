"""Truncated Newton-CG (Hessian-free) with a backtracking line search."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .._base import all_finished, check_count, dot, norm, safe_div, select, vec
from ._base import FlatProblem, Iterate, LineSearch, Minimizer


@dataclass(frozen=True, kw_only=True)
class NewtonCG(Minimizer):
    """Line-search Newton-CG (Nocedal and Wright, *Numerical Optimization*, Algorithm 7.1).

    Each iteration solves the Newton system ``H d = -g`` approximately by conjugate
    gradients on Hessian-vector products (never forming ``H``; the gradient is
    linearized once per iteration and each product is one reverse pass through it),
    from ``d = 0``, until ``||H d + g|| <= eta ||g||`` with the forcing term
    ``eta = min(1/2, sqrt(||g|| / ||g_0||))`` (superlinear convergence; Dembo and
    Steihaug, 1983), or ``cg_maxiter`` products. Where CG meets a direction of
    non-positive curvature ``p^T H p <= 0`` it stops, as Steihaug's method does, and
    returns its last iterate, a descent direction; at the first product that is
    ``-g`` itself. The step is backtracked from 1
    (:class:`~bilevel.solvers.minimize.LineSearch`; from twice the last
    steepest-descent step after a ``-g`` direction). A problem whose search fails
    stops with ``NO_DECREASE``. Cost per iteration: one gradient and its
    linearization, at most ``cg_maxiter`` Hessian-vector products, one gradient
    per line-search trial. The Hessian-free inner solve of iMAML-HF (Rajeswaran et
    al., NeurIPS 2019) and of Martens' Hessian-free optimization (ICML 2010).

    Args:
        cg_maxiter: Hessian-vector products per Newton step at most.
        line_search: the trials and the acceptance test.
        rtol, atol, maxiter: see :class:`~bilevel.solvers.minimize.Minimizer`.
    """

    maxiter: int = 200
    cg_maxiter: int = 50
    line_search: LineSearch = field(default_factory=LineSearch)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("cg_maxiter", self.cg_maxiter, allow_none=False)
        if not isinstance(self.line_search, LineSearch):
            raise TypeError(f"line_search must be a LineSearch, got {type(self.line_search).__name__}")

    def iterate(self, problem: FlatProblem, state: Iterate) -> None:
        step = torch.ones_like(state.f)
        for k in range(self.maxiter):
            if state.done(k):
                break
            d, newton = self.direction(problem.hessian_at(state.x), state)
            t0 = torch.where(newton, torch.ones_like(step), 2 * step)
            previous_active = state.active
            accepted, x, f, g, t = self.line_search(problem, state, d, t0)
            state.advance(accepted, x, f, g)
            step = torch.where(accepted & ~newton, t, step)
            state.stall(previous_active & ~accepted)

    def direction(self, hvp: Callable[[Tensor], Tensor], state: Iterate) -> tuple[Tensor, Tensor]:
        """``(d, newton)``: the truncated CG solution of ``H d = -g`` per problem, and whether it
        is one (False where the first direction had non-positive curvature and ``d = -g``)."""
        g = state.g
        eta = torch.clamp(torch.sqrt(safe_div(state.gnorm, state.gnorm0, state.gnorm0 > 0)), max=0.5)
        tol = eta * state.gnorm
        d = torch.zeros_like(g)
        r = -g
        p = r
        rr = dot(r, r)
        running = state.active
        steepest = torch.zeros_like(running)
        for j in range(self.cg_maxiter):
            if all_finished(running, j):
                break
            Hp = hvp(p)
            pHp = dot(p, Hp)
            curved = torch.isfinite(pHp) & (pHp > 0)
            steepest = steepest | (running & ~curved & (j == 0))
            running = running & curved
            alpha = safe_div(rr, pHp, curved)
            d = select(running, d + vec(alpha) * p, d)
            r = select(running, r - vec(alpha) * Hp, r)
            rr_new = dot(r, r)
            running = running & (torch.sqrt(rr_new) > tol)
            p = select(running, r + vec(safe_div(rr_new, rr, running)) * p, p)
            rr = torch.where(running, rr_new, rr)
        return select(steepest, -g, d), ~steepest
