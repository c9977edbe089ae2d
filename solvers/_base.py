"""Pieces shared by every linear solver.

Conventions
-----------
``b`` has shape ``(*batch, n)``: the last dimension is the unknown, every
leading dimension indexes an independent system. ``matvec`` maps a tensor
shaped like ``b`` to a tensor shaped like ``b`` and applies each system's
operator to its own row. Per-system scalars (step sizes, norms, status codes)
therefore have shape ``batch`` and vectors ``(*batch, n)``.

Every solver stops a system once ``||b - A x|| <= max(rtol * ||b||, atol)``,
the test of :mod:`scipy.sparse.linalg`, and :func:`finish` decides the final
status on the true residual recomputed from the last iterate, never on the
recurrence's own estimate. Inside the loop only scalars are checked for NaN/Inf
(the residual norm, the curvature): a non-finite iterate shows in the true
residual at the end, one vector check per solve instead of one per iteration.
A stopped system is frozen with
``torch.where`` masks (CG: by a zero step), so a batch of systems behaves exactly
like the same systems solved one at a time.

Under ``torch.func.vmap`` the one host-side decision, "has every system
finished?", reads the whole batch beneath the vmap wrappers, so a vmapped solve
stops when every member has converged; every other step is branch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ._result import SolveResult, Status
from ._transforms import is_capturing, is_vmapped, physical, values_hidden, values_unreadable

__all__ = ["IterativeSolver", "LinearSolver", "MatVec", "Preconditioner", "is_capturing", "is_vmapped",
           "poison", "values_hidden", "values_unreadable"]

MatVec = Callable[[Tensor], Tensor]
"""Applies ``A`` to a tensor shaped like ``b``."""

Preconditioner = Callable[[Tensor], Tensor]
"""Applies ``M ~ A^{-1}`` to a tensor shaped like ``b`` (scipy's ``M``)."""

RUNNING = -1
"""Internal status code of a system that is still iterating."""

_CHECK_EVERY = 8
"""Off the CPU, look at the all-finished flag only every this many iterations."""


@runtime_checkable
class LinearSolver(Protocol):
    """Anything that solves ``A x = b`` given ``matvec(v) = A v``."""

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        ...


# ----------------------------------------------------------------- validation

def check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_positive(name: str, value: float) -> float:
    value = check_nonnegative(name, value)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_count(name: str, value: int | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable applying the operator to a tensor "
                        f"shaped like b, or None; got {type(value).__name__}")


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_iterative(solver: object) -> None:
    """Validate the options every iterative solver shares."""
    for name in ("rtol", "atol", "ridge"):
        check_nonnegative(name, getattr(solver, name))
    check_count("maxiter", getattr(solver, "maxiter"))
    check_callable("M", getattr(solver, "M"))
    check_flag("history", getattr(solver, "history"))


# ------------------------------------------------------------- tensor helpers

def dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-system inner product over the last dimension (the same reduction order for
    every batch shape, so a batch of systems matches the systems solved one at a time)."""
    return (u * v).sum(-1)


def norm(v: Tensor) -> Tensor:
    """Per-system Euclidean norm over the last dimension."""
    return torch.linalg.vector_norm(v, dim=-1)


def vec(s: Tensor) -> Tensor:
    """Lift a per-system scalar to broadcast against ``(*batch, n)`` vectors."""
    return s.unsqueeze(-1)


def axpy(a: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``y + a x`` with a per-system scalar ``a`` (shape ``batch``): one fused kernel."""
    return torch.addcmul(y, vec(a), x)


def select(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``mask`` (shape ``batch``) holds, else ``old``; scalars or vectors."""
    if new.dim() > mask.dim():
        mask = vec(mask)
    return torch.where(mask, new, old)


def safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """``num / den`` where ``ok``, else ``num`` (finite, gradient-safe placeholder)."""
    return num / torch.where(ok, den, torch.ones_like(den))


def finite(v: Tensor) -> Tensor:
    """Per-system: every entry of the ``(*batch, n)`` vector ``v`` is finite."""
    return torch.isfinite(v).all(-1)


def machine_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype``: the breakdown threshold of the recurrences."""
    return torch.finfo(dtype).eps


def all_finished(active: Tensor, iteration: int) -> bool:
    """Host-side early exit: True when no system is still active.

    Under ``torch.func.vmap`` (and so ``jacrev``/``jacfwd``) the flags of the whole
    batch are read from the physical tensor beneath the wrappers, so a vmapped solve
    stops once every member has finished, as a batched while-loop does; a finished
    member is frozen by the solvers' masks meanwhile. Never consulted while a CUDA
    graph is captured (values exist only at replay: the solver then runs its
    ``maxiter`` iterations), nor when the values cannot be read at all (tracing);
    off the CPU only every ``_CHECK_EVERY`` iterations to limit device syncs.
    """
    if is_capturing(active) or torch.compiler.is_compiling():
        return False
    if active.device.type != "cpu" and iteration % _CHECK_EVERY:
        return False
    try:
        return not bool(physical(active).any())
    except RuntimeError:  # no values behind the tensor (a tracer)
        return False


# ---------------------------------------------------------- solve scaffolding

def operator(matvec: MatVec, ridge: float) -> MatVec:
    """``v -> A v + ridge * v`` with a shape check on the user's ``matvec``."""
    if not callable(matvec):
        raise TypeError(f"matvec must be a callable, got {type(matvec).__name__}")

    def apply(v: Tensor) -> Tensor:
        out = matvec(v)
        if not isinstance(out, Tensor) or out.shape != v.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"matvec must return a tensor shaped like its input "
                             f"{tuple(v.shape)}, got {got}")
        return out + ridge * v if ridge else out

    return apply


def identity(v: Tensor) -> Tensor:
    return v


def check_rhs(b: Tensor, x0: Tensor | None) -> None:
    if not isinstance(b, Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.dim() < 1:
        raise ValueError("b must have shape (n,) or (batch, n); got a 0-d tensor")
    if not b.is_floating_point():
        raise TypeError(f"b must be a real floating tensor (float32/float64), got {b.dtype}")
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor or None, got {type(x0).__name__}")
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}, "
                             f"got {tuple(x0.shape)}")


