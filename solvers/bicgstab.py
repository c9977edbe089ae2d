"""BiCGSTAB for general (nonsymmetric) systems with short recurrences."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec
from ._result import SolveResult, Status


@dataclass(frozen=True, kw_only=True)
class BiCGSTAB(B.IterativeSolver):
    """Bi-conjugate gradient stabilized (van der Vorst, 1992).

    BiCG's residuals are orthogonal to a shadow Krylov space of ``A^T``; CGS
    squares its residual polynomial without needing ``A^T``; BiCGSTAB instead
    multiplies it by a local minimal-residual factor ``(1 - omega A)`` each step,
    which smooths CGS's erratic convergence. Per iteration, with shadow residual
    ``r^`` fixed to ``r_0``::

        rho = (r^, r);  p = r + (rho/rho_old)(alpha/omega)(p - omega v)
        v = A M p;  alpha = rho / (r^, v);  s = r - alpha v
        t = A M s;  omega = (t, s) / (t, t)
        x += alpha M p + omega M s;  r = s - omega t

    Two matvecs per iteration and constant memory, unlike GMRES; no minimisation
    property, so the residual is not monotone. A system whose half step already
    meets the tolerance stops there.

    When ``(r^, r)`` vanishes (relative to the vectors' norms, at machine precision)
    the recurrence restarts with the current residual as the shadow ``r^`` (an
    operator that maps part of the space to zero makes the first shadow, ``r_0``,
    orthogonal to ``r_1``). ``Status.BREAKDOWN`` is reported when it vanishes again
    right after a restart, when ``(r^, v)`` vanishes or when ``omega`` becomes 0: the
    recurrence cannot continue; try GMRES.

    Args:
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``.
        maxiter: iteration cap per system; ``None`` means ``10 n``.
        M: preconditioner ``M ~ A^{-1}``, applied on the right.
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every iteration.
    """


    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        op, precond, s, maxiter = self.start(matvec, b, x0, default_maxiter=lambda n: 10 * n)
        eps = B.machine_eps(b.dtype)
        x, r, rnorm, status, its = s.x, s.r, s.rnorm, s.status, s.iterations
        history = [rnorm] if self.history else None

        rhat, rhat_norm = r, rnorm
        one = torch.ones_like(rnorm)
        rho_old, alpha, omega = one, one, one
        p = v = torch.zeros_like(r)
        fresh = torch.ones_like(status, dtype=torch.bool)  # shadow residual just set: a restart cannot help

        for k in range(1, maxiter + 1):
            if B.all_finished(status == B.RUNNING, k - 1):
                break
            active = status == B.RUNNING
            rho = B.dot(rhat, r)
            ok_rho = rho.abs() > eps * rhat_norm * rnorm
            # (r^, r) vanished: restart the recurrence from the current residual as the new shadow.
            restart = active & ~ok_rho & ~fresh
            rhat, rhat_norm = B.select(restart, r, rhat), B.select(restart, rnorm, rhat_norm)
            rho = B.select(restart, B.dot(r, r), rho)
            rho_old, alpha, omega = (B.select(restart, one, t) for t in (rho_old, alpha, omega))
            p, v = B.select(restart, torch.zeros_like(p), p), B.select(restart, torch.zeros_like(v), v)
            ok_rho = ok_rho | (restart & (rho > 0))
            fresh = fresh | restart
            beta = B.safe_div(rho, rho_old, ok_rho) * B.safe_div(alpha, omega, ok_rho)
            p_new = r + B.vec(beta) * (p - B.vec(omega) * v)
            phat = precond(p_new)
            v_new = op(phat)
            rv = B.dot(rhat, v_new)
            ok_rv = rv.abs() > eps * rhat_norm * B.norm(v_new)
            alpha_new = B.safe_div(rho, rv, ok_rv)
            s_vec = r - B.vec(alpha_new) * v_new
            s_norm = B.norm(s_vec)
            x_half = x + B.vec(alpha_new) * phat
            half = s_norm <= s.tol

            shat = precond(s_vec)
            t = op(shat)
            tt = B.dot(t, t)
            omega_new = B.safe_div(B.dot(t, s_vec), tt, tt > 0)
            x_full = x_half + B.vec(omega_new) * shat
            r_full = s_vec - B.vec(omega_new) * t
            x_new = B.select(half, x_half, x_full)
            r_new = B.select(half, s_vec, r_full)
            rnorm_new = B.select(half, s_norm, B.norm(r_full))

            fine = torch.isfinite(rnorm_new)
            status = B.mark(status, active & ~fine, Status.NONFINITE)
            status = B.mark(status, active & fine & ~(ok_rho & ok_rv), Status.BREAKDOWN)
            step = active & fine & ok_rho & ok_rv
            fresh = fresh & ~step
            x = B.select(step, x_new, x)
            r = B.select(step, r_new, r)
            rnorm = B.select(step, rnorm_new, rnorm)
            its = its + step.long()
            status = B.mark(status, step & (rnorm <= s.tol), Status.CONVERGED)
            status = B.mark(status, (status == B.RUNNING) & (omega_new == 0), Status.BREAKDOWN)
            p = B.select(step, p_new, p)
            v = B.select(step, v_new, v)
            rho_old = B.select(step, rho, rho_old)
            alpha = B.select(step, alpha_new, alpha)
            omega = B.select(step, omega_new, omega)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol)
