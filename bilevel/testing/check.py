"""``check_hypergradient``: compare a hypergradient with independent references.

The checked hypergradient (by default the implicit one, with the given solver)
is compared, in float64, with:

``finite_differences``
    central differences ``(F(theta + h v) - F(theta - h v)) / 2h`` of the outer
    loss through a tightly solved inner problem (the problem's ``solve_inner``
    polished by Newton's method, :mod:`bilevel.testing.tight`), along every
    coordinate of ``theta`` (or random directions when there are many). The
    only reference that does not differentiate ``optimality()``: it catches a
    condition that misses a dependence on ``theta``.
``unrolled``
    reverse mode through ``k`` steps of ``inner_update`` started at the reference
    solution ``phi*``; when ``inner_update`` contracts (spectral radius ``rho < 1``
    of its Jacobian) this converges to the implicit hypergradient like ``rho^k``,
    and ``k`` is chosen from ``rho``. Skipped when ``inner_update`` does not
    contract (e.g. gradient descent on a saddle point).
``direct``
    the implicit hypergradient at ``phi*`` with a dense solve
    (:class:`bilevel.solvers.Direct`): isolates the adjoint linear solver.

Like ``torch.autograd.gradcheck``, a failed check raises ``AssertionError`` with
the full table (``raise_exception=False`` returns the report instead).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import bilevel
from bilevel.errors import BilevelError
from bilevel.problem import BilevelProblem
from bilevel.pytree import PyTree, ravel, tree_norm
from bilevel.solvers import CG, Direct, LinearSolver, SolveResult
from bilevel.testing.precision import cast
from bilevel.testing.report import Comparison, HypergradientReport
from bilevel.testing.roots import RootFunction
from bilevel.testing.tight import AtSolution, flat_jacobian, newton_polish, spectral_radius

__all__ = ["REFERENCES", "check_hypergradient", "solver_name"]

REFERENCES = ("finite_differences", "unrolled", "direct")


def solver_name(solver: Any) -> str:
    """``CG(rtol=1e-10)``: the class name with the options that differ from their defaults."""
    if solver is None:
        return "-"
    if not dataclasses.is_dataclass(solver):
        return type(solver).__name__
    changed = [f"{f.name}={getattr(solver, f.name)!r}" for f in dataclasses.fields(solver)
               if f.default is not dataclasses.MISSING and getattr(solver, f.name) != f.default]
    return f"{type(solver).__name__}({', '.join(changed)})"


@dataclasses.dataclass(frozen=True)
class _Checked:
    grad: PyTree
    inner: PyTree
    loss: float
    residual: float
    solve: SolveResult | None


def _norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def _compare(name: str, grad_vec: Tensor, ref_vec: Tensor, rtol: float, atol: float, *,
             enforced: bool = True, detail: str = "") -> Comparison:
    return Comparison(name, _norm(grad_vec - ref_vec), _norm(ref_vec), rtol, atol, enforced, detail)


def _skip(name: str, rtol: float, atol: float, why: str) -> Comparison:
    return Comparison(name, None, None, rtol, atol, False, why)


def _unroll_steps(radius: float, rtol: float, cap: int) -> tuple[int, bool]:
    """Steps for ``radius^k`` to fall well below ``rtol``; and whether ``cap`` allowed them."""
    if radius <= 0.0:
        return 2, True
    needed = int(math.ceil(math.log(1e-3 * rtol) / math.log(radius))) + 10
    return min(needed, cap), needed <= cap


def check_hypergradient(
    problem: BilevelProblem | Callable[..., PyTree],
    outer: PyTree,
    data: Any = None,
    *,
    outer_loss: Callable[..., Tensor] | None = None,
    optimality: Callable[..., PyTree] | None = None,
    mode: str = "implicit",
    solver: LinearSolver | None = None,
    truncate: int | None = None,
    references: Sequence[str] = REFERENCES,
    rtol: float = 1e-6,
    atol: float = 1e-10,
    residual_tol: float | None = 1e-8,
    eps: float = 1e-5,
    fd_max_coordinates: int = 16,
    fd_directions: int = 4,
    seed: int = 0,
    max_unrolled_steps: int = 3000,
    newton_steps: int = 8,
    newton_max_dim: int = 1024,
    dtype: torch.dtype | None = torch.float64,
    raise_exception: bool = True,
) -> HypergradientReport:
    """Check the hypergradient of ``problem`` at ``outer`` against independent references.

    Args:
        problem: a :class:`~bilevel.BilevelProblem`, or a function decorated with
            :func:`bilevel.implicit_root`, called as ``problem(outer, *args)`` with
            ``args = data`` (a tuple), ``(data,)`` or ``()`` for ``None``.
        outer, data: where to check, as for :func:`bilevel.hypergradient`.
        outer_loss: for a function only: ``outer_loss(phi, outer, *args)``, the scalar
            outer loss; the checked gradient is autograd through the function.
        optimality: for a function only: ``G(phi, outer, *args)``, needed for the
            Newton polish, the inner residual and the ``direct`` reference.
        mode, solver, truncate: what is checked (for a problem):
            ``bilevel.hypergradient(..., mode=mode, solver=solver)``; the default
            solver is ``CG(rtol=1e-10)`` (SPD ``d_phi G``; pass ``MINRES``/``GMRES``
            otherwise).
        references: any of ``"finite_differences"``, ``"unrolled"``, ``"direct"``.
        rtol, atol: a reference ``r`` agrees when ``||g - r|| <= atol + rtol ||r||``.
        residual_tol: bound on ``||G(phi, theta)||`` at the checked inner solution
            (``None``: not checked).
        eps: finite-difference step, scaled by ``max(1, max|theta|)``.
        fd_max_coordinates: probe every coordinate of ``theta`` up to this size, else
            ``fd_directions`` random unit directions (drawn with ``seed``).
        max_unrolled_steps: cap on the unrolled reference's steps; a capped reference
            that has not converged is shown but not enforced.
        newton_steps, newton_max_dim: Newton polish of the reference inner solution
            (dense Jacobian, so only up to ``newton_max_dim`` inner unknowns).
        dtype: cast the problem, ``outer`` and ``data`` to this dtype
            (:func:`bilevel.testing.cast`); ``None`` keeps them as they are.
        raise_exception: raise ``AssertionError`` with the report's table on failure.

    Returns:
        :class:`~bilevel.testing.HypergradientReport`.
    """
    unknown = sorted(set(references) - set(REFERENCES))
    if unknown:
        raise BilevelError(f"unknown references {unknown}; choose from {REFERENCES}")
    if dtype is not None:
        outer, data = cast(outer, dtype), cast(data, dtype)

    if isinstance(problem, BilevelProblem):
        if outer_loss is not None or optimality is not None:
            raise BilevelError("outer_loss= and optimality= are for implicit_root functions; a BilevelProblem "
                               "defines outer_objective() and optimality() itself")
        prob = cast(problem, dtype) if dtype is not None else problem
        name, has_condition, has_update = type(problem).__name__, True, True
        if mode == "implicit" and solver is None:
            solver = CG(rtol=1e-10)
        result = bilevel.hypergradient(prob, outer, data, solver=solver, mode=mode, truncate=truncate,
                                       on_failure="ignore")
        checked = _Checked(result.grad, result.inner, float(result.outer_loss), float(result.inner_residual),
                           result.solve)
        label, solver_label = mode, solver_name(solver)
    elif callable(problem):
        prob = RootFunction(problem, outer_loss, optimality)
        name, has_condition, has_update = prob.name, prob.has_optimality, False
        grad, inner, loss, solve = prob.differentiate(outer, data)
        residual = float(tree_norm(prob.optimality(inner, outer, data))) if has_condition else math.nan
        checked = _Checked(grad, inner, float(loss), residual, solve)
        label, solver_label = "implicit_root", solver_name(getattr(problem, "solver", None))
    else:
        raise BilevelError(f"check_hypergradient needs a BilevelProblem or an implicit_root function, "
                           f"got {type(problem).__name__}")

    grad_vec = ravel(checked.grad)[0].detach()
    inner_dim = ravel(checked.inner)[0].numel()
    can_polish = has_condition and inner_dim <= newton_max_dim

    def condition_at(o: PyTree) -> Callable[[PyTree], PyTree]:
        return lambda p: prob.optimality(p, o, data)

    def tight_solve(o: PyTree, start: PyTree) -> tuple[PyTree, float]:
        phi = prob.solve_inner(o, data, start)
        if can_polish:
            return newton_polish(condition_at(o), phi, steps=newton_steps)
        residual = _norm(ravel(prob.optimality(phi, o, data))[0]) if has_condition else math.nan
        return phi, residual

    with torch.no_grad():
        phi_ref, ref_residual = tight_solve(outer, checked.inner)
        jacobian = flat_jacobian(condition_at(outer), phi_ref) if can_polish else None

    comparisons, found = [], {}
    if "finite_differences" in references:
        fd, probed, detail, worst = _finite_differences(prob, outer, data, phi_ref, condition_at, jacobian, eps,
                                                        fd_max_coordinates, fd_directions, seed, newton_steps,
                                                        has_condition)
        if residual_tol is not None and worst > residual_tol:
            detail += f"; perturbed inner solves reached only ||G|| = {worst:.1e}"
        found["finite_differences"] = fd
        comparisons.append(_compare("finite_differences", probed @ grad_vec, fd, rtol, atol, detail=detail))
    if "unrolled" in references:
        if not has_update:
            comparisons.append(_skip("unrolled", rtol, atol, "a function has no inner_update"))
        elif inner_dim > newton_max_dim:
            comparisons.append(_skip("unrolled", rtol, atol, f"{inner_dim} inner unknowns > newton_max_dim"))
        else:
            radius = spectral_radius(lambda p: prob.inner_update(p, outer, data), phi_ref)
            if radius >= 1.0:
                comparisons.append(_skip(
                    "unrolled", rtol, atol,
                    f"inner_update does not contract at phi* (spectral radius {radius:.3g} >= 1)"))
            else:
                steps, converged = _unroll_steps(radius, rtol, max_unrolled_steps)
                ref = bilevel.hypergradient(AtSolution(prob, phi_ref, inner_steps=steps), outer, data,
                                            mode="unrolled", on_failure="ignore").grad
                found["unrolled"] = ref
                detail = f"{steps} steps, spectral radius {radius:.3g}"
                if not converged:
                    detail += " (too few steps to converge: not enforced)"
                comparisons.append(_compare("unrolled", grad_vec, ravel(ref)[0].detach(), rtol, atol,
                                            enforced=converged, detail=detail))
    if "direct" in references:
        if not has_condition:
            comparisons.append(_skip("direct", rtol, atol, "needs optimality="))
        else:
            ref = bilevel.hypergradient(AtSolution(prob, phi_ref), outer, data, solver=Direct(),
                                        on_failure="ignore").grad
            found["direct"] = ref
            comparisons.append(_compare("direct", grad_vec, ravel(ref)[0].detach(), rtol, atol,
                                        detail="dense solve at the reference phi*"))

    report = HypergradientReport(
        problem=name, mode=label, solver=solver_label, grad=checked.grad, outer_loss=checked.loss,
        inner_residual=checked.residual, reference_residual=ref_residual, residual_tol=residual_tol,
        solve=checked.solve, comparisons=tuple(comparisons), references=found)
    if raise_exception and not report.passed:
        raise AssertionError("\n" + report.table())
    return report


def _finite_differences(prob: BilevelProblem, outer: PyTree, data: Any, phi_ref: PyTree,
                        condition_at: Callable[[PyTree], Callable[[PyTree], PyTree]], jacobian: Tensor | None,
                        eps: float, max_coordinates: int, directions: int, seed: int,
                        newton_steps: int, has_condition: bool) -> tuple[Tensor, Tensor, str, float]:
    """Central differences of ``F`` along probe directions: ``(values, directions, detail, worst)``.

    Each perturbed inner problem is solved by chord-Newton steps from ``phi_ref`` with
    the reference ``jacobian``; without one, by the problem's ``solve_inner``.
    ``worst`` is the largest ``||G(phi, theta +- h v)||`` of those solves (``nan``
    without an optimality condition): where it is not small, neither is the
    differences' error.
    """
    theta, unravel = ravel(outer)
    theta = theta.detach()
    n = theta.numel()
    if n <= max_coordinates:
        probes = torch.eye(n, dtype=theta.dtype, device=theta.device)
        detail = f"{n} coordinate{'s' if n > 1 else ''}"
    else:
        g = torch.Generator().manual_seed(seed)
        probes = torch.randn(directions, n, generator=g, dtype=torch.float64).to(theta)
        probes = probes / torch.linalg.vector_norm(probes, dim=-1, keepdim=True)
        detail = f"{directions} random directions"
    h = eps * max(1.0, float(theta.abs().max())) if n else eps

    residuals: list[float] = []

    def loss_at(t: Tensor) -> float:
        o = unravel(t)
        with torch.no_grad():
            if jacobian is not None:
                phi, residual = newton_polish(condition_at(o), phi_ref, steps=newton_steps, jacobian=jacobian)
            else:
                phi = prob.solve_inner(o, data, phi_ref)
                residual = _norm(ravel(condition_at(o)(phi))[0]) if has_condition else math.nan
            residuals.append(residual)
            return float(prob.outer_objective(phi, o, data))

    values = [(loss_at(theta + h * v) - loss_at(theta - h * v)) / (2 * h) for v in probes]
    worst = max(residuals, default=math.nan) if has_condition else math.nan
    return (torch.tensor(values, dtype=theta.dtype, device=theta.device), probes, f"{detail}, step {h:.1e}",
            worst)
