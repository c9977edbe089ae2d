"""Batched, vmap-safe linear solvers that report what happened.

Every solver is a small frozen dataclass configured with scipy's vocabulary and
called as ``solver(matvec, b, x0=None) -> SolveResult``:

========== =========================================== =====================
solver     for                                         reference
========== =========================================== =====================
CG         symmetric positive definite                 Hestenes-Stiefel 1952
Neumann    contractions ``rho(I - alpha A) < 1``       Neumann series
MINRES     symmetric indefinite                        Paige-Saunders 1975
GMRES      general nonsymmetric (restarted)            Saad-Schultz 1986
BiCGSTAB   general nonsymmetric, constant memory       van der Vorst 1992
NormalCG   any, incl. least squares (CG on A^T A)      Hestenes-Stiefel 1952
Direct     small systems, ground truth                 LU / least squares
========== =========================================== =====================

See ``docs/solvers.md``.
"""

from ._base import IterativeSolver, LinearSolver, MatVec, Preconditioner, poison
from ._result import SolveResult, Status, register_result_pytree, result_repr
from ._transforms import is_capturing, is_vmapped, values_hidden, values_unreadable
from .bicgstab import BiCGSTAB
from .cg import CG
from .direct import Direct
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann
from .normal_cg import NormalCG
from .preconditioners import hutchinson_diagonal, jacobi
from .registry import SOLVERS, get_solver

__all__ = [
    "SOLVERS", "BiCGSTAB", "CG", "Direct", "GMRES", "IterativeSolver", "LinearSolver", "MINRES", "MatVec", "Neumann",
    "NormalCG", "Preconditioner", "SolveResult", "Status", "get_solver", "hutchinson_diagonal", "is_capturing",
    "is_vmapped", "jacobi", "poison", "register_result_pytree", "result_repr", "values_hidden", "values_unreadable",
]
