"""Preconditioned conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import math
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
    The first two directions also probe symmetry, without a matvec of their own:
    ``<p_0, A p_1>`` must equal ``<A p_0, p_1>``; a system where they differ beyond
    rounding stops with ``Status.NONSYMMETRIC`` (use GMRES or BiCGSTAB). Like the true
    residual at the end, the probe is a fixed cost per solve, not per iteration.

    A stopped system moves by a zero step (``alpha = 0``) instead of a masked copy of
    ``x`` and ``r``: exact, because its ``p`` (kept by a mask) and ``A p`` are finite
    (a non-finite ``p^T A p`` stops a system as ``NONFINITE``, whose solution is NaN
    anyway). Each iteration is one matvec, one inner product, one norm and three
    fused vector updates.

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
        first = Ab = None
        history = [rnorm] if self.history else None
        running = status == B.RUNNING
        for k in range(1, maxiter + 1):
            if B.all_finished(running, k - 1):
                break
            Ap = op(p)
            if k == 1:
                first = (p, Ap)
                if p is b:  # from x0 = 0 without a preconditioner: A b, reused by finish
                    Ab = Ap
            elif k == 2:  # the symmetry probe, once per solve: the first two directions
                status = B.mark(status, running & B.asymmetric(*first, p, Ap), Status.NONSYMMETRIC)
                running, first = status == B.RUNNING, None
            pAp = B.dot(p, Ap)
            finite_pAp = torch.isfinite(pAp)
            negative = finite_pAp & (pAp <= 0)
            moving = running & ~negative
            alpha = rz / torch.where(moving, pAp, math.inf)  # exactly 0 for a stopped system: frozen
            x = B.axpy(alpha, p, x)
            r = B.axpy(-alpha, Ap, r)
            rnorm_new = B.norm(r)
            ok = finite_pAp & torch.isfinite(rnorm_new)
            step = moving & ok
            rnorm = torch.where(step, rnorm_new, rnorm)
            its = its + step
            z = precond(r)
            rz_new = rnorm_new * rnorm_new if plain else B.dot(r, z)
            # A running system's new status, by priority; (r, M r) must stay positive for an SPD M.
            after = torch.where(rz_new > 0, B.RUNNING, int(Status.BREAKDOWN))
            after = torch.where(rnorm <= s.tol, int(Status.CONVERGED), after)
            after = torch.where(ok, after, int(Status.NONFINITE))
            after = torch.where(negative, int(Status.NEGATIVE_CURVATURE), after)
            status = torch.where(running, after, status)
            running = status == B.RUNNING
            p = B.select(running, B.axpy(rz_new / torch.where(running, rz, 1.0), p, z), p)
            rz = torch.where(running, rz_new, rz)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol, Ab)
