"""The bilevel problem API: subclass :class:`BilevelProblem`.

Outer problem ``min_theta F(theta) = f(phi*(theta), theta, data)`` where
``phi*(theta)`` is a root of the optimality condition ``G(phi, theta, data) = 0``:
by default ``G = grad_phi g`` for an inner objective ``g``, so ``phi*`` is a
stationary point (a minimizer when ``g`` is strongly convex in ``phi``).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.adjoint import gradient
from bilevel.errors import BilevelError
from bilevel.policy import host_checks_deferred
from bilevel.pytree import PyTree, check_same_structure, tree_norm
from bilevel.solvers.minimize import GradientDescent, MinimizeResult, Minimizer, NewtonCG, get_minimizer

__all__ = ["BilevelProblem", "checked_condition", "scalar_objective"]

_GRADIENT_DESCENT_SETTINGS = ("inner_lr", "inner_steps", "inner_tol")


def scalar_objective(fn: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
    """Wrap ``fn`` so that a non-scalar return value raises a clear :class:`BilevelError`."""

    def checked(*args: Any) -> Tensor:
        out = fn(*args)
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise BilevelError(f"{name} must return a scalar tensor, got {shape}; "
                               "reduce it with .mean() or .sum()")
        return out

    return checked


def checked_condition(problem: "BilevelProblem", data: Any) -> Callable[[PyTree, PyTree], PyTree]:
    """``(inner, outer) -> problem.optimality(inner, outer, data)``, raising a clear
    :class:`BilevelError` unless the result has ``inner``'s structure and shapes."""
    name = f"{type(problem).__name__}.optimality's output"

    def condition(inner: PyTree, outer: PyTree) -> PyTree:
        residual = problem.optimality(inner, outer, data)
        check_same_structure(inner, residual, name, "the inner parameters")
        return residual

    return condition


