"""Truncated Neumann series (Richardson iteration) for contractive systems."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec
from ._result import SolveResult, Status


@dataclass(frozen=True, kw_only=True)
class Neumann(B.IterativeSolver):
    """Neumann series ``A^{-1} b = alpha sum_k (I - alpha A)^k b``.

    The series converges when the spectral radius of ``I - alpha A`` is below 1
    (for SPD ``A``: ``0 < alpha < 2 / lambda_max``). Its partial sums are the
    Richardson iteration ``x += alpha r; r = (I - alpha A) r``, whose residual
    ``r_k = (I - alpha A)^k r_0`` is each new term divided by ``alpha``: one
    matvec per term and no inner products, which makes it the cheapest (and
    slowest, error ``~ rho^k``) choice, popular for truncated implicit
    differentiation (Lorraine et al., 2020). With ``M`` the terms are
    ``(I - alpha M A)^k``.

    A system whose residual grows past ``divergence_factor`` times its initial
    norm (or to Inf) stops with ``Status.DIVERGED``: shrink ``alpha``.

    Args:
        alpha: step size; scale so that ``alpha * lambda_max(A) < 2``.
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``;
            set both to 0 for a fixed number of terms.
        maxiter: number of terms (matvecs) at most; ``None`` means 100.
        M: preconditioner applied to each residual.
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every iteration.
        divergence_factor: growth of ``||r||`` over ``||r_0||`` declared divergence.
    """

    alpha: float = 1.0
    divergence_factor: float = 1e3

    def __post_init__(self) -> None:
        super().__post_init__()
        B.check_positive("alpha", self.alpha)
        B.check_positive("divergence_factor", self.divergence_factor)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        op, precond, s, maxiter = self.start(matvec, b, x0, default_maxiter=lambda n: 100)
        x, r, rnorm, status, its = s.x, s.r, s.rnorm, s.status, s.iterations
        limit = self.divergence_factor * rnorm
        history = [rnorm] if self.history else None

        for k in range(1, maxiter + 1):
            if B.all_finished(status == B.RUNNING, k - 1):
                break
            active = status == B.RUNNING
            term = self.alpha * precond(r)
            x_new = x + term
            r_new = r - op(term)
            rnorm_new = B.norm(r_new)
            grew = (rnorm_new > limit) | torch.isinf(rnorm_new)
            status = B.mark(status, active & grew, Status.DIVERGED)
            bad = torch.isnan(rnorm_new)
            status = B.mark(status, active & ~grew & bad, Status.NONFINITE)
            step = active & ~grew & ~bad
            x = B.select(step, x_new, x)
            r = B.select(step, r_new, r)
            rnorm = B.select(step, rnorm_new, rnorm)
            its = its + step.long()
            status = B.mark(status, step & (rnorm <= s.tol), Status.CONVERGED)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol)
