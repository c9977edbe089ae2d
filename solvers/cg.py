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

    A system that has stopped is frozen by a zero step (``alpha = 0``, and its ``p``
    kept as ``1 * p + 0 * z``) rather than by a masked copy of every vector: exact,
    because a stopped system's ``p`` and ``A p`` are finite (a non-finite ``p^T A p``
    stops a system as ``NONFINITE``, not as negative curvature, and a ``NONFINITE``
    system's solution is NaN anyway). Each iteration is one matvec, three inner
    products, three norms and four fused vector updates.

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
        plain = self.M is None  # then z = r and (r, z) = ||r||^2, already known
        z = precond(r)
        rz = rnorm * rnorm if plain else B.dot(r, z)
        p = z
        p_prev = Ap_prev = norms_prev = Ab = None
        history = [rnorm] if self.history else None

        for k in range(1, maxiter + 1):
            if B.all_finished(status == B.RUNNING, k - 1):
                break
            active = status == B.RUNNING
            Ap = op(p)
            if k == 1 and p is b:  # from x0 = 0 without a preconditioner: A b, reused by finish
                Ab = Ap
            norms = (B.norm(p), B.norm(Ap))
            if p_prev is not None:
                asymmetric = B.asymmetric(p_prev, Ap_prev, p, Ap, norms=norms_prev + norms)
                status = B.mark(status, active & asymmetric, Status.NONSYMMETRIC)
                active = status == B.RUNNING
            p_prev, Ap_prev, norms_prev = p, Ap, norms
            pAp = B.dot(p, Ap)
            finite_pAp = torch.isfinite(pAp)
            negative = active & finite_pAp & (pAp <= 0)
            status = B.mark(status, negative, Status.NEGATIVE_CURVATURE)
            moving = active & ~negative
            # A stopped system moves by 0 (its p and A p are finite, see the class notes): frozen.
            alpha = B.masked_div(rz, pAp, moving)
            x = B.axpy(alpha, p, x)
            r = B.axpy(-alpha, Ap, r)
            rnorm_new = B.norm(r)
            ok = finite_pAp & torch.isfinite(rnorm_new)
            status = B.mark(status, moving & ~ok, Status.NONFINITE)
            step = moving & ok
            rnorm = torch.where(step, rnorm_new, rnorm)
            its = its + step.long()
            status = B.mark(status, step & (rnorm <= s.tol), Status.CONVERGED)
            go = status == B.RUNNING

            z = precond(r)
            rz_new = rnorm_new * rnorm_new if plain else B.dot(r, z)
            # (r, M r) must stay positive for an SPD preconditioner.
            status = B.mark(status, go & ~(rz_new > 0), Status.BREAKDOWN)
            go = status == B.RUNNING
            # p <- z + beta p for a running system; a stopped one keeps its p (1 * p + 0 * z).
            beta = torch.where(go, B.masked_div(rz_new, rz, go), torch.ones_like(rz))
            p = B.axpy(go.to(p.dtype), z, B.vec(beta) * p)
            rz = torch.where(go, rz_new, rz)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol, Ab)
