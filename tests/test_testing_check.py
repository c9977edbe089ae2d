"""check_hypergradient catches deliberately wrong hypergradients, names the cause, and passes right ones."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel
from bilevel import BilevelError, BilevelProblem
from bilevel.solvers import CG, MINRES, Direct
from bilevel.testing import HypergradientReport, cast, check_hypergradient, double, property_check
from bilevel.testing import strategies as bst
from bilevel.testing.families import (QuadraticProblem, RidgeProblem, SaddleProblem, contraction_case,
                                      quadratic_case, ridge_case, saddle_case)

RIDGE = ridge_case(features=3, samples=5, seed=1, outer=[0.1, -0.5, 0.3])


def ridge_like(cls: type) -> BilevelProblem:
    problem = cls()
    problem.inner_lr, problem.inner_steps = RIDGE.problem.inner_lr, RIDGE.problem.inner_steps
    return problem


def check(problem, case=RIDGE, **options) -> HypergradientReport:
    return check_hypergradient(problem, case.outer, case.data, raise_exception=False, **options)


@pytest.mark.parametrize("case,solver", [
    (RIDGE, None),
    (quadratic_case(4, 2, 10.0, 2, [0.3, -0.2]), None),
    (contraction_case(4, 2, 0.7, 3, [0.2, 0.1]), Direct()),
    (saddle_case(3, 2, 2, 1, [0.5, -0.5]), MINRES(rtol=1e-12)),
])
def test_right_hypergradients_pass_every_reference(case, solver):
    report = check_hypergradient(case.problem, case.outer, case.data, solver=solver)
    assert report.passed and report.residual_ok
    for name in ("finite_differences", "unrolled", "direct"):
        assert report.comparison(name).rel_error <= 1e-8
    torch.testing.assert_close(report.grad, case.expected())
    assert "passed" in str(report) and "FAIL" not in str(report)


class DetachedRegularizer(RidgeProblem):
    """Missing term: theta is detached in the inner objective, so d_theta G = 0."""

    def inner_objective(self, w, theta, data):
        return super().inner_objective(w, theta.detach(), data)


def test_missing_indirect_term_is_caught_by_finite_differences_only():
    report = check(ridge_like(DetachedRegularizer))
    assert not report.passed
    assert not report.comparison("finite_differences").passed
    assert report.comparison("finite_differences").rel_error == pytest.approx(1.0)  # the whole gradient is missing
    assert report.comparison("direct").within_tolerance  # self-consistent: same wrong linearization
    assert report.comparison("unrolled").within_tolerance
    assert any("misses a dependence on the outer parameters" in h for h in report.hints())
    with pytest.raises(AssertionError, match=r"finite_differences\s+1\.00e\+00\s+1\.0e-06\s+FAIL"):
        check_hypergradient(ridge_like(DetachedRegularizer), RIDGE.outer, RIDGE.data)


class DetachedDirectTerm(QuadraticProblem):
    """Missing term: the outer loss's direct dependence theta^T Q theta / 2 is held constant."""

    def outer_objective(self, phi, theta, data):
        held = theta.detach()
        return super().outer_objective(phi, theta, data) - theta @ data["Q"] @ theta / 2 + held @ data["Q"] @ held / 2


def test_missing_direct_term_is_caught():
    case = quadratic_case(3, 2, 10.0, 0, [0.5, -0.4])
    problem = DetachedDirectTerm()
    problem.inner_lr, problem.inner_steps = case.problem.inner_lr, case.problem.inner_steps
    report = check(problem, case)
    assert not report.comparison("finite_differences").passed
    wrong_by = float(torch.linalg.vector_norm(case.data["Q"] @ case.outer))
    assert report.comparison("finite_differences").abs_error == pytest.approx(wrong_by, rel=1e-6)


class ShiftedOptimality(RidgeProblem):
    """Perturbed optimality condition: not the gradient of the objective solve_inner minimizes."""

    def optimality(self, w, theta, data):
        return super().optimality(w, theta, data) + 0.05 * w


def test_perturbed_optimality_condition_is_caught_by_the_inner_residual():
    report = check(ridge_like(ShiftedOptimality))
    assert not report.residual_ok and not report.passed
    assert report.inner_residual > 1e-3
    assert report.reference_residual < 1e-12  # Newton finds the root of the condition as written
    assert "inner residual" in report.failures()[0]
    assert "not a root of the optimality condition" in report.table()


