"""Solvers by name: one table for the library, the command-line tools and user code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._base import LinearSolver
from .bicgstab import BiCGSTAB
from .cg import CG
from .direct import Direct
from .gmres import GMRES
from .minres import MINRES
from .neumann import Neumann
from .normal_cg import NormalCG

__all__ = ["SOLVERS", "get_solver", "instance_by_name"]

SOLVERS: dict[str, type] = {"cg": CG, "minres": MINRES, "gmres": GMRES, "bicgstab": BiCGSTAB,
                            "neumann": Neumann, "direct": Direct, "normal_cg": NormalCG}
"""The solver classes by the lower-case names that ``solver="..."`` and command-line options use."""


def get_solver(solver: LinearSolver | str | None, default: str = "cg") -> LinearSolver:
    """A solver instance from an instance, a name in :data:`SOLVERS` (any case) or ``None``.

    ``None`` gives ``SOLVERS[default]()``. A class instead of an instance, an unknown
    name or any other object raises ``TypeError``/``ValueError`` naming the fix.
    """
    return instance_by_name(SOLVERS, solver, default, kind="solver", example="bilevel.solvers.GMRES(rtol=1e-8)",
                            accepts=callable)


def instance_by_name(table: dict[str, type], value: Any, default: str, *, kind: str, example: str,
                     accepts: Callable[[Any], bool]) -> Any:
    """``table[name]()`` for a name (any case, ``-`` read as ``_``; ``None`` means ``default``), or
    ``value`` itself when ``accepts(value)``; a class or anything else raises naming the fix."""
    if value is None:
        value = default
    if isinstance(value, str):
        cls = table.get(value.lower().replace("-", "_"))
        if cls is None:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(table)} "
                             f"or pass a {kind} instance such as {example}")
        return cls()
    if isinstance(value, type):
        raise TypeError(f"{kind} must be an instance, got the class {value.__name__}: "
                        f"pass {value.__name__}(), not {value.__name__}")
    if not accepts(value):
        raise TypeError(f"{kind} must be an instance such as {example} or one of the names "
                        f"{', '.join(table)}; got {type(value).__name__}")
    return value
