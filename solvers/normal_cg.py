"""Conjugate gradients on the normal equations (CGLS) for any nonsingular or least-squares system."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec
from ._result import SolveResult, Status


@dataclass(frozen=True, kw_only=True)
class NormalCG(B.IterativeSolver):
    """CG on ``A^T A x = A^T b`` in the CGLS form (Hestenes & Stiefel, 1952; Paige & Saunders, 1982).

    Works for any ``A``: symmetric or not, definite or not, and for inconsistent
    systems (it converges to a least-squares solution). ``A^T`` is applied as the
    vector-Jacobian product of the linear ``matvec`` (``torch.func.vjp``, traced
    once), so only ``v -> A v`` is needed. Per iteration, with ``s = A^T r``::

        q = A p;  alpha = ||s||^2 / ||q||^2;  x += alpha p;  r -= alpha q
        s = A^T r;  beta = ||s_new||^2 / ||s||^2;  p = s + beta p

    Two operator applications per iteration (one forward, one transposed); the
    error contracts with the condition number of ``A^T A``, the square of ``A``'s,
    so GMRES is usually faster on well-behaved nonsymmetric systems. This is the
    default of jaxopt's and torchopt's nonsymmetric implicit differentiation.

    The stopping test is on the system's own residual ``||b - A x||``. A system whose
    residual has become orthogonal to the range of ``A`` to rounding,
    ``||A^T r|| <= sqrt(eps) ||A|| ||r||`` (``||A||`` bounded below by the largest
    ``||A p|| / ||p||`` met), while ``||r||`` stays above the tolerance, has reached a
    least-squares solution of an inconsistent system: it stops with ``Status.SINGULAR``.

    Args:
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``.
        maxiter: iteration cap per system; ``None`` means ``10 n``.
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every iteration.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.M is not None:
            raise ValueError("NormalCG takes no preconditioner (M=None); precondition the operator "
                             "itself, or use GMRES(M=...)")

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        op, _, s0, maxiter = self.start(matvec, b, x0, default_maxiter=lambda n: 10 * n)
        _, transpose = torch.func.vjp(op, torch.zeros_like(b))

        def rmatvec(u: Tensor) -> Tensor:
            return transpose(u)[0]

        x, r, rnorm, status, its = s0.x, s0.r, s0.rnorm, s0.status, s0.iterations
        s = rmatvec(r)
        gamma = B.dot(s, s)
        orthogonal = math.sqrt(B.machine_eps(b.dtype))
        scale = torch.zeros_like(rnorm)  # running lower bound on ||A||: max ||A p|| / ||p||
        p = s
        history = [rnorm] if self.history else None

        for k in range(1, maxiter + 1):
            if B.all_finished(status == B.RUNNING, k - 1):
                break
            active = status == B.RUNNING
            q = op(p)
            qq = B.dot(q, q)
            scale = torch.maximum(scale, B.safe_div(qq.sqrt(), B.norm(p), B.norm(p) > 0))
            alpha = B.safe_div(gamma, qq, qq > 0)
            x_new = x + B.vec(alpha) * p
            r_new = r - B.vec(alpha) * q
            rnorm_new = B.norm(r_new)
            ok = torch.isfinite(rnorm_new)
            status = B.mark(status, active & ~ok, Status.NONFINITE)
            status = B.mark(status, active & ok & ~(qq > 0), Status.BREAKDOWN)
            step = active & ok & (qq > 0)
            x = B.select(step, x_new, x)
            r = B.select(step, r_new, r)
            rnorm = B.select(step, rnorm_new, rnorm)
            its = its + step.long()
            status = B.mark(status, step & (rnorm <= s0.tol), Status.CONVERGED)

            s_new = rmatvec(r)
            gamma_new = B.dot(s_new, s_new)
            go = status == B.RUNNING
            # r orthogonal to the range of A (to rounding): a least-squares solution, no further progress.
            status = B.mark(status, go & (gamma_new.sqrt() <= orthogonal * scale * rnorm), Status.SINGULAR)
            go = status == B.RUNNING
            beta = B.safe_div(gamma_new, gamma, go)
            p = B.select(go, s_new + B.vec(beta) * p, p)
            gamma = B.select(go, gamma_new, gamma)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s0.tol)