class BilevelProblem:
    """Base class of a bilevel problem.

    Define :meth:`outer_objective`, :meth:`initial_inner`, and either
    :meth:`inner_objective` (a minimization inner problem) or :meth:`optimality`
    (a general root ``G(phi, theta) = 0``: fixed points, saddle points). Override
    :meth:`solve_inner` to use your own inner optimizer: the implicit
    hypergradient needs only its result, never its path.

    ``inner``, ``outer`` may be tensors, tuples or dicts of tensors (e.g. the
    parameters of an ``nn.Module`` used through ``torch.func.functional_call``);
    ``data`` is passed through untouched. Override the attributes below on the
    subclass or the instance.

    Attributes:
        inner_solver: the default :meth:`solve_inner`'s minimizer of
            :meth:`inner_objective`, a :mod:`bilevel.solvers.minimize` instance or its name
            (``"newton_cg"``, ``"lbfgs"``, ``"armijo"``, ``"nesterov"``, ``"gd"``). ``None``
            (default): :class:`~bilevel.solvers.minimize.NewtonCG` to its default tolerance,
            unless the problem sets ``inner_lr``, ``inner_steps`` or ``inner_tol``, which
            keep meaning plain gradient descent (below). See :meth:`inner_minimizer`.
        inner_lr: step of the gradient-descent inner update ``phi <- phi - inner_lr * G(phi, theta)``.
        inner_steps: steps of that gradient descent (at most) and of the
            ``"unrolled"``/``"truncated"`` modes (exactly).
        inner_tol: that gradient descent stops once ``||G|| <= inner_tol``; ``None``
            always runs all ``inner_steps``.
        residual_tol: :func:`bilevel.hypergradient` reports an inner solution whose
            residual ``||G(phi*, theta)||`` exceeds it, with the inner solver's status
            (``None`` disables the check; a non-finite or diverged inner solve is
            reported whatever it is).
    """

    inner_solver: Minimizer | str | None = None
    inner_lr: float = 0.1
    inner_steps: int = 100
    inner_tol: float | None = 1e-6
    residual_tol: float | None = 1e-4

    def inner_objective(self, inner: PyTree, outer: PyTree, data: Any) -> Tensor:
        """Scalar inner loss ``g(phi, theta)``; ``phi*`` minimizes it."""
        raise NotImplementedError(
            f"{type(self).__name__} must define inner_objective(inner, outer, data) "
            "or optimality(inner, outer, data)")

    def outer_objective(self, inner: PyTree, outer: PyTree, data: Any) -> Tensor:
        """Scalar outer loss ``f(phi, theta)`` evaluated at the inner solution."""
        raise NotImplementedError(f"{type(self).__name__} must define outer_objective(inner, outer, data)")

    def initial_inner(self, outer: PyTree, data: Any) -> PyTree:
        """Starting point of the inner solve (e.g. ``outer`` itself in iMAML, zeros in ridge)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define initial_inner(outer, data), or pass init=... "
            "to bilevel.hypergradient")

    @property
    def defines_initial_inner(self) -> bool:
        """Whether the subclass (or instance) defines :meth:`initial_inner`."""
        return "initial_inner" in vars(self) or type(self).initial_inner is not BilevelProblem.initial_inner

    @property
    def overrides_solve_inner(self) -> bool:
        """Whether the subclass (or instance) brings its own :meth:`solve_inner`."""
        return "solve_inner" in vars(self) or type(self).solve_inner is not BilevelProblem.solve_inner

    @property
    def defines_optimality(self) -> bool:
        """Whether the subclass defines an optimality condition (``inner_objective`` or ``optimality``).

        A problem without one (an inner procedure of fixed steps, differentiated
        only in the ``"unrolled"`` or ``"first_order"`` modes with its own
        ``inner_update``) has no residual to report.
        """
        cls = type(self)
        return (cls.optimality is not BilevelProblem.optimality
                or cls.inner_objective is not BilevelProblem.inner_objective)

    def optimality(self, inner: PyTree, outer: PyTree, data: Any) -> PyTree:
        """``G(phi, theta)``, zero at the inner solution; same structure as ``inner``.

        Default: ``grad_phi inner_objective`` (:func:`bilevel.adjoint.gradient`:
        ``torch.autograd.grad`` outside the ``torch.func`` transforms, else ``torch.func.grad``).
        """
        objective = scalar_objective(self.inner_objective, f"{type(self).__name__}.inner_objective")
        return gradient(objective, inner, outer, data)

    def inner_update(self, inner: PyTree, outer: PyTree, data: Any) -> PyTree:
        """One differentiable inner step, ``phi - inner_lr * G(phi, theta)``.

        Gradient descent on the inner objective; for a fixed point written as
        ``G = phi - T(phi)`` with ``inner_lr = 1`` it is the iteration ``phi <- T(phi)``.
        The ``"unrolled"`` and ``"truncated"`` modes differentiate through it.
        """
        step = self.optimality(inner, outer, data)
        # One flatten each serves the structure check and the update (this runs at every inner step).
        leaves, spec = pytree.tree_flatten(inner)
        steps, step_spec = pytree.tree_flatten(step)
        if step_spec != spec or any(not isinstance(g, Tensor) or g.shape != p.shape for p, g in zip(leaves, steps)):
            check_same_structure(inner, step, f"{type(self).__name__}.optimality's output", "the inner parameters")
        return pytree.tree_unflatten([p - self.inner_lr * g for p, g in zip(leaves, steps)], spec)

    @property
    def sets_gradient_descent(self) -> bool:
        """Whether the subclass (or instance) sets ``inner_lr``, ``inner_steps`` or ``inner_tol``."""
        own = [vars(self)] + [vars(c) for c in type(self).__mro__ if c is not BilevelProblem and c is not object]
        return any(name in scope for scope in own for name in _GRADIENT_DESCENT_SETTINGS)

    @property
    def overrides_inner_update(self) -> bool:
        """Whether the subclass (or instance) brings its own :meth:`inner_update` (the default
        :meth:`solve_inner` then iterates it rather than run a minimizer)."""
        return "inner_update" in vars(self) or type(self).inner_update is not BilevelProblem.inner_update

    def inner_minimizer(self) -> Minimizer | None:
        """The minimizer that the default :meth:`solve_inner` runs, or ``None`` when it iterates
        :meth:`inner_update` instead (a problem given by its ``optimality`` alone, or with its own
        ``inner_update``).

        In order: ``inner_solver`` when set; plain gradient descent of ``inner_lr`` for at
        most ``inner_steps`` steps, stopping at ``||G|| <= inner_tol``, when the problem sets
        any of those three; else :class:`~bilevel.solvers.minimize.NewtonCG` with its
        defaults, which solves to a gradient norm of ``default_rtol`` (1.8e-12 in float64)
        relative to the start's.
        """
        defines_objective = type(self).inner_objective is not BilevelProblem.inner_objective
        if self.inner_solver is not None:
            if not defines_objective:
                raise BilevelError(f"{type(self).__name__}.inner_solver minimizes inner_objective, which "
                                   f"{type(self).__name__} does not define; define inner_objective(inner, outer, "
                                   "data), or leave inner_solver unset to iterate inner_update")
            return get_minimizer(self.inner_solver)
        if not defines_objective or self.overrides_inner_update:
            return None
        if self.sets_gradient_descent:
            return GradientDescent(lr=self.inner_lr, maxiter=self.inner_steps, rtol=0.0,
                                   atol=0.0 if self.inner_tol is None else self.inner_tol)
        return NewtonCG()

    def inner_solve(self, outer: PyTree, data: Any, init: PyTree) -> MinimizeResult | None:
        """The inner solve with its report: the :meth:`inner_minimizer`'s
        :class:`~bilevel.solvers.minimize.MinimizeResult` from ``init``, or ``None`` where no
        minimizer runs (a problem with its own :meth:`solve_inner`, or one that iterates
        :meth:`inner_update`). :func:`bilevel.hypergradient` calls it first, and
        :meth:`solve_inner` where it gives ``None``."""
        minimizer = None if self.overrides_solve_inner else self.inner_minimizer()
        if minimizer is None:
            return None
        objective = scalar_objective(self.inner_objective, f"{type(self).__name__}.inner_objective")
        return minimizer(lambda inner: objective(inner, outer, data), init)

    def solve_inner(self, outer: PyTree, data: Any, init: PyTree) -> PyTree:
        """Approximate ``phi*`` from ``init``: the :meth:`inner_minimizer`'s solution, else up to
        ``inner_steps`` of :meth:`inner_update`, stopping once ``||G|| <= inner_tol`` (checked
        every 10 steps outside ``torch.func.vmap``). Called without a graph."""
        report = self.inner_solve(outer, data, init)
        if report is not None:
            return report.x
        inner = init
        check_early_exit = self.inner_tol is not None and not host_checks_deferred(init, outer, data)
        for step in range(1, self.inner_steps + 1):
            inner = self.inner_update(inner, outer, data)
            if check_early_exit and step % 10 == 0:
                residual = tree_norm(self.optimality(inner, outer, data))
                if host_checks_deferred(residual):  # batched through a part of data we cannot see into
                    check_early_exit = False
                elif float(residual) <= self.inner_tol:
                    break
        return inner

    def _validate(self) -> None:
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 0):
            raise BilevelError(f"inner_steps must be a non-negative int, got {self.inner_steps!r}")
        if not self.inner_lr > 0:
            raise BilevelError(f"inner_lr must be positive, got {self.inner_lr!r}")
        if self.inner_solver is not None:
            try:
                get_minimizer(self.inner_solver)
            except (TypeError, ValueError) as error:
                raise BilevelError(f"{type(self).__name__}.inner_solver: {error}") from None