class Start:
    """Initial state of an iterative solve: iterate, residual, tolerance, bookkeeping."""

    def __init__(self, op: MatVec, b: Tensor, x0: Tensor | None, rtol: float, atol: float):
        check_rhs(b, x0)
        if x0 is None:
            self.x = torch.zeros_like(b)
            self.r = b
        else:
            self.x = x0.to(dtype=b.dtype, device=b.device)
            self.r = b - op(self.x)
        self.rnorm = norm(self.r)
        bnorm = self.rnorm if x0 is None else norm(b)  # from zero, r is b
        self.tol = torch.clamp(rtol * bnorm, min=atol)
        batch = self.rnorm.shape
        self.iterations = torch.zeros(batch, dtype=torch.int64, device=b.device)
        ok = finite(self.r) if x0 is None else finite(self.r) & finite(self.x)
        status = torch.full(batch, RUNNING, dtype=torch.int64, device=b.device)
        status = mark(status, self.rnorm <= self.tol, Status.CONVERGED)
        self.status = mark(status, ~ok, Status.NONFINITE)


SINGULAR_SCALE = 1e-2
"""A system whose ``||A|| ||x|| / ||b||`` exceeds ``SINGULAR_SCALE / eps`` without meeting
the tolerance is reported ``SINGULAR``: no solution at this precision."""


def finish(op: MatVec, b: Tensor, x: Tensor, status: Tensor, iterations: Tensor,
           history: list[Tensor] | None, maxiter: int, tol: Tensor, Ab: Tensor | None = None) -> SolveResult:
    """Close a solve: the final status is decided on the true residual.

    ``r = b - A x`` is recomputed from the final iterate (one matvec). A system is
    ``CONVERGED`` exactly when ``||r|| <= tol``. One the solver believed converged
    (its recurrence residual drifts from the true one in finite precision) becomes
    ``INACCURATE``; one still running, ``MAX_ITERATIONS``. A system that missed the
    tolerance with ``kappa = ||A|| ||x|| / ||b||`` beyond ``SINGULAR_SCALE / eps``,
    where ``||A||`` is estimated from below by ``max(||A b|| / ||b||, ||A x|| / ||x||)``
    (one more matvec, only when some system missed), is ``SINGULAR``: for a solution
    ``kappa`` is at most the condition number, so ``x`` grew along a (numerically)
    null direction, the signature of a system without a solution. A ``NONFINITE``
    system's ``x`` is set to NaN (:func:`poison`), so that no number stands in for a
    failed solve. Under ``vmap`` or CUDA-graph capture ``x`` is returned as it is (a
    masked copy would cost the implicit gradient a vector-Jacobian product): the
    implicit gradient poisons its own result with the status instead. ``Ab``: ``A b``
    when the solver already applied the operator to ``b`` itself (CG's first direction
    from ``x0 = 0`` without a preconditioner), which saves the estimate's matvec.
    """
    hidden = values_hidden(x)
    if Ab is None and hidden:  # branch-free: the estimate's matvec comes first, so A x stays the last
        Ab = op(b)
    Ax = op(x)
    rnorm = norm(b - Ax)
    met = (rnorm <= tol) & finite(x)
    claimed = status == int(Status.CONVERGED)
    status = mark(status, (status == RUNNING) & ~met, Status.MAX_ITERATIONS)
    status = mark(status, claimed & ~met, Status.INACCURATE)
    status = mark(status, ~torch.isfinite(rnorm), Status.NONFINITE)
    status = mark(status, met & (status != int(Status.NONFINITE)), Status.CONVERGED)
    candidate = ~met & (status != int(Status.NONFINITE)) & (status != int(Status.DIVERGED))
    if hidden or bool(candidate.any()):
        Ab = op(b) if Ab is None else Ab
        status = mark(status, candidate & _numerically_singular(b, x, Ab, Ax), Status.SINGULAR)
    if not hidden:  # under vmap the callers poison what they derive from x (see poison)
        x = poison(x, status)
    hist = None
    if history is not None:
        hist = torch.stack(history + [history[-1]] * (maxiter + 1 - len(history)))
    return SolveResult(x=x, converged=status == int(Status.CONVERGED), iterations=iterations,
                       residual_norm=rnorm, status=status, history=hist)


