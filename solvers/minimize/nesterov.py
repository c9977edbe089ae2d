"""Nesterov's accelerated gradient with a fixed step."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import FlatProblem, Iterate
from .gradient_descent import GradientDescent


@dataclass(frozen=True, kw_only=True)
class Nesterov(GradientDescent):
    """Nesterov's accelerated gradient (Nesterov, 1983) with a fixed step::

        y = x_k + (k - 1) / (k + 2) (x_k - x_{k-1});   x_{k+1} = y - lr grad f(y)

    ``f(x_k) - f* = O(1 / k^2)`` on an ``L``-smooth convex objective with
    ``lr <= 1 / L`` (against ``O(1 / k)`` for gradient descent); not monotone, and
    divergent when ``lr`` is too large. Two gradients per iteration: one at the
    look-ahead point ``y``, one at ``x_{k+1}`` (the status is decided there).

    Args:
        lr: the step.
        rtol, atol, maxiter: see :class:`~bilevel.solvers.minimize.Minimizer`.
    """

    def iterate(self, problem: FlatProblem, state: Iterate) -> None:
        previous = state.x
        for k in range(1, self.maxiter + 1):
            if state.done(k - 1):
                break
            look = state.x + (k - 1) / (k + 2) * (state.x - previous)
            _, g_look = problem.value_and_grad(look)
            x = look - self.lr * g_look
            f, g = problem.value_and_grad(x)
            previous = state.x
            state.advance(state.active, x, f, g)
