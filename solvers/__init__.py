"""Batched, vmap-safe linear solvers that report what happened.

Every solver is a small frozen dataclass configured with scipy's vocabulary and
called as ``solver(matvec, b, x0=None) -> SolveResult``. See ``docs/solvers.md``.
"""

from ._base import LinearSolver, is_vmapped
from ._result import SolveResult, Status
from .cg import CG
from .direct import Direct

__all__ = ["CG", "Direct", "LinearSolver", "SolveResult", "Status", "is_vmapped"]