class EarlyStopped(RidgeProblem):
    """Inner solver stopped too early: 3 gradient steps instead of the closed form."""

    solve_inner = BilevelProblem.solve_inner


def test_inner_solver_stopped_too_early_is_caught():
    problem = EarlyStopped()
    problem.inner_lr, problem.inner_steps = RIDGE.problem.inner_lr, 3
    report = check(problem)
    assert not report.passed and not report.residual_ok
    assert not report.comparison("finite_differences").passed
    assert "solve_inner stops too early" in report.table()
    assert "perturbed inner solves" not in report.comparison("finite_differences").detail  # Newton-polished
    unpolished = check(problem, newton_max_dim=0)  # the perturbed problems go to the same early stop
    assert "perturbed inner solves reached only ||G|| = " in unpolished.comparison("finite_differences").detail
    problem.inner_steps, problem.inner_tol = 200, 1e-10  # converged: the same solver passes
    assert check(problem).passed
    assert "perturbed" not in check(problem, newton_max_dim=0).comparison("finite_differences").detail


def test_adjoint_solver_stopped_too_early_is_caught():
    report = check(RIDGE.problem, solver=CG(maxiter=1))
    assert not report.comparison("direct").passed
    assert "MAX_ITERATIONS" in report.table()
    assert any("adjoint solve did not converge" in h for h in report.hints())


def test_solver_that_does_not_fit_the_structure_is_caught():
    case = saddle_case(3, 2, 2, 1, [0.5, -0.5])
    report = check(case.problem, case, solver=CG(rtol=1e-10))  # CG on a symmetric indefinite Jacobian
    assert not report.comparison("direct").passed
    assert "NEGATIVE_CURVATURE" in report.table()
    assert check(case.problem, case, solver=MINRES(rtol=1e-12)).passed


class WrongUpdate(RidgeProblem):
    """inner_update whose fixed points are not the roots of optimality()."""

    def inner_update(self, w, theta, data):
        return w - self.inner_lr * (self.optimality(w, theta, data) + 0.05 * w)


def test_inconsistent_inner_update_is_caught_by_unrolling():
    report = check(ridge_like(WrongUpdate))
    assert not report.comparison("unrolled").passed
    assert report.comparison("finite_differences").passed and report.comparison("direct").passed
    assert any("inner_update" in h for h in report.hints())


def test_unrolled_mode_with_too_few_steps_is_caught():
    problem = ridge_like(RidgeProblem)
    problem.inner_steps = 2
    report = check(problem, mode="unrolled")
    assert report.mode == "unrolled" and report.solve is None
    assert not report.comparison("finite_differences").passed


class GradientDescentSaddle(SaddleProblem):
    """Plain gradient descent on a saddle point diverges: the unrolled reference must be skipped."""

    inner_update = BilevelProblem.inner_update


def test_unrolled_reference_skipped_when_inner_update_does_not_contract():
    case = saddle_case(3, 2, 2, 1, [0.5, -0.5])
    problem = GradientDescentSaddle()
    problem.inner_lr = case.problem.inner_lr
    report = check(problem, case, solver=MINRES(rtol=1e-12))
    unrolled = report.comparison("unrolled")
    assert unrolled.skipped and report.passed
    assert "does not contract" in unrolled.detail and "skipped" in report.table()


def test_unrolled_reference_not_enforced_when_capped():
    report = check(RIDGE.problem, max_unrolled_steps=3)
    assert not report.comparison("unrolled").enforced
    assert "not enforced" in report.comparison("unrolled").detail


def test_many_outer_coordinates_use_random_directions():
    case = ridge_case(features=6, samples=8, seed=0, outer=[0.1] * 6)
    report = check_hypergradient(case.problem, case.outer, case.data, fd_max_coordinates=4, fd_directions=3)
    assert "3 random directions" in report.comparison("finite_differences").detail
    assert report.references["finite_differences"].shape == (3,)


def ridge_optimality(w, lam, X, y):
    return X.T @ (X @ w - y) / X.shape[0] + lam.exp() * w


def validation_loss(w, lam, X, y):
    return (X @ w - y).pow(2).mean() / 2 + lam.pow(2).sum() / 2


