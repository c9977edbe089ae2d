"""Restarted GMRES for general (nonsymmetric) systems."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec, Preconditioner
from ._result import SolveResult, Status


def _project(V: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Remove from ``w`` its components along the orthonormal rows of ``V``.

    Classical Gram-Schmidt applied twice (CGS2): as stable as modified
    Gram-Schmidt with re-orthogonalization, but each pass is one batched
    matrix product instead of ``j`` dependent inner products.
    """
    h = (V @ w.unsqueeze(-1)).squeeze(-1)
    w = w - (h.unsqueeze(-2) @ V).squeeze(-2)
    h2 = (V @ w.unsqueeze(-1)).squeeze(-1)
    w = w - (h2.unsqueeze(-2) @ V).squeeze(-2)
    return h + h2, w


def _unit(v: Tensor, length: Tensor, mask: Tensor) -> Tensor:
    """``v / length`` where ``mask`` holds and ``length > 0``, else zeros."""
    ok = mask & (length > 0)
    return B.select(ok, B.safe_div(v, B.vec(length), B.vec(ok)), torch.zeros_like(v))


@dataclass(frozen=True, kw_only=True)
class GMRES(B.IterativeSolver):
    """Generalized minimal residual method, restarted (Saad & Schultz, 1986).

    Arnoldi builds an orthonormal basis ``V_j`` of the Krylov space of ``A M`` and
    the Hessenberg matrix ``H_j`` with ``A M V_j = V_{j+1} H_j``; GMRES takes
    ``x = x_0 + M V_j y`` with ``y`` minimising ``||beta e_1 - H_j y||``, the
    residual norm over the space. Givens rotations keep ``H_j`` triangular as it
    grows, so ``|g_{j+1}|`` (the last entry of the rotated right-hand side) is the
    residual norm at every step without forming ``x``. After ``restart`` steps
    the correction is applied, the true residual recomputed, and the process
    starts afresh, bounding memory at ``restart + 1`` basis vectors.

    Works for any nonsingular ``A``; cost per step is one matvec plus ``O(j n)``
    orthogonalization. Preconditioning is on the right, so the residual tested is
    the true ``||b - A x||``. Each system in a batch keeps its own rotations and
    stops on its own; at the end of a cycle each uses only the steps it took.

    Note: ``maxiter`` counts inner iterations (matvecs, excluding the one per
    restart), not scipy's restart cycles.

    Args:
        restart: Krylov dimension before a restart (capped at ``n``).
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``.
        maxiter: total inner iterations per system; ``None`` means ``10 n``.
        M: preconditioner ``M ~ A^{-1}``, applied on the right.
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every inner iteration.
    """

    restart: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        B.check_count("restart", self.restart, allow_none=False)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        op, precond, s, maxiter = self.start(matvec, b, x0, default_maxiter=lambda n: 10 * n)
        n = b.shape[-1]
        restart = min(self.restart, n)
        x, r, rnorm, status, its = s.x, s.r, s.rnorm, s.status, s.iterations
        history = [rnorm] if self.history else None

        done = 0
        while done < maxiter and not B.all_finished(status == B.RUNNING, done):
            running = status == B.RUNNING
            V = [_unit(r, rnorm, running)]
            g = [rnorm]
            cs: list[Tensor] = []
            sn: list[Tensor] = []
            cols: list[Tensor] = []
            steps = torch.zeros_like(its)
            for j in range(min(restart, maxiter - done)):
                if j and B.all_finished(status == B.RUNNING, done + j):
                    break
                active = status == B.RUNNING
                Vm = torch.stack(V, dim=-2)
                h, w = _project(Vm, op(precond(V[j])))
                hnext = B.norm(w)
                hs = list(h.unbind(-1))
                for i in range(j):
                    hs[i], hs[i + 1] = (cs[i] * hs[i] + sn[i] * hs[i + 1],
                                        cs[i] * hs[i + 1] - sn[i] * hs[i])
                gamma = torch.hypot(hs[j], hnext)
                ok = torch.isfinite(gamma)
                regular = ok & (gamma > 0)
                c = B.safe_div(hs[j], gamma, regular)
                sj = B.safe_div(hnext, gamma, regular)
                hs[j] = gamma
                cs.append(c)
                sn.append(sj)
                cols.append(torch.stack(hs, dim=-1))
                g.append(-sj * g[j])
                g[j] = c * g[j]

                status = B.mark(status, active & ~ok, Status.NONFINITE)
                status = B.mark(status, active & ok & ~regular, Status.BREAKDOWN)
                step = active & regular
                V.append(_unit(w, hnext, step))
                steps = steps + step.long()
                its = its + step.long()
                rnorm = B.select(step, g[j + 1].abs(), rnorm)
                status = B.mark(status, step & (rnorm <= s.tol), Status.CONVERGED)
                if history is not None:
                    history.append(rnorm)

            x = self._update(x, precond, V, cols, g, steps)
            done += len(cols)
            if done < maxiter and not B.all_finished(status == B.RUNNING, 0):
                running = status == B.RUNNING
                r = b - op(x)
                rnorm = B.select(running, B.norm(r), rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol)

    @staticmethod
    def _update(x: Tensor, precond: Preconditioner, V: list[Tensor], cols: list[Tensor],
                g: list[Tensor], steps: Tensor) -> Tensor:
        """Apply each system's least-squares correction from its first ``steps`` steps.

        Rows and columns past a system's own step count are replaced by the
        identity (and its right-hand side by zeros), so the batched triangular
        solve returns zeros there.
        """
        k = len(cols)
        if k == 0:
            return x
        R = torch.stack([torch.nn.functional.pad(c, (0, k - c.shape[-1])) for c in cols],
                        dim=-1)
        idx = torch.arange(k, device=x.device)
        valid = idx < B.vec(steps)
        both = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        eye = torch.eye(k, dtype=x.dtype, device=x.device)
        R = torch.where(both, R, eye)
        rhs = torch.where(valid, torch.stack(g[:k], dim=-1), torch.zeros_like(R[..., 0]))
        y = torch.linalg.solve_triangular(R, rhs.unsqueeze(-1), upper=True).squeeze(-1)
        z = (y.unsqueeze(-2) @ torch.stack(V[:k], dim=-2)).squeeze(-2)
        return B.select(steps > 0, x + precond(z), x)