def poison(v: Tensor, status: Tensor) -> Tensor:
    """``v`` with NaN in every system whose status is ``NONFINITE`` (``status`` has
    ``v``'s leading dimensions). While values are readable and no system failed,
    ``v`` itself is returned."""
    bad = status == int(Status.NONFINITE)
    if not values_hidden(v) and not values_hidden(bad) and not bool(bad.any()):
        return v
    if v.dim() > bad.dim():
        bad = bad.reshape(*bad.shape, *([1] * (v.dim() - bad.dim())))
    return torch.where(bad, math.nan, v)


def _numerically_singular(b: Tensor, x: Tensor, Ab: Tensor, Ax: Tensor) -> Tensor:
    """Per system: ``||A|| ||x|| / ||b|| > SINGULAR_SCALE / eps`` with ``||A||`` bounded below."""
    bnorm, xnorm = norm(b), norm(x)
    tiny = torch.finfo(b.dtype).tiny
    scale = torch.maximum(norm(Ab) / bnorm.clamp(min=tiny), norm(Ax) / xnorm.clamp(min=tiny))
    kappa = scale * xnorm / bnorm.clamp(min=tiny)
    return (bnorm > 0) & (kappa > SINGULAR_SCALE / machine_eps(b.dtype))


def asymmetric(u: Tensor, Au: Tensor, v: Tensor, Av: Tensor) -> Tensor:
    """Per system: ``|<u, A v> - <A u, v>|`` beyond rounding, relative to ``|u||Av| + |Au||v|``.

    A free symmetry probe on two vectors a Krylov solver has already applied the
    operator to. The threshold ``eps ** 0.25`` (1.9e-2 in float32, 1.2e-4 in float64)
    leaves room for Hessian-vector products computed by automatic differentiation,
    symmetric only up to rounding: a float32 MLP's measured up to 1.8e-3 here. A
    milder asymmetry goes unnamed but not unreported: if it spoils the solve, the
    true residual says so.
    """
    gap = (dot(u, Av) - dot(Au, v)).abs()
    scale = norm(u) * norm(Av) + norm(Au) * norm(v)
    return gap > machine_eps(u.dtype) ** 0.25 * scale


def mark(status: Tensor, mask: Tensor, code: Status) -> Tensor:
    """Set ``code`` where ``mask`` holds (only ever applied to running systems)."""
    return torch.where(mask, int(code), status)


@dataclass(frozen=True, kw_only=True)
class IterativeSolver:
    """The options every iterative solver shares, in scipy's vocabulary.

    Attributes:
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``.
        maxiter: iteration cap per system; ``None`` means the solver's default.
        M: preconditioner, a callable applying ``M ~ A^{-1}``.
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every iteration.
    """

    rtol: float = 1e-5
    atol: float = 0.0
    maxiter: int | None = None
    M: Preconditioner | None = None
    ridge: float = 0.0
    history: bool = False

    def __post_init__(self) -> None:
        check_iterative(self)

    def start(self, matvec: MatVec, b: Tensor, x0: Tensor | None,
              default_maxiter: Callable[[int], int]) -> tuple[MatVec, Preconditioner, Start, int]:
        """The damped operator, the preconditioner, the initial state and the iteration cap
        (``default_maxiter(n)`` for ``n`` unknowns when ``maxiter`` is ``None``)."""
        op = operator(matvec, self.ridge)
        precond = self.M if self.M is not None else identity
        state = Start(op, b, x0, self.rtol, self.atol)
        return op, precond, state, self.maxiter or default_maxiter(b.shape[-1])
