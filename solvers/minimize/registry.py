"""Minimizers by name: one table for the library, the command-line tools and user code."""

from __future__ import annotations

from ..registry import instance_by_name
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
    return instance_by_name(MINIMIZERS, minimizer, default, kind="inner solver",
                            example="bilevel.solvers.minimize.LBFGS(rtol=1e-10)",
                            accepts=lambda m: isinstance(m, Minimizer))
