"""Preconditioned conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec
from ._result import SolveResult, Status


@dataclass(frozen=True, kw_only=True)
class CG(B.IterativeSolver):
    """Conjugate gradients (Hestenes & Stiefel, 1952).

    For symmetric positive definite ``A`` (and SPD preconditioner ``M``), CG picks
    the iterate ``x_k`` in ``x_0 + K_k(MA, M r_0)`` minimising the ``A``-norm of
    the error. Each step moves along a direction ``p_k`` that is ``A``-conjugate
    to all previous ones::

        alpha = (r, z) / (p, A p);  x += alpha p;  r -= alpha A p
        z = M r;  beta = (r_new, z_new) / (r, z);  p = z + beta p

    One matvec per iteration, a handful of vectors of memory; in exact arithmetic
    it terminates in at most ``n`` steps, and the error contracts by
    ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)`` per step.

    When a direction has ``p^T A p <= 0`` the operator is not positive definite:
    that system stops at its last iterate with ``Status.NEGATIVE_CURVATURE``
    (use :class:`~bilevel.solvers.MINRES` or :class:`~bilevel.solvers.GMRES`).
    Successive directions also probe symmetry for free: ``<p_{k-1}, A p_k>`` must
    equal ``<A p_{k-1}, p_k>``; a system where they differ beyond rounding stops with
    ``Status.NONSYMMETRIC`` (use GMRES or BiCGSTAB).

    Args:
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``.
        maxiter: iteration cap per system; ``None`` means ``10 n`` (scipy's default).
        M: preconditioner, a callable applying ``M ~ A^{-1}`` (must be SPD).
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every iteration.
    """


    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        op, precond, s, maxiter = self.start(matvec, b, x0, default_maxiter=lambda n: 10 * n)
        x, r, rnorm, status, its = s.x, s.r, s.rnorm, s.status, s.iterations
        z = precond(r)
        rz = B.dot(r, z)
        p = z
        p_prev = Ap_prev = Ab = None
        history = [rnorm] if self.history else None

        for k in range(1, maxiter + 1):
            if B.all_finished(status == B.RUNNING, k - 1):
                break
            active = status == B.RUNNING
            Ap = op(p)
            if k == 1 and p is b:  # from x0 = 0 without a preconditioner: A b, reused by finish
                Ab = Ap
            if p_prev is not None:
                status = B.mark(status, active & B.asymmetric(p_prev, Ap_prev, p, Ap), Status.NONSYMMETRIC)
                active = status == B.RUNNING
            p_prev, Ap_prev = p, Ap
            pAp = B.dot(p, Ap)
            negative = active & (pAp <= 0)
            status = B.mark(status, negative, Status.NEGATIVE_CURVATURE)
            alpha = B.safe_div(rz, pAp, pAp > 0)
            x_new = x + B.vec(alpha) * p
            r_new = r - B.vec(alpha) * Ap
            rnorm_new = B.norm(r_new)
            ok = torch.isfinite(pAp) & torch.isfinite(rnorm_new)
            status = B.mark(status, active & ~negative & ~ok, Status.NONFINITE)
            step = active & ~negative & ok
            x = B.select(step, x_new, x)
            r = B.select(step, r_new, r)
            rnorm = B.select(step, rnorm_new, rnorm)
            its = its + step.long()
            status = B.mark(status, step & (rnorm <= s.tol), Status.CONVERGED)
            go = status == B.RUNNING

            z = precond(r)
            rz_new = B.dot(r, z)
            # (r, M r) must stay positive for an SPD preconditioner.
            status = B.mark(status, go & ~(rz_new > 0), Status.BREAKDOWN)
            go = status == B.RUNNING
            beta = B.safe_div(rz_new, rz, go)
            p = B.select(go, z + B.vec(beta) * p, p)
            rz = B.select(go, rz_new, rz)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol, Ab)
