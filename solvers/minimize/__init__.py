"""Batched, vmap-safe minimizers that report what happened: the inner solvers.

The implicit hypergradient is exact only where the inner problem is solved, so
the inner solve is a solver like the linear ones, in the same style: a frozen,
validated object with scipy's words, called as ``minimizer(objective, x0) ->
MinimizeResult``, with a per-problem status decided on the gradient at the
returned point:

================ ============================================== ========================
minimizer        for                                            reference
================ ============================================== ========================
NewtonCG         smooth objectives, tight tolerances (default)  Nocedal-Wright Alg. 7.1
LBFGS            smooth objectives, no second derivatives       Liu-Nocedal 1989
Armijo           steepest descent that never increases ``f``    Armijo 1966
Nesterov         accelerated fixed step (``lr <= 1/L``)         Nesterov 1983
GradientDescent  the plain fixed step (MAML's iteration)        Cauchy 1847
================ ============================================== ========================

See ``docs/core.md``, "Solving the inner problem".
"""

from ._base import LineSearch, MinimizeResult, MinimizeStatus, Minimizer, Objective, default_rtol
from .armijo import Armijo
from .gradient_descent import GradientDescent
from .lbfgs import LBFGS
from .nesterov import Nesterov
from .newton_cg import NewtonCG
from .registry import MINIMIZERS, get_minimizer

__all__ = ["MINIMIZERS", "Armijo", "GradientDescent", "LBFGS", "LineSearch", "MinimizeResult", "MinimizeStatus",
           "Minimizer", "Nesterov", "NewtonCG", "Objective", "default_rtol", "get_minimizer"]
