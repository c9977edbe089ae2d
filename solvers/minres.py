"""MINRES for symmetric (possibly indefinite) systems."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec
from ._result import SolveResult, Status


@dataclass(frozen=True, kw_only=True)
class MINRES(B.IterativeSolver):
    """Minimum residual method (Paige & Saunders, 1975).

    For symmetric ``A``, definite or not. The Lanczos process builds an orthonormal
    basis ``V_k`` of the Krylov space with a three-term recurrence, giving the
    tridiagonal ``T_k`` with ``A V_k = V_{k+1} T_k``. MINRES picks
    ``x_k = x_0 + V_k y`` minimising ``||beta_1 e_1 - T_k y||``, i.e. the residual
    norm over the Krylov space, by QR-factorising ``T_k`` with one new Givens
    rotation per step; the iterate is updated through the short recurrence
    ``w_k = (v_k - eps_k w_{k-2} - delta_k w_{k-1}) / gamma_k``, ``x += phi_k w_k``.
    Memory and cost per step are CG-like (one matvec, a few vectors); the
    residual decreases monotonically.

    The residual vector is carried alongside (``r -= phi_k A w_k``) so that the
    stopping test uses the unpreconditioned ``||b - A x||`` even with ``M``.
    ``Status.BREAKDOWN`` marks an exactly singular projected problem or a
    preconditioner that is not positive definite (``M`` must be SPD). Successive
    Lanczos vectors probe symmetry for free (``<v_{k-1}, A v_k> = <A v_{k-1}, v_k>``);
    a system where it fails beyond rounding stops with ``Status.NONSYMMETRIC``.

    Args:
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``.
        maxiter: iteration cap per system; ``None`` means ``10 n``.
        M: symmetric positive definite preconditioner ``M ~ A^{-1}``.
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every iteration.
    """


    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        op, precond, s, maxiter = self.start(matvec, b, x0, default_maxiter=lambda n: 10 * n)
        x, r, rnorm, status, its = s.x, s.r, s.rnorm, s.status, s.iterations
        history = [rnorm] if self.history else None

        y = precond(r)
        ry = B.dot(r, y)
        status = B.mark(status, (status == B.RUNNING) & ~(ry > 0), Status.BREAKDOWN)
        beta = torch.sqrt(torch.clamp(ry, min=0))
        zero = torch.zeros_like(beta)
        oldb, dbar, epsln, phibar, sn, cs = zero, zero, zero, beta, zero, -torch.ones_like(beta)
        r1 = r2 = r
        w = w2 = Aw = Aw2 = torch.zeros_like(r)
        v_prev = Av_prev = None

        for k in range(1, maxiter + 1):
            if B.all_finished(status == B.RUNNING, k - 1):
                break
            active = status == B.RUNNING
            # Lanczos step: v_k = y / beta_k, next vector from A v_k.
            v = B.vec(B.safe_div(torch.ones_like(beta), beta, active)) * y
            Av = op(v)
            if v_prev is not None:
                status = B.mark(status, active & B.asymmetric(v_prev, Av_prev, v, Av), Status.NONSYMMETRIC)
                active = status == B.RUNNING
            v_prev, Av_prev = v, Av
            y_new = Av
            if k > 1:
                y_new = y_new - B.vec(B.safe_div(beta, oldb, active)) * r1
            alfa = B.dot(v, y_new)
            y_new = y_new - B.vec(B.safe_div(alfa, beta, active)) * r2
            r1_new, r2_new = r2, y_new
            y_new = precond(r2_new)
            ry = B.dot(r2_new, y_new)
            spd = ~(ry < 0)
            beta_new = torch.sqrt(torch.clamp(ry, min=0))
            # Previous rotation on the new column of T_k, then a new rotation.
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln_new = sn * beta_new
            dbar_new = -cs * beta_new
            gamma = torch.hypot(gbar, beta_new)
            regular = gamma > 0
            cs_new = B.safe_div(gbar, gamma, regular)
            sn_new = B.safe_div(beta_new, gamma, regular)
            phi = cs_new * phibar
            phibar_new = sn_new * phibar
            inv_gamma = B.vec(B.safe_div(torch.ones_like(gamma), gamma, regular))
            w_new = (v - B.vec(epsln) * w2 - B.vec(delta) * w) * inv_gamma
            Aw_new = (Av - B.vec(epsln) * Aw2 - B.vec(delta) * Aw) * inv_gamma
            x_new = x + B.vec(phi) * w_new
            r_new = r - B.vec(phi) * Aw_new
            rnorm_new = B.norm(r_new)

            ok = torch.isfinite(rnorm_new)
            status = B.mark(status, active & ~ok, Status.NONFINITE)
            status = B.mark(status, active & ok & ~(spd & regular), Status.BREAKDOWN)
            step = active & ok & spd & regular
            x = B.select(step, x_new, x)
            r = B.select(step, r_new, r)
            rnorm = B.select(step, rnorm_new, rnorm)
            its = its + step.long()
            status = B.mark(status, step & (rnorm <= s.tol), Status.CONVERGED)
            # An invariant Krylov subspace without convergence: nothing left to search.
            status = B.mark(status, (status == B.RUNNING) & (beta_new == 0), Status.BREAKDOWN)

            w2, w = B.select(step, w, w2), B.select(step, w_new, w)
            Aw2, Aw = B.select(step, Aw, Aw2), B.select(step, Aw_new, Aw)
            r1, r2 = B.select(step, r1_new, r1), B.select(step, r2_new, r2)
            y = B.select(step, y_new, y)
            oldb, beta = B.select(step, beta, oldb), B.select(step, beta_new, beta)
            epsln, dbar = B.select(step, epsln_new, epsln), B.select(step, dbar_new, dbar)
            cs, sn = B.select(step, cs_new, cs), B.select(step, sn_new, sn)
            phibar = B.select(step, phibar_new, phibar)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol)
