"""Solvers by name: one table for the library, the command-line tools and user code."""

from __future__ import annotations

from ._base import LinearSolver
from .bicgstab import BiCGSTAB
from .cg import CG
from .direct import Direct
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann
from .normal_cg import NormalCG

__all__ = ["SOLVERS", "get_solver"]

SOLVERS: dict[str, type] = {"cg": CG, "minres": MINRES, "gmres": GMRES, "bicgstab": BiCGSTAB,
                            "neumann": Neumann, "direct": Direct, "normal_cg": NormalCG}
"""The solver classes by the lower-case names that ``solver="..."`` and command-line options use."""


def get_solver(solver: LinearSolver | str | None, default: str = "cg") -> LinearSolver:
    """A solver instance from an instance, a name in :data:`SOLVERS` (any case) or ``None``.

    ``None`` gives ``SOLVERS[default]()``. A class instead of an instance, an unknown
    name or any other object raises ``TypeError``/``ValueError`` naming the fix.
    """
    if solver is None:
        solver = default
    if isinstance(solver, str):
        cls = SOLVERS.get(solver.lower())
        if cls is None:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)} "
                             "or pass a solver instance such as bilevel.solvers.GMRES(rtol=1e-8)")
        return cls()
    if isinstance(solver, type):
        raise TypeError(f"solver must be a solver instance, got the class {solver.__name__}: "
                        f"pass {solver.__name__}(), not {solver.__name__}")
    if not callable(solver):
        raise TypeError(f"solver must be a solver instance (e.g. CG()) or one of the names "
                        f"{', '.join(SOLVERS)}; got {type(solver).__name__}")
    return solver
