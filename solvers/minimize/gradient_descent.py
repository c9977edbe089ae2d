"""Gradient descent with a fixed step."""

from __future__ import annotations

from dataclasses import dataclass

from .._base import check_positive
from ._base import FlatProblem, Iterate, Minimizer


@dataclass(frozen=True, kw_only=True)
class GradientDescent(Minimizer):
    """Gradient descent with a fixed step: ``x <- x - lr * grad f(x)``.

    Converges for ``lr < 2 / L`` on an ``L``-smooth convex objective, at the rate
    ``1 - lr * mu`` on a ``mu``-strongly convex one: slow when the condition number
    ``L / mu`` is large, and divergent (``DIVERGED``) when ``lr`` exceeds ``2 / L``.
    Prefer :class:`LBFGS` or :class:`NewtonCG` unless the plain iteration itself is
    wanted (it is what MAML differentiates through). One gradient per iteration.

    Args:
        lr: the step.
        rtol, atol, maxiter: see :class:`~bilevel.solvers.minimize.Minimizer`.
    """

    lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("lr", self.lr)

    def iterate(self, problem: FlatProblem, state: Iterate) -> None:
        for k in range(self.maxiter):
            if state.done(k):
                break
            x = state.x - self.lr * state.g
            f, g = problem.value_and_grad(x)
            state.advance(state.active, x, f, g)
