"""``bilevel.hypergradient``: the gradient of ``F(theta) = f(phi*(theta), theta)``.

Modes:

``"implicit"`` (implicit function theorem; Rajeswaran et al., NeurIPS 2019;
Blondel et al., NeurIPS 2022). With ``A = d_phi G(phi*, theta)``::

    A^T v = d_phi f                       # one linear solve, matrix-free
    dF/dtheta = d_theta f - (d_theta G)^T v

The linearization of ``G`` at ``(phi*, theta)`` is built once (:mod:`bilevel.adjoint`)
and every solver iteration costs one vector-Jacobian product. Memory is that of
one inner gradient, whatever the inner optimizer did.

``"unrolled"``: reverse mode through ``inner_steps`` of ``inner_update`` from
``initial_inner`` (MAML; memory grows with the steps). ``"truncated"``: reverse
mode through the last ``truncate`` steps only (Shaban et al., AISTATS 2019).
``"first_order"``: the unrolled derivative with the inner gradients held
constant, so ``phi*`` depends on ``theta`` only through the initialization
(first-order MAML; first-order DARTS when the initialization is constant).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from bilevel.adjoint import LINEARIZATIONS, AdjointOperator, Linearization, grads_and_value, linearize
from bilevel.errors import BilevelError, BilevelWarning
from bilevel.policy import (CallPolicy, OnFailure, caller_stacklevel, failed_systems, host_checks_deferred, host_view,
                            inner_residual_failure, inner_solve_failure, nan_where_failed, require_finite,
                            solve_failure, validate_on_failure)
from bilevel.problem import BilevelProblem, checked_condition, scalar_objective
from bilevel.validation import arguments_named
from bilevel.pytree import (PyTree, check_devices_and_dtypes, check_parameters, check_same_structure, ravel,
                            tree_leaves, tree_map, tree_norm)
from bilevel.solvers import (CG, IterativeSolver, LinearSolver, SolveResult, get_solver, poison, register_result_pytree,
                             result_repr)
from bilevel.solvers.minimize import MinimizeResult

__all__ = ["HypergradientResult", "hypergradient", "check_result", "MODES"]

Mode = Literal["implicit", "unrolled", "truncated", "first_order"]
MODES = ("implicit", "unrolled", "truncated", "first_order")


@register_result_pytree
@dataclasses.dataclass(frozen=True)
class HypergradientResult:
    """What :func:`hypergradient` returns (a pytree, so it passes through ``torch.func.vmap``).

    Attributes:
        grad: ``dF/dtheta``, same structure as ``outer``.
        inner: the inner solution ``phi*`` (detached), same structure as the initialization.
        outer_loss: ``f(phi*, theta)``.
        inner_residual: ``||G(phi*, theta)||``, how far ``phi*`` is from a root
            (``None`` for a problem that defines no optimality condition).
        solve: diagnostics of the adjoint linear solve (``"implicit"`` mode), else ``None``.
        inner_solve: the inner minimizer's report (status, iterations, gradient norm,
            objective) where the problem ran one (:meth:`BilevelProblem.inner_solve`), else ``None``.
        adjoint_rhs: ``d_phi f`` at ``phi*`` as one flat vector, the right-hand side ``b`` of the
            adjoint system (``"implicit"`` mode), else ``None``: with ``solve`` it gives the
            relative residual ``solve.residual_norm / ||b||`` at no extra cost.
    """

    grad: PyTree
    inner: PyTree
    outer_loss: Tensor
    inner_residual: Tensor | None = None
    solve: SolveResult | None = None
    inner_solve: MinimizeResult | None = None
    adjoint_rhs: Tensor | None = None

    __repr__ = result_repr


def hypergradient(
    problem: BilevelProblem,
    outer: PyTree,
    data: Any = None,
    *,
    solver: LinearSolver | str | None = None,
    mode: Mode = "implicit",
    init: PyTree | None = None,
    truncate: int | None = None,
    adjoint_x0: Tensor | None = None,
    on_failure: OnFailure = "warn",
    linearization: Linearization = "auto",
) -> HypergradientResult:
    """Hypergradient of ``problem`` at ``outer``.

    Args:
        problem: a :class:`BilevelProblem`.
        outer: outer parameters ``theta`` (tensor, tuple/dict of tensors).
        data: anything the problem's methods take as ``data`` (batched under vmap).
        solver: a :mod:`bilevel.solvers` solver instance or its name (``"cg"``,
            ``"minres"``, ``"gmres"``, ...; see :data:`bilevel.solvers.SOLVERS`) for the
            adjoint system (``"implicit"`` mode); default ``CG(rtol=adjoint_rtol(dtype))``
            (1.6e-10 in float64, 4.9e-5 in float32), right for minimization inner problems
            (symmetric positive definite Hessian). Use ``MINRES()`` for
            saddle points, ``GMRES()`` for general roots, ``Direct()`` for ground truth.
        mode: ``"implicit"``, ``"unrolled"``, ``"truncated"`` or ``"first_order"``.
        init: inner starting point; default ``problem.initial_inner(outer, data)``. A
            problem whose own ``solve_inner`` needs no start may leave ``initial_inner``
            undefined in ``"implicit"`` mode (it then receives ``init=None``).
        truncate: number of differentiated steps in ``"truncated"`` mode.
        adjoint_x0: initial guess of the adjoint solve (``"implicit"`` mode), a flat
            vector like ``result.solve.x``: warm-start with the previous outer step's
            adjoint solution (as HOAG does; Pedregosa, ICML 2016).
        on_failure: what a non-converged adjoint solve, a diverged inner solve or an inner
            residual above ``problem.residual_tol`` does: ``"warn"`` (default, once per
            call), ``"raise"`` (:class:`~bilevel.ConvergenceError`) or ``"ignore"``. NaN or
            Inf always raises :class:`~bilevel.NonFiniteError`. Under ``torch.func``
            transforms (``vmap``, ``jacrev``, ...) the values are read beneath the wrappers;
            where none can be read (``torch.compile`` tracing, CUDA-graph capture) the
            failed systems' gradients are NaN (:func:`check_result`).
        linearization: how each adjoint matvec differentiates the optimality condition
            (``"implicit"`` mode): ``"auto"`` (default) through a retained autograd graph
            (the double-backward Hessian-vector product) where values are readable
            outside every ``torch.func`` transform, else ``torch.func.vjp``;
            ``"functional"``: always ``torch.func.vjp`` (:mod:`bilevel.adjoint`).

    Returns:
        :class:`HypergradientResult`.
    """
    if mode not in MODES:
        raise BilevelError(f"mode must be one of {MODES}, got {mode!r}")
    validate_on_failure(on_failure)
    if linearization not in LINEARIZATIONS:
        raise BilevelError(f"linearization must be one of {LINEARIZATIONS}, got {linearization!r}")
    problem._validate()
    if mode == "truncated":
        if not (isinstance(truncate, int) and 1 <= truncate <= problem.inner_steps):
            raise BilevelError(f"mode='truncated' needs truncate=k with 1 <= k <= inner_steps "
                               f"({problem.inner_steps}), got {truncate!r}")
    elif truncate is not None:
        raise BilevelError(f"truncate= applies only to mode='truncated', not mode={mode!r}")
    if mode != "implicit" and (solver is not None or adjoint_x0 is not None):
        option = "solver=" if solver is not None else "adjoint_x0="
        raise BilevelError(f"{option} applies only to mode='implicit', not mode={mode!r}")
    check_parameters(outer, "outer")
    if init is not None:
        check_parameters(init, "init")
    check_devices_and_dtypes(outer=outer, data=data, init=init)
    if not host_checks_deferred(outer):
        require_finite(outer, "the outer parameters", "the outer optimizer diverged or was given bad values")
    if mode == "implicit" and init is None and not (problem.defines_initial_inner
                                                     or problem.overrides_solve_inner):
        raise BilevelError(f"{type(problem).__name__} defines neither initial_inner nor its own solve_inner: "
                           "the default inner solver needs a starting point; define initial_inner(outer, data) "
                           "or pass init=...")
    if mode != "implicit" and init is None and not problem.defines_initial_inner:
        raise BilevelError(f"mode={mode!r} differentiates through the inner starting point: define "
                           f"{type(problem).__name__}.initial_inner(outer, data) or pass init=...")

    d_inner = None
    if mode == "implicit" and solver is None:
        solver = CG(rtol=adjoint_rtol(_dtype_of(outer)))
    with arguments_named(problem, outer, data, init):
        if mode == "implicit":
            result = _implicit(problem, outer, data, init, get_solver(solver), adjoint_x0, linearization)
        elif mode == "first_order":
            result, d_inner = _first_order(problem, outer, data, init)
        else:
            result = _unrolled(problem, outer, data, init, truncate if mode == "truncated" else None)

    deferred = host_checks_deferred(outer, data, result.outer_loss)
    if not (deferred and on_failure == "ignore"):  # beneath vmap too, where "ignore" reads nothing
        result = check_result(result, on_failure=on_failure, residual_tol=problem.residual_tol)
    if not deferred and d_inner is not None and on_failure != "ignore":
        _warn_if_first_order_dropped(result.grad, d_inner)
    return result


def check_result(result: HypergradientResult, *, on_failure: OnFailure = "warn",
                 residual_tol: float | None = 1e-4) -> HypergradientResult:
    """Apply the failure policy to a (possibly vmapped) :class:`HypergradientResult`.

    Raises :class:`~bilevel.NonFiniteError` on NaN/Inf in the inner solution, the
    adjoint solve or the hypergradient; warns (once), raises or ignores (``on_failure``)
    a non-converged solve or an inner residual above ``residual_tol``. The values are
    read beneath ``torch.func`` wrappers (inside ``vmap`` every member is checked), and
    ``result`` is returned unchanged so that the call can wrap another. Where nothing
    can be read (``torch.compile`` tracing, CUDA-graph capture), a copy is returned
    whose gradient is NaN for every failed system unless ``on_failure="ignore"``.
    """
    validate_on_failure(on_failure)
    seen = host_view(result)
    if seen is None:
        failed = failed_systems(None if result.solve is None else result.solve.status, result.inner_residual,
                                residual_tol, None if result.inner_solve is None else result.inner_solve.status)
        if on_failure == "ignore" or failed is None:
            return result
        return dataclasses.replace(result, grad=nan_where_failed(result.grad, failed))
    inner_message = None if seen.inner_solve is None else inner_solve_failure(seen.inner_solve)
    require_finite(seen.inner, "the inner solution phi*", inner_message or
                   "the inner solver diverged, or the inner data holds NaN/Inf: check the training data, "
                   "lower inner_lr or check the inner objective")
    require_finite(seen.outer_loss, "the outer loss f(phi*, theta)", inner_message or
                   "the outer objective or its data (e.g. the validation set) holds NaN/Inf")
    solve_message = None if seen.solve is None else solve_failure(seen.solve)
    residual_message = inner_residual_failure(seen.inner_residual, residual_tol, seen.inner_solve)
    # Before the gradient's NaN check: where nothing could be read, a failure was marked by NaN there.
    CallPolicy(on_failure).report(inner_message, solve_message, residual_message)
    failed = "the solve failed as reported (compiled or captured calls mark a failed system's gradient NaN)"
    require_finite(seen.grad, "the hypergradient",
                   failed if solve_message or residual_message else
                   "the outer objective or the optimality condition produced NaN/Inf at phi*")
    return result


def adjoint_rtol(dtype: torch.dtype) -> float:
    """``eps ** (5/8)`` of ``dtype`` (1.6e-10 in float64, 4.9e-5 in float32): the default adjoint
    solve's relative residual, as tight as CG's true residual reliably gets on systems of condition
    number up to about 1e4 in float64 (tighter, its status turns ``INACCURATE`` from rounding)."""
    return torch.finfo(dtype).eps ** 0.625


def _dtype_of(outer: PyTree) -> torch.dtype:
    leaves = [t for t in tree_leaves(outer) if isinstance(t, Tensor) and t.is_floating_point()]
    return leaves[0].dtype if leaves else torch.get_default_dtype()


def _initial(problem: BilevelProblem, outer: PyTree, data: Any, init: PyTree | None) -> PyTree:
    """``init``, else ``problem.initial_inner``'s result, checked against ``outer``'s dtype and device;
    ``None`` when neither exists (only for a problem whose ``solve_inner`` needs no start)."""
    if init is not None:
        return init
    if not problem.defines_initial_inner:
        return None
    start = problem.initial_inner(outer, data)
    name = f"{type(problem).__name__}.initial_inner's result"
    check_parameters(start, name)
    check_devices_and_dtypes(outer=outer, **{name: start})
    return start


def _residual(problem: BilevelProblem, inner: PyTree, outer: PyTree, data: Any) -> Tensor | None:
    if not problem.defines_optimality:
        return None
    return tree_norm(checked_condition(problem, data)(inner, outer)).detach()


def _outer_value_and_grads(problem: BilevelProblem, inner: PyTree, outer: PyTree, data: Any):
    objective = scalar_objective(problem.outer_objective, f"{type(problem).__name__}.outer_objective")
    (d_inner, d_outer), loss = grads_and_value(objective, inner, outer, data)
    return loss, d_inner, d_outer


def _solve_detached(problem: BilevelProblem, outer: PyTree, data: Any,
                    init: PyTree | None) -> tuple[PyTree, MinimizeResult | None]:
    """``phi*`` (detached), and the inner minimizer's report where one ran (:meth:`BilevelProblem.inner_solve`)."""
    with torch.no_grad():
        outer_d = tree_map(torch.Tensor.detach, outer)
        start = _initial(problem, outer_d, data, init)
        start = None if start is None else tree_map(torch.Tensor.detach, start)
        report = problem.inner_solve(outer_d, data, start)
        inner = report.x if report is not None else problem.solve_inner(outer_d, data, start)
        name = f"{type(problem).__name__}.solve_inner's result"
        check_parameters(inner, name)
        if start is not None:
            check_same_structure(start, inner, name, "the initialization")
        check_devices_and_dtypes(outer=outer, **{name: inner})
    return tree_map(torch.Tensor.detach, inner), report


