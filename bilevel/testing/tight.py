"""Reference inner solutions: the problem's own solve, polished by Newton's method.

Finite differences of ``F(theta) = f(phi*(theta), theta)`` are only as good as
``phi*``: an inner residual ``r`` perturbs ``F`` by ``O(r)`` and the difference
quotient by ``O(r / eps)``. The references of :func:`check_hypergradient` therefore
take the problem's ``solve_inner`` result and apply Newton steps on the
optimality condition, ``phi <- phi - (d_phi G)^{-1} G(phi, theta)``, with the
dense Jacobian (``torch.func.jacfwd``): quadratic convergence to machine
precision from any nearby start, for minimization, fixed-point and saddle-point
conditions alike. A step is kept only if it lowers ``||G||``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from bilevel.problem import BilevelProblem
from bilevel.pytree import PyTree, ravel

__all__ = ["AtSolution", "flat_jacobian", "newton_polish", "spectral_radius"]


def flat_jacobian(fn: Callable[[PyTree], PyTree], point: PyTree) -> Tensor:
    """Dense Jacobian of the flattened ``fn`` at the flattened ``point``, shape ``(m, n)``.

    Forward mode (``jacfwd``), falling back to reverse mode for operations
    without a forward-mode derivative.
    """
    vec, unravel = ravel(point)

    def flat(v: Tensor) -> Tensor:
        return ravel(fn(unravel(v)))[0]

    try:
        return torch.func.jacfwd(flat)(vec)
    except (RuntimeError, NotImplementedError):
        return torch.func.jacrev(flat)(vec)


def newton_polish(optimality: Callable[[PyTree], PyTree], inner: PyTree, *, steps: int = 8,
                  tol: float = 0.0, jacobian: Tensor | None = None) -> tuple[PyTree, float]:
    """Newton steps on ``G(phi) = optimality(phi)`` from ``inner``; returns ``(phi, ||G(phi)||)``.

    Stops after ``steps`` steps, once ``||G|| <= tol``, or when a step fails to
    lower ``||G||``. Singular Jacobians get the least-squares step (``pinv``).
    With ``jacobian`` given, every step uses it (the chord method): from a start
    ``O(h)`` away from the root, with the Jacobian of a point ``O(h)`` away, the
    error still shrinks by a factor ``O(h)`` per step, at one evaluation of ``G``.
    """
    vec, unravel = ravel(inner)
    residual = ravel(optimality(inner))[0]
    norm = float(torch.linalg.vector_norm(residual))
    for _ in range(steps):
        if norm <= tol:
            break
        J = flat_jacobian(optimality, unravel(vec)) if jacobian is None else jacobian
        step, info = torch.linalg.solve_ex(J, -residual)
        if int(info) != 0 or not bool(torch.isfinite(step).all()):
            step = -torch.linalg.pinv(J) @ residual
        candidate = vec + step
        new_residual = ravel(optimality(unravel(candidate)))[0]
        new_norm = float(torch.linalg.vector_norm(new_residual))
        if not new_norm < norm:
            break
        vec, residual, norm = candidate, new_residual, new_norm
    return unravel(vec), norm


def spectral_radius(update: Callable[[PyTree], PyTree], inner: PyTree) -> float:
    """Spectral radius of the Jacobian of ``update`` at ``inner``.

    Below 1, the iteration ``phi <- update(phi)`` contracts near ``inner`` and its
    unrolled derivative converges to the implicit one (error ~ radius^steps).
    """
    eig = torch.linalg.eigvals(flat_jacobian(update, inner))
    return float(eig.abs().max())


class AtSolution(BilevelProblem):
    """View of ``problem`` whose inner solution is the fixed ``inner`` (a reference ``phi*``).

    ``solve_inner`` and ``initial_inner`` return ``inner`` (detached, so it does not
    depend on ``theta``); every other method is ``problem``'s. ``bilevel.hypergradient``
    on this view differentiates at exactly ``inner``: with ``Direct()`` it is the
    implicit hypergradient there, and ``mode="unrolled"`` with ``inner_steps`` steps
    is the truncated Neumann series of the same quantity.
    """

    def __init__(self, problem: BilevelProblem, inner: PyTree, *, inner_steps: int | None = None):
        self.problem = problem
        self.inner = inner
        self.inner_lr = problem.inner_lr
        self.inner_steps = problem.inner_steps if inner_steps is None else inner_steps
        self.inner_tol = problem.inner_tol
        self.residual_tol = None

    def optimality(self, inner: PyTree, outer: PyTree, data: Any) -> PyTree:
        return self.problem.optimality(inner, outer, data)

    def outer_objective(self, inner: PyTree, outer: PyTree, data: Any) -> Tensor:
        return self.problem.outer_objective(inner, outer, data)

    def inner_update(self, inner: PyTree, outer: PyTree, data: Any) -> PyTree:
        return self.problem.inner_update(inner, outer, data)

    def initial_inner(self, outer: PyTree, data: Any) -> PyTree:
        return self.inner

    def solve_inner(self, outer: PyTree, data: Any, init: PyTree) -> PyTree:
        return self.inner