def test_implicit_root_function_is_checked():
    @bilevel.implicit_root(ridge_optimality, solver=CG(rtol=1e-12))
    def ridge(lam, X, y):
        return torch.linalg.solve(X.T @ X / X.shape[0] + torch.diag(lam.exp()), X.T @ y / X.shape[0])

    X, y = RIDGE.data["X"], RIDGE.data["y"]
    report = check_hypergradient(ridge, RIDGE.outer, (X, y), outer_loss=validation_loss, optimality=ridge_optimality)
    assert report.mode == "implicit_root" and report.problem.endswith("ridge")
    assert report.comparison("direct").rel_error <= 1e-8
    assert report.comparison("unrolled").skipped
    assert report.solve is not None and bool(report.solve.converged.all())

    # The decorated function carries its optimality condition: no need to pass it again.
    implied = check_hypergradient(ridge, RIDGE.outer, (X, y), outer_loss=validation_loss)
    assert implied.comparison("direct").rel_error <= 1e-8 and implied.inner_residual < 1e-8

    def wrapped(lam, X, y):  # hides the condition: the direct reference cannot run
        return ridge(lam, X, y)

    without = check_hypergradient(wrapped, RIDGE.outer, (X, y), outer_loss=validation_loss)
    assert without.comparison("direct").skipped and math.isnan(without.inner_residual)
    assert without.comparison("finite_differences").rel_error <= 1e-6


def test_implicit_root_with_a_missing_term_is_caught():
    detached = lambda w, lam, X, y: ridge_optimality(w, lam.detach(), X, y)  # noqa: E731

    @bilevel.implicit_root(detached)
    def ridge(lam, X, y):
        return torch.linalg.solve(X.T @ X / X.shape[0] + torch.diag(lam.exp()), X.T @ y / X.shape[0])

    with pytest.raises(AssertionError, match="finite_differences"):
        check_hypergradient(ridge, RIDGE.outer, (RIDGE.data["X"], RIDGE.data["y"]), outer_loss=validation_loss,
                            optimality=detached)


def test_inputs_are_cast_to_float64():
    case32 = RIDGE.to(torch.float32)
    report = check_hypergradient(case32.problem, case32.outer, case32.data)
    assert report.grad.dtype == torch.float64
    assert report.comparison("finite_differences").rel_error <= 1e-8


def test_cast_copies_problem_attributes_and_keeps_integer_tensors():
    class Stored(BilevelProblem):
        def __init__(self):
            self.X = torch.ones(2, 2)
            self.labels = torch.tensor([0, 1])
            self.arrays = {"w": torch.zeros(2)}

    original = Stored()
    copy64 = double(original)
    assert copy64.X.dtype == torch.float64 and copy64.arrays["w"].dtype == torch.float64
    assert copy64.labels.dtype == torch.int64
    assert original.X.dtype == torch.float32  # the user's problem is left alone
    assert cast((torch.ones(1), 3, None), torch.float16)[0].dtype == torch.float16


def test_bad_arguments_are_named():
    with pytest.raises(BilevelError, match="unknown references"):
        check(RIDGE.problem, references=("finite_differences", "adjoint"))
    with pytest.raises(BilevelError, match="implicit_root functions"):
        check(RIDGE.problem, outer_loss=validation_loss)
    with pytest.raises(BilevelError, match="needs a BilevelProblem"):
        check_hypergradient(3, RIDGE.outer)
    with pytest.raises(BilevelError, match="outer_loss="):
        check_hypergradient(lambda t: t, RIDGE.outer)


def test_property_check_passes_on_a_right_problem_and_reports_a_failure():
    fast = {"references": ("finite_differences", "direct")}
    property_check(RIDGE.problem, bst.outer_points(3), RIDGE.data, max_examples=3, **fast)
    with pytest.raises(AssertionError, match="misses a dependence") as info:
        property_check(ridge_like(DetachedRegularizer), bst.outer_points(3), RIDGE.data, max_examples=3,
                       shrink=False, **fast)
    assert "finite_differences" in str(info.value)


def test_the_worked_example_in_the_docs_runs(capsys):
    """docs/checking.md: its Python blocks run in order, and print what the page shows."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "checking.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    exec(compile("\n".join(blocks), "docs/checking.md", "exec"), {"__name__": "checking_md"})
    out = capsys.readouterr().out
    assert "hypergradient check of PerFeatureRidge (mode=implicit, solver=CG(rtol=1e-10)): passed" in out
    assert re.search(r"finite_differences\s+1\.00e\+00\s+1\.0e-06\s+FAIL", out)
