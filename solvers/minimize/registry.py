"""Minimizers by name: one table for the library, the command-line tools and user code."""

from __future__ import annotations

from ._base import Minimizer
from .armijo import Armijo
from .gradient_descent import GradientDescent
from .lbfgs import LBFGS
from .nesterov import Nesterov
from .newton_cg import NewtonCG

__all__ = ["MINIMIZERS", "get_minimizer"]

MINIMIZERS: dict[str, type] = {"gd": GradientDescent, "armijo": Armijo, "nesterov": Nesterov, "lbfgs": LBFGS,
                               "newton_cg": NewtonCG}
"""The minimizer classes by the lower-case names that ``inner_solver="..."`` and command-line options use."""


def get_minimizer(minimizer: Minimizer | str | None, default: str = "newton_cg") -> Minimizer:
    """A minimizer instance from an instance, a name in :data:`MINIMIZERS` (any case) or ``None``.

    ``None`` gives ``MINIMIZERS[default]()``. A class instead of an instance, an unknown
    name or any other object raises ``TypeError``/``ValueError`` naming the fix.
    """
    if minimizer is None:
        minimizer = default
    if isinstance(minimizer, str):
        cls = MINIMIZERS.get(minimizer.lower().replace("-", "_"))
        if cls is None:
            raise ValueError(f"unknown inner solver {minimizer!r}; choose one of {', '.join(MINIMIZERS)} or pass "
                             "an instance such as bilevel.solvers.minimize.LBFGS(rtol=1e-10)")
        return cls()
    if isinstance(minimizer, type):
        raise TypeError(f"the inner solver must be an instance, got the class {minimizer.__name__}: pass "
                        f"{minimizer.__name__}(), not {minimizer.__name__}")
    if not isinstance(minimizer, Minimizer):
        raise TypeError(f"the inner solver must be a bilevel.solvers.minimize minimizer (e.g. LBFGS()) or one of "
                        f"the names {', '.join(MINIMIZERS)}; got {type(minimizer).__name__}")
    return minimizer
