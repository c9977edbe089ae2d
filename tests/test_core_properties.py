"""Properties of bilevel.hypergradient and implicit_root over problem families with known hypergradients.

Every family of bilevel.testing.strategies (ridge with per-feature L2, quadratic
with chosen conditioning, logistic regression, a contraction fixed point, a
saddle point) against its closed form, in every mode and with every adjoint
solver that fits the structure of d_phi G; float64 to 1e-8, float32 to 1e-4;
implicit, unrolled and finite differences agree (check_hypergradient); vmap over
a batch of problems equals a loop.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel
from bilevel import solvers
from bilevel.testing import check_hypergradient
from bilevel.testing import strategies as bst
from bilevel.testing.families import ProblemCase, stack_data

FAMILIES = ("ridge", "quadratic", "logistic", "contraction", "saddle")


def _available(*names: str) -> list[str]:
    return [n for n in names if hasattr(solvers, n)]


# Solvers that fit each structure of d_phi G (the adjoint operator is its transpose).
SOLVERS_FOR = {
    "spd": _available("CG", "MINRES", "GMRES", "BiCGSTAB", "Neumann", "Direct"),
    "symmetric_indefinite": _available("MINRES", "GMRES", "Direct"),
    "nonsymmetric": _available("GMRES", "BiCGSTAB", "Neumann", "Direct"),
}
STRUCTURE = {"ridge": "spd", "quadratic": "spd", "logistic": "spd", "contraction": "nonsymmetric",
             "saddle": "symmetric_indefinite"}
FAMILY_SOLVER = [(f, s) for f in FAMILIES for s in SOLVERS_FOR[STRUCTURE[f]]]


def make_solver(name: str, case: ProblemCase, rtol: float):
    cls = getattr(solvers, name)
    if name == "Direct":
        return cls()
    if name == "Neumann":  # the inner step size makes I - alpha A a contraction for every family
        return cls(alpha=case.problem.inner_lr, rtol=rtol, maxiter=5000)
    return cls(rtol=rtol)


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got = got.to(torch.float64)
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


def family_cases(family: str, dtype: torch.dtype = torch.float64, *, conditions=(1.0, 10.0, 100.0)):
    if family == "quadratic":
        return bst.quadratic_problems(conditions=conditions, dtype=dtype)
    return bst.problems(families=(family,), dtype=dtype)


@pytest.mark.parametrize("family,solver", FAMILY_SOLVER)
@settings(max_examples=6)
@given(data=st.data())
def test_implicit_matches_closed_form_float64(family, solver, data):
    conditions = (1.0, 10.0) if solver == "Neumann" else (1.0, 10.0, 100.0)  # Neumann: rate (k-1)/(k+1)
    case = data.draw(family_cases(family, conditions=conditions), label="case")
    result = bilevel.hypergradient(case.problem, case.outer, case.data, solver=make_solver(solver, case, 1e-12),
                                   on_failure="raise")
    assert rel_error(result.grad, case.expected()) <= 1e-8


@pytest.mark.parametrize("family,solver", FAMILY_SOLVER)
@settings(max_examples=4)
@given(data=st.data())
def test_implicit_matches_closed_form_float32(family, solver, data):
    case = data.draw(family_cases(family, torch.float32, conditions=(1.0, 10.0)), label="case")
    result = bilevel.hypergradient(case.problem, case.outer, case.data, solver=make_solver(solver, case, 1e-6),
                                   on_failure="ignore")
    assert result.grad.dtype == torch.float32
    assert rel_error(result.grad, case.expected()) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=5)
@given(data=st.data())
def test_unrolled_converges_to_closed_form(family, data):
    """Reverse mode through inner_steps contracting steps (rate^steps ~ 1e-14) is the implicit gradient."""
    case = data.draw(family_cases(family, conditions=(1.0, 10.0)), label="case")
    result = bilevel.hypergradient(case.problem, case.outer, case.data, mode="unrolled", on_failure="raise")
    assert rel_error(result.grad, case.expected()) <= 1e-8


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4)
@given(data=st.data())
def test_truncated_after_convergence_matches_closed_form(family, data):
    """Truncated backprop (Shaban et al.) differentiating the last k steps after convergence: error ~ rate^k."""
    case = data.draw(family_cases(family, conditions=(1.0, 10.0)), label="case")
    steps = case.problem.inner_steps
    case.problem.inner_steps = 2 * steps
    result = bilevel.hypergradient(case.problem, case.outer, case.data, mode="truncated", truncate=steps,
                                   on_failure="raise")
    assert rel_error(result.grad, case.expected()) <= 1e-8


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4)
@given(data=st.data())
def test_first_order_is_the_direct_term(family, data):
    """With a constant initialization, first-order = d_theta f at phi* (the implicit term dropped)."""
    case = data.draw(family_cases(family), label="case")
    zero = family in ("ridge", "logistic")  # f does not depend on theta directly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bilevel.hypergradient(case.problem, case.outer, case.data, mode="first_order", on_failure="raise")
    # Said exactly when the result is all zero (f depends on phi in every family).
    warned = any(issubclass(w.category, bilevel.BilevelWarning) for w in caught)
    assert warned == (float(result.grad.abs().max()) == 0.0)
    phi = case.problem.solve_inner(case.outer, case.data, case.problem.initial_inner(case.outer, case.data))
    direct = torch.func.grad(case.problem.outer_objective, argnums=1)(phi, case.outer, case.data)
    torch.testing.assert_close(result.grad, direct, rtol=1e-10, atol=1e-12)
    if zero:
        assert float(result.grad.abs().max()) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=3)
@given(data=st.data())
def test_implicit_unrolled_and_finite_differences_agree(family, data):
    """check_hypergradient passes on every family with a solver that fits it."""
    case = data.draw(family_cases(family, conditions=(1.0, 10.0)), label="case")
    solver = make_solver(SOLVERS_FOR[case.structure][0], case, 1e-12)
    report = check_hypergradient(case.problem, case.outer, case.data, solver=solver, rtol=1e-7)
    assert report.comparison("finite_differences").rel_error <= 1e-7
    assert report.comparison("unrolled").rel_error <= 1e-8
    assert report.comparison("direct").rel_error <= 1e-8


@pytest.mark.parametrize("family,mode", [(f, m) for f in FAMILIES for m in ("implicit", "unrolled")])
@settings(max_examples=3)
@given(data=st.data())
def test_vmap_over_a_batch_of_problems_equals_a_loop(family, mode, data):
    options = {"conditions": (1.0, 10.0)} if family == "quadratic" else {}
    cases = data.draw(bst.problem_batches(family, max_size=3, **options), label="cases")
    problem, outer = cases[0].problem, cases[0].outer
    problem.inner_lr = min(c.problem.inner_lr for c in cases)  # one step size that contracts for all
    solver = make_solver(SOLVERS_FOR[cases[0].structure][0], cases[0], 1e-12) if mode == "implicit" else None

    def grad(task_data):
        return bilevel.hypergradient(problem, outer, task_data, solver=solver, mode=mode, on_failure="ignore").grad

    batched = torch.func.vmap(grad)(stack_data(cases))
    looped = torch.stack([grad(c.data) for c in cases])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)
    if mode == "implicit":  # unrolled with the shared step size need not have converged
        for row, case in zip(batched, cases):
            assert rel_error(row, case.expected()) <= 1e-8


OPERATOR_SOLVERS = {
    "spd": _available("CG", "MINRES", "GMRES", "Direct"),
    "indefinite": _available("MINRES", "GMRES", "Direct"),
    "nonsymmetric": _available("GMRES", "Direct"),
}


@pytest.mark.parametrize("kind,solver", [(k, s) for k, ss in OPERATOR_SOLVERS.items() for s in ss])
@settings(max_examples=6)
@given(op=st.data())
def test_implicit_root_through_a_linear_system(kind, solver, op):
    """phi* = A^{-1} theta, loss = |phi*|^2 / 2: the gradient is A^{-T} phi*, for each operator kind."""
    case = op.draw(bst.linear_operators(kinds=(kind,), conditions=(1.0, 10.0)), label="operator")
    A = case.matrix
    chosen = getattr(solvers, solver)
    solve_with = chosen() if solver == "Direct" else chosen(rtol=1e-12, maxiter=500)

    @bilevel.implicit_root(lambda phi, theta: case.matvec(phi) - theta, solver=solve_with, on_failure="raise")
    def linear(theta):
        return torch.linalg.solve(A, theta)

    theta = torch.linspace(-1.0, 1.0, A.shape[0], dtype=A.dtype)
    grad = torch.func.grad(lambda t: linear(t).pow(2).sum() / 2)(theta)
    expected = torch.linalg.solve(A.T, torch.linalg.solve(A, theta))
    assert rel_error(grad, expected) <= 1e-8
