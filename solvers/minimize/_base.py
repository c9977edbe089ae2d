"""Pieces shared by every minimizer.

Conventions
-----------
A minimizer is called as ``minimizer(objective, x0) -> MinimizeResult``.
``x0`` is a tensor or a pytree of tensors (tuples, lists, dicts); ``objective``
takes a point of the same structure and returns its value. A scalar value means
one problem. A value of shape ``batch`` means ``prod(batch)`` independent
problems: every leaf of ``x0`` then starts with the dimensions ``batch`` and the
objective's entry ``i`` depends on the leaves' slice ``i`` only (each problem
gets its own step sizes, curvature pairs and status, exactly as if it were
solved alone). Inside, the point is one flat vector of shape ``(*batch, n)``.

A problem stops once its gradient norm meets
``||grad f(x)|| <= max(rtol * ||grad f(x0)||, atol)``; the final status is
decided on the gradient evaluated at the returned point. Stopped problems are
frozen with ``torch.where`` masks. The one host-side decision, "has every
problem finished?", reads the flags beneath ``torch.func.vmap`` wrappers (as the
linear solvers do, :func:`bilevel.solvers.all_finished`), so a vmapped solve
stops when every member has; under CUDA-graph capture or ``torch.compile``
tracing no value is read and every problem runs ``maxiter`` iterations (a
finished problem stays frozen meanwhile).

Gradients come from ``torch.func.grad_and_value``, Hessian-vector products
from ``torch.func.vjp`` of the gradient: the objective must be written with
operations ``torch.func`` can differentiate (twice for :class:`NewtonCG`).
Both work inside ``torch.no_grad()``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._base import (all_finished, check_count, check_nonnegative, dot, finite, machine_eps, mark, norm, select,
                     values_hidden, vec)
from .._result import describe_failures, register_result_pytree, result_repr

__all__ = ["LineSearch", "Minimizer", "MinimizeResult", "MinimizeStatus", "Objective", "default_rtol"]

Objective = Callable[[Any], Tensor]
"""``objective(x) -> value``: a scalar, or one value per problem (shape ``batch``)."""

RUNNING = -1
"""Internal status code of a problem that is still iterating."""

STALL_ITERATIONS = 50
"""Moves in a row without progress (gradient norm or objective) that stop a problem (``NO_DECREASE``)."""


class MinimizeStatus(enum.IntEnum):
    """Per-problem outcome of a minimization.

    ``CONVERGED`` exactly when the gradient at the returned point meets
    ``||grad f|| <= max(rtol ||grad f(x0)||, atol)``. Stored as an integer tensor
    in :attr:`MinimizeResult.status` (it survives ``torch.func.vmap``); convert
    with ``MinimizeStatus(int(code))``.
    """

    CONVERGED = 0
    MAX_ITERATIONS = 1
    NO_DECREASE = 2
    DIVERGED = 3
    NONFINITE = 4

    def describe(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    MinimizeStatus.CONVERGED: "the gradient norm met the tolerance",
    MinimizeStatus.MAX_ITERATIONS: "reached maxiter before the gradient tolerance; raise maxiter, "
    "loosen rtol/atol, or use a faster method (LBFGS, NewtonCG)",
    MinimizeStatus.NO_DECREASE: "the line search found no step that decreases the objective: the "
    "tolerance is below what this precision resolves (use float64 or loosen rtol/atol), or the "
    "objective is not differentiable where the solver stopped (a ReLU kink: use a smooth activation)",
    MinimizeStatus.DIVERGED: "the objective moved by more than (1 + |f(x0)|) / eps from its start: it is "
    "unbounded below, or a fixed step is too large for its curvature (use a line search: Armijo, "
    "LBFGS, NewtonCG)",
    MinimizeStatus.NONFINITE: "NaN or Inf in the objective or its gradient (the solution is NaN)",
}


@register_result_pytree
@dataclasses.dataclass(frozen=True)
class MinimizeResult:
    """Minimizer of ``objective`` with per-problem diagnostics (a pytree: it leaves a ``vmap``).

    Attributes:
        x: the last iterate, structured like ``x0`` (NaN in a ``NONFINITE`` problem).
        fun: the objective there, shape ``batch``.
        grad_norm: ``||grad f(x)||`` there, recomputed at ``x`` (the status is decided on it).
        converged: bool, shape ``batch``.
        iterations: int64, iterations each problem took.
        status: int64 :class:`MinimizeStatus` codes, shape ``batch``.
    """

    x: Any
    fun: Tensor
    grad_norm: Tensor
    converged: Tensor
    iterations: Tensor
    status: Tensor

    STATUS = MinimizeStatus
    __repr__ = result_repr

    def failures(self) -> list[str]:
        """Readable descriptions of every problem that did not converge (host sync)."""
        return describe_failures(MinimizeStatus, self.status, self.iterations, self.grad_norm, "problem",
                                 "gradient norm")

    @property
    def all_converged(self) -> bool:
        """True when every problem converged (host sync)."""
        return bool(torch.all(self.converged))


# ----------------------------------------------------------------- flat points

class FlatProblem:
    """The objective on flat points ``(*batch, n)``, with its gradient and Hessian-vector products,
    and its value ``f0`` and gradient ``g0`` at the start ``x0``."""

    def __init__(self, objective: Objective, x0: Any):
        if not callable(objective):
            raise TypeError(f"objective must be a callable returning the objective's value, got "
                            f"{type(objective).__name__}")
        leaves, self.spec = pytree.tree_flatten(x0)
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError("x0 must be a tensor or a pytree (tuple, list, dict) of tensors, got "
                            f"{type(x0).__name__} with leaves {[type(t).__name__ for t in leaves]}")
        dtypes = {t.dtype for t in leaves}
        if len(dtypes) != 1 or not leaves[0].is_floating_point():
            raise TypeError(f"x0's tensors must share one real floating dtype (float32/float64), got "
                            f"{sorted(str(d) for d in dtypes)}; convert them with .double() or .float()")
        self.objective = objective

        def sum_and_values_at_start(tree: Any) -> tuple[Tensor, Tensor]:
            values = objective(tree)
            if not isinstance(values, Tensor):
                raise TypeError(f"objective must return a tensor, got {type(values).__name__}")
            return values.sum(), values

        # The start's value and gradient, taken on x0 as given: its value's shape says the batch.
        g0, (_, self.f0) = torch.func.grad_and_value(sum_and_values_at_start, has_aux=True)(x0)
        self.batch = tuple(self.f0.shape)
        for i, t in enumerate(leaves):
            if tuple(t.shape[:len(self.batch)]) != self.batch:
                raise ValueError(f"objective returned shape {self.batch} (one value per problem), but leaf {i} "
                                 f"of x0 has shape {tuple(t.shape)}, which does not start with it; return a "
                                 "scalar (.sum() or .mean()) for one problem")
        self.shapes = [tuple(t.shape[len(self.batch):]) for t in leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.x0, self.g0 = self.flatten(leaves), self.flatten(pytree.tree_leaves(g0))
        total = self.sum_and_values
        self._value_and_grad = torch.func.grad_and_value(total, has_aux=True)
        self._grad = torch.func.grad(lambda x: total(x)[0])

    def flatten(self, leaves: list[Tensor]) -> Tensor:
        """The leaves of a point (or a gradient) as one ``(*batch, n)`` vector."""
        flat = [t.reshape(self.batch + (-1,)) for t in leaves]
        return torch.cat(flat, dim=-1) if len(flat) > 1 else flat[0]

    def unflatten(self, x: Tensor) -> Any:
        if len(self.sizes) == 1:
            return pytree.tree_unflatten([x.reshape(self.batch + self.shapes[0])], self.spec)
        pieces = torch.split(x, self.sizes, dim=-1)
        return pytree.tree_unflatten([p.reshape(self.batch + s) for p, s in zip(pieces, self.shapes)], self.spec)

    def sum_and_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        values = self.objective(self.unflatten(x))
        if not isinstance(values, Tensor) or tuple(values.shape) != self.batch:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"objective returned {got} at a trial point but {self.batch} at x0")
        return values.sum(), values

    def value_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-problem values (shape ``batch``) and gradients (shape ``(*batch, n)``)."""
        g, (_, f) = self._value_and_grad(x)
        return f, g

    def hessian_at(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``v -> H(x) v`` per problem, the gradient linearized once (reverse over reverse)."""
        _, vjp_fn = torch.func.vjp(self._grad, x)
        return lambda v: vjp_fn(v)[0]


# ------------------------------------------------------------------ the loop

def default_rtol(dtype: torch.dtype) -> float:
    """``eps ** (3/4)`` of ``dtype``: 1.8e-12 in float64, 6.5e-6 in float32.

    The error this gradient norm leaves in ``x``, and in an implicit hypergradient built
    on ``x``, is at most about the condition number times it: 1e-6 up to condition
    numbers of about 5e5 in float64. Rounding stops the minimizers near ``eps`` times
    the condition number; a problem that stalls there before meeting the tolerance is
    reported ``NO_DECREASE``.
    """
    return machine_eps(dtype) ** 0.75


@dataclass(frozen=True, kw_only=True)
class Minimizer:
    """The options every minimizer shares, in scipy's vocabulary.

    Attributes:
        rtol, atol: stop a problem once ``||grad f(x)|| <= max(rtol ||grad f(x0)||, atol)``.
            ``rtol=None`` (default) picks :func:`default_rtol` of the dtype (1.8e-12 in
            float64, 6.5e-6 in float32).
        maxiter: iteration cap per problem (0 returns the start, with its status).
    """

    rtol: float | None = None
    atol: float = 0.0
    maxiter: int = 1000

    def __post_init__(self) -> None:
        if self.rtol is not None:
            check_nonnegative("rtol", self.rtol)
        check_nonnegative("atol", self.atol)
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, int) or self.maxiter < 0:
            raise ValueError(f"maxiter must be an int >= 0, got {self.maxiter!r}")

    def __call__(self, objective: Objective, x0: Any) -> MinimizeResult:
        problem = FlatProblem(objective, x0)
        state = Iterate.start(problem, self)
        self.iterate(problem, state)
        return state.finish(problem)

    def iterate(self, problem: FlatProblem, state: "Iterate") -> None:
        """Advance ``state`` until every problem has stopped or ``maxiter``: the method itself."""
        raise NotImplementedError


class Iterate:
    """The mutable state of a batched minimization: point, value, gradient, statuses."""

    def __init__(self, x: Tensor, f: Tensor, g: Tensor, tol: Tensor):
        self.x, self.f, self.g, self.tol, self.f0 = x, f, g, tol, f
        self.gnorm = self.gnorm0 = self.best = norm(g)
        self.anchor = f
        batch = f.shape
        self.iterations = torch.zeros(batch, dtype=torch.int64, device=x.device)
        self.stale = torch.zeros(batch, dtype=torch.int64, device=x.device)
        status = torch.full(batch, RUNNING, dtype=torch.int64, device=x.device)
        status = mark(status, self.gnorm <= tol, MinimizeStatus.CONVERGED)
        self.status = mark(status, ~(torch.isfinite(f) & finite(g) & finite(x)), MinimizeStatus.NONFINITE)

    @classmethod
    def start(cls, problem: FlatProblem, options: Minimizer) -> "Iterate":
        x, f, g = problem.x0, problem.f0, problem.g0
        rtol = default_rtol(x.dtype) if options.rtol is None else options.rtol
        tol = torch.clamp(rtol * norm(g), min=options.atol)
        return cls(x, f, g, tol)

    @property
    def active(self) -> Tensor:
        return self.status == RUNNING

    def done(self, iteration: int) -> bool:
        """The host-side early exit (see the module's conventions)."""
        return all_finished(self.active, iteration)

    def advance(self, moved: Tensor, x: Tensor, f: Tensor, g: Tensor) -> None:
        """Move the problems in ``moved`` to ``(x, f, g)``, count the iteration, and decide
        which stop: converged, diverged (``|f - f0| > (1 + |f0|) / eps``), non-finite, or
        stalled (``NO_DECREASE``: :data:`STALL_ITERATIONS` moves in a row with neither a new
        smallest gradient norm nor a decrease of the objective by more than
        ``100 eps max(|f|, |f0|)`` from its value at the last such progress, as at the
        rounding floor, where the steps only shuffle rounding errors: the tolerance is below
        what this precision resolves)."""
        self.x = select(moved, x, self.x)
        self.f = select(moved, f, self.f)
        self.g = select(moved, g, self.g)
        self.gnorm = norm(self.g)
        self.iterations = self.iterations + moved.long()
        ok = torch.isfinite(self.f) & finite(self.g)
        self.status = mark(self.status, moved & ~ok, MinimizeStatus.NONFINITE)
        running = self.active
        bound = (1 + self.f0.abs()) / machine_eps(self.x.dtype)
        self.status = mark(self.status, running & ((self.f - self.f0).abs() > bound), MinimizeStatus.DIVERGED)
        self.status = mark(self.status, self.active & (self.gnorm <= self.tol), MinimizeStatus.CONVERGED)
        slack = 100 * machine_eps(self.x.dtype) * torch.maximum(self.f.abs(), self.f0.abs())
        improved = (self.gnorm < self.best) | (self.f < self.anchor - slack)
        self.best = torch.minimum(self.best, self.gnorm)
        self.anchor = torch.where(improved, self.f, self.anchor)  # the value at the last progress
        self.stale = torch.where(moved & ~improved, self.stale + 1, torch.where(moved, 0, self.stale))
        self.stall(self.stale >= STALL_ITERATIONS)

    def stall(self, mask: Tensor) -> None:
        """The problems in ``mask`` found no acceptable step."""
        self.status = mark(self.status, mask & self.active, MinimizeStatus.NO_DECREASE)

    def finish(self, problem: FlatProblem) -> MinimizeResult:
        """The result, its status decided on the gradient at the returned point."""
        met = (self.gnorm <= self.tol) & finite(self.g) & torch.isfinite(self.f)
        status = mark(self.status, self.active, MinimizeStatus.MAX_ITERATIONS)
        status = mark(status, ~(torch.isfinite(self.f) & finite(self.g) & finite(self.x)), MinimizeStatus.NONFINITE)
        status = mark(status, met & finite(self.x), MinimizeStatus.CONVERGED)
        x = self.x
        bad = status == int(MinimizeStatus.NONFINITE)
        if values_hidden(x) or bool(bad.any()):
            x = torch.where(vec(bad), math.nan, x)
        return MinimizeResult(x=problem.unflatten(x), fun=self.f, grad_norm=self.gnorm,
                              converged=status == int(MinimizeStatus.CONVERGED), iterations=self.iterations,
                              status=status)


# -------------------------------------------------------------- line search

@dataclass(frozen=True)
class LineSearch:
    """Backtracking from a first trial step ``t0`` (per problem): ``t_j = t0 * shrink^j``.

    A trial is accepted when it gives sufficient decrease (Armijo, 1966; Nocedal and
    Wright, *Numerical Optimization*, Algorithm 3.1)::

        f(x + t d) <= f(x) + c t g^T d

    where the change resolves (``f(x + t d) < f(x) - delta`` with ``delta = sqrt(eps)
    max(|f(x)|, |f(x0)|)``), and otherwise, when ``f(x + t d) <= f(x) + delta`` and the
    slope's form of the same condition holds, ``grad f(x + t d)^T d <= (2c - 1) g^T d`` (the approximate Wolfe
    condition of Hager and Zhang, SIAM J. Optim. 2005, with their relative slack
    1e-6 replaced by ``sqrt(eps)``): close to a minimizer the values stop resolving
    the decrease long before the gradients do. The first accepted trial
    wins; a problem with none is reported by the caller. Each trial costs one
    value-and-gradient evaluation, and trials stop once every problem has accepted.
    """

    c: float = 1e-4
    shrink: float = 0.5
    trials: int = 20

    def __post_init__(self) -> None:
        if not (0 < self.c < 0.5 and 0 < self.shrink < 1):
            raise ValueError(f"need 0 < c < 0.5 and 0 < shrink < 1, got c={self.c}, shrink={self.shrink}")
        check_count("trials", self.trials, allow_none=False)

    def __call__(self, problem: FlatProblem, state: Iterate, d: Tensor, t0: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(accepted, x, f, g, t)``: per problem, whether a step passed, and the point, value,
        gradient and step it passed with (the current ones where none did)."""
        slope = dot(state.g, d)
        slack = machine_eps(state.f.dtype) ** 0.5 * torch.maximum(state.f.abs(), state.f0.abs())
        searching = state.active & (slope < 0)
        x_new, f_new, g_new, t_new = state.x, state.f, state.g, torch.zeros_like(t0)
        t = t0
        for j in range(self.trials):
            if j and all_finished(searching, j):
                break
            x_try = state.x + vec(t) * d
            f_try, g_try = problem.value_and_grad(x_try)
            armijo = f_try <= state.f + self.c * t * slope
            flat = (f_try <= state.f + slack) & (dot(g_try, d) <= (2 * self.c - 1) * slope)
            resolved = f_try < state.f - slack
            ok = searching & torch.where(resolved, armijo, flat) & torch.isfinite(f_try) & finite(g_try)
            x_new, f_new, g_new = select(ok, x_try, x_new), select(ok, f_try, f_new), select(ok, g_try, g_new)
            t_new = torch.where(ok, t, t_new)
            searching = searching & ~ok
            t = t * self.shrink
        accepted = state.active & ~searching & (slope < 0)
        return accepted, x_new, f_new, g_new, t_new