def _implicit(problem: BilevelProblem, outer: PyTree, data: Any, init: PyTree | None,
              solver: LinearSolver, adjoint_x0: Tensor | None,
              linearization: Linearization) -> HypergradientResult:
    inner, report = _solve_detached(problem, outer, data, init)
    residual, vjp_fn = linearize(checked_condition(problem, data), inner, outer, data, linearization)
    loss, d_inner, d_outer = _outer_value_and_grads(problem, inner, outer, data)

    b, unravel = ravel(d_inner)

    adjoint_matvec = AdjointOperator(vjp_fn, unravel, reuse_last=isinstance(solver, IterativeSolver))
    if adjoint_x0 is not None and adjoint_x0.shape != b.shape:
        raise BilevelError(f"adjoint_x0 has shape {tuple(adjoint_x0.shape)} but the adjoint system has "
                           f"{tuple(b.shape)} unknowns; pass a previous result.solve.x")
    solve = solver(adjoint_matvec, b, adjoint_x0)
    (cross,) = adjoint_matvec.cross(solve.x)
    grad = tree_map(lambda direct, indirect: poison(direct - indirect, solve.status), d_outer, cross)
    return HypergradientResult(grad, inner, loss.detach(), tree_norm(residual).detach(), solve,
                               adjoint_rhs=b.detach(), inner_solve=report)


