"""What happens when a solve fails: warn (default), raise, or ignore.

Host-side checks (they read tensor values), so they run only outside
``torch.func.vmap`` and CUDA-graph capture; there the diagnostics travel with
the result and :func:`bilevel.check_result` applies the policy afterwards.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Literal

import torch
from torch import Tensor

from bilevel.errors import BilevelError, ConvergenceError, ConvergenceWarning, NonFiniteError
from bilevel.pytree import PyTree, tree_leaves
from bilevel.solvers import SolveResult, Status, values_hidden

OnFailure = Literal["warn", "raise", "ignore"]
ON_FAILURE = ("warn", "raise", "ignore")


def validate_on_failure(on_failure: str) -> None:
    if on_failure not in ON_FAILURE:
        raise BilevelError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")


def host_checks_deferred(*trees: PyTree) -> bool:
    """True when the values are not readable now: a leaf is batched by ``torch.func.vmap``,
    or a CUDA graph is being captured. :func:`bilevel.check_result` checks later."""
    leaves = (t for tree in trees for t in tree_leaves(tree) if isinstance(t, Tensor))
    return any(values_hidden(t) for t in leaves)


def require_finite(tree: PyTree, where: str, fix: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` if any leaf holds NaN or Inf."""
    for i, leaf in enumerate(tree_leaves(tree)):
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise NonFiniteError(f"NaN or Inf in {where} (leaf {i}, shape {tuple(leaf.shape)}); {fix}")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def report(message: str, on_failure: OnFailure) -> None:
    """Warn, raise :class:`ConvergenceError`, or stay silent, as ``on_failure`` says."""
    if on_failure == "raise":
        raise ConvergenceError(message)
    if on_failure == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=caller_stacklevel())


def check_inner_residual(residual: Tensor | None, residual_tol: float | None, on_failure: OnFailure) -> None:
    if residual is None:
        return
    worst = float(residual.detach().max())
    if not math.isfinite(worst):
        raise NonFiniteError("NaN or Inf in the optimality residual ||G(phi*, theta)||: the inner solution or "
                             "the optimality condition is not finite there; check the inner data and objective")
    if residual_tol is not None and worst > residual_tol:
        report(
            f"inner solution is not a root of the optimality condition: ||G(phi*, theta)|| = "
            f"{worst:.3e} > residual_tol = {residual_tol:.1e}, so the implicit hypergradient is "
            "approximate; solve the inner problem further (more inner_steps, a smaller inner_tol, "
            "a better inner optimizer), or set on_failure='ignore' if an approximate inner "
            "solution is intended", on_failure)


def check_solve(solve: SolveResult, on_failure: OnFailure) -> None:
    """NaN/Inf anywhere in the solve raises; any other non-converged system is reported."""
    if bool((solve.status == int(Status.NONFINITE)).any()) or not bool(torch.isfinite(solve.x).all()):
        lines = "\n  ".join(solve.failures())
        raise NonFiniteError(f"NaN or Inf in the adjoint linear solve:\n  {lines}\nthe right-hand side "
                             "(the outer gradient at phi*) or the operator (the optimality condition's "
                             "Jacobian) produced it; check the data and the objectives for NaN/Inf")
    if not solve.all_converged:
        lines = "\n  ".join(solve.failures())
        report(f"adjoint linear solve did not converge:\n  {lines}", on_failure)
