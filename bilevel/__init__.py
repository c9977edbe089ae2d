"""bilevel: differentiable bilevel optimization for PyTorch.

Hypergradients of ``F(theta) = f(phi*(theta), theta)`` where ``phi*`` solves an
inner problem, by the implicit function theorem with pluggable linear solvers
(:mod:`bilevel.solvers`), or by unrolled, truncated or first-order
differentiation as baselines.
"""

from bilevel.cuda_graph import CUDAGraphed
from bilevel.errors import (BilevelError, BilevelWarning, CheckpointError, ConvergenceError, ConvergenceWarning,
                            NonFiniteError)
from bilevel.hypergradient import MODES, HypergradientResult, check_result, hypergradient
from bilevel.implicit import implicit_fixed_point, implicit_root
from bilevel.problem import BilevelProblem
from bilevel.pytree import module_params, ravel

__all__ = [
    "MODES",
    "BilevelError",
    "BilevelProblem",
    "BilevelWarning",
    "CheckpointError",
    "CUDAGraphed",
    "ConvergenceError",
    "ConvergenceWarning",
    "HypergradientResult",
    "NonFiniteError",
    "check_result",
    "hypergradient",
    "implicit_fixed_point",
    "implicit_root",
    "module_params",
    "ravel",
]
__version__ = "0.1.0"
