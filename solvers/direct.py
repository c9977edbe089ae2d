"""Dense solve of a materialized operator: for small systems and ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec
from ._result import SolveResult, Status


def materialize(op: MatVec, b: Tensor) -> Tensor:
    """The dense matrices of ``op``, shape ``(*batch, n, n)``, from ``n`` matvecs.

    Column ``j`` is ``op(e_j)`` (the basis vector broadcast over the batch). The
    ``n`` products run as one ``torch.func.vmap`` call; a matvec that vmap cannot
    trace (host round trips, ``.item()``) is applied column by column instead.
    """
    n = b.shape[-1]
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    basis = eye.reshape(n, *([1] * (b.dim() - 1)), n).expand(n, *b.shape)
    try:
        cols = torch.func.vmap(op)(basis)
    except (RuntimeError, TypeError):
        cols = torch.stack([op(e) for e in basis.unbind(0)])
    return cols.movedim(0, -1)


@dataclass(frozen=True, kw_only=True)
class Direct:
    """Materialize ``A`` with ``n`` matvecs and solve densely.

    Costs ``n`` matvecs plus an ``O(n^3)`` factorization per system, so it is meant
    for small problems and as ground truth for the iterative solvers. The LU solve
    (``torch.linalg.solve_ex``) is used where it succeeds; a system whose matrix is
    singular (LU fails, or its residual misses the tolerance) gets the minimum-norm
    least-squares solution ``pinv(A) b`` instead.

    Status is ``CONVERGED`` when the true residual meets
    ``||b - A x|| <= max(rtol ||b||, atol)``, ``SINGULAR`` when it does not (an
    inconsistent singular system: ``x`` is then the least-squares solution), and
    ``NONFINITE`` on NaN/Inf (``x`` is then NaN). ``iterations`` is 0; ``x0`` is ignored.

    Args:
        ridge: solve ``(A + ridge I) x = b`` instead.
        rtol, atol: the residual test deciding between LU and least squares and
            the reported status.
    """

    ridge: float = 0.0
    rtol: float = 1e-5
    atol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ridge", "rtol", "atol"):
            B.check_nonnegative(name, getattr(self, name))

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        B.check_rhs(b, x0)
        op = B.operator(matvec, self.ridge)
        if b.shape[-1] == 0:  # no unknowns: the empty solution is exact
            status = torch.full(b.shape[:-1], int(Status.CONVERGED), dtype=torch.int64, device=b.device)
            return SolveResult(x=torch.zeros_like(b), converged=status == int(Status.CONVERGED),
                               iterations=torch.zeros_like(status), residual_norm=B.norm(b), status=status)
        A = materialize(op, b)
        tol = torch.clamp(self.rtol * B.norm(b), min=self.atol)

        usable = torch.isfinite(A).all(-1).all(-1)
        A = torch.where(B.vec(B.vec(usable)), A, torch.zeros_like(A))
        x, info = torch.linalg.solve_ex(A, b.unsqueeze(-1))
        x = x.squeeze(-1)
        lu_ok = (info == 0) & B.finite(x)
        lu_ok = lu_ok & (B.norm(b - (A @ x.unsqueeze(-1)).squeeze(-1)) <= tol)
        if B.values_hidden(lu_ok) or not bool(lu_ok.all()):
            x_ls = (torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1)
            x = B.select(lu_ok, x, x_ls)

        rnorm = B.norm(b - op(x))
        status = torch.full(rnorm.shape, int(Status.SINGULAR), dtype=torch.int64,
                            device=b.device)
        status = B.mark(status, rnorm <= tol, Status.CONVERGED)
        status = B.mark(status, ~usable | ~torch.isfinite(rnorm) | ~B.finite(b), Status.NONFINITE)
        x = B.poison(x, status)
        return SolveResult(x=x, converged=status == int(Status.CONVERGED),
                           iterations=torch.zeros_like(status), residual_norm=rnorm,
                           status=status)