def _first_order(problem: BilevelProblem, outer: PyTree, data: Any,
                 init: PyTree | None) -> tuple[HypergradientResult, PyTree]:
    """The first-order result, and ``d_phi f`` at ``phi*`` (for the dropped-path warning)."""
    inner, report = _solve_detached(problem, outer, data, init)
    loss, d_inner, d_outer = _outer_value_and_grads(problem, inner, outer, data)
    if not host_checks_deferred(d_inner):  # dropped below when the start does not depend on theta
        require_finite(d_inner, "the outer gradient d_phi f at phi*",
                       "the outer objective or its data (e.g. the validation set) holds NaN/Inf")
    if init is None:  # phi* depends on theta through its initialization only
        _, init_vjp = torch.func.vjp(lambda o: problem.initial_inner(o, data), outer)
        (through_init,) = init_vjp(d_inner)
        d_outer = tree_map(torch.add, d_outer, through_init)
    residual = _residual(problem, inner, outer, data)
    return HypergradientResult(d_outer, inner, loss.detach(), residual, inner_solve=report), d_inner


def _warn_if_first_order_dropped(grad: PyTree, d_inner: PyTree) -> None:
    """Warn when a first-order hypergradient is exactly zero although ``f`` depends on ``phi``
    (``d_inner = d_phi f`` is not zero): the inner start does not depend on ``theta``, so the
    whole indirect term was dropped."""
    if any(bool(leaf.count_nonzero()) for leaf in tree_leaves(grad)):
        return
    if any(bool(leaf.count_nonzero()) for leaf in tree_leaves(d_inner)):
        warnings.warn(
            "mode='first_order' returned an all-zero hypergradient although the outer loss depends on "
            "phi*: the inner starting point does not depend on the outer parameters, so the first-order "
            "approximation drops phi*'s whole dependence on theta. Use mode='implicit' (or 'unrolled'), "
            "or start the inner solve from the outer parameters as MAML does", BilevelWarning,
            stacklevel=caller_stacklevel())


def _unrolled(problem: BilevelProblem, outer: PyTree, data: Any, init: PyTree | None,
              truncate: int | None) -> HypergradientResult:
    steps = problem.inner_steps
    objective = scalar_objective(problem.outer_objective, f"{type(problem).__name__}.outer_objective")

    def unrolled_loss(o: PyTree):
        if truncate is None:
            inner = _initial(problem, o, data, init)
            differentiated = steps
        else:
            with torch.no_grad():
                inner = tree_map(torch.Tensor.detach, _initial(problem, o, data, init))
                for _ in range(steps - truncate):
                    inner = problem.inner_update(inner, o, data)
            inner = tree_map(torch.Tensor.detach, inner)
            differentiated = truncate
        for _ in range(differentiated):
            inner = problem.inner_update(inner, o, data)
        return objective(inner, o, data), inner

    grad, (loss, inner) = torch.func.grad_and_value(unrolled_loss, has_aux=True)(outer)
    inner = tree_map(torch.Tensor.detach, inner)
    return HypergradientResult(grad, inner, loss.detach(), _residual(problem, inner, outer, data))
