"""The fair primal-dual problem: a unique smooth saddle point, and its implicit meta-gradient.

References: finite differences of F(theta, lambda0) and a dense solve of the
adjoint system (bilevel.testing.check_hypergradient); the closed-form dual best
response; CG's negative-curvature report on the indefinite saddle-point Jacobian.
"""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.problems.fair.data import halves, synthetic_tasks
from bilevel.problems.fair.metrics import parity_gap
from bilevel.problems.fair.model import fairness_gap, init_params
from bilevel.problems.fair.problem import FairMetaProblem
from bilevel.pytree import ravel, tree_norm
from bilevel.solvers import CG, GMRES, MINRES, Direct, Status
from bilevel.testing import check_hypergradient
from bilevel.testing.tight import flat_jacobian


def small_task(seed: int = 0) -> dict[str, torch.Tensor]:
    return halves(synthetic_tasks(1, n=20, dim=4, seed=seed)[0])


def outer_point(d: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    theta = init_params(d)
    theta["w"] = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    return {"theta": theta, "lambda0": torch.tensor(0.7, dtype=torch.float64)}


# the constraint active (c small) and inactive (c large) at the saddle point
PROBLEMS = [FairMetaProblem(c=0.01, inner_steps=50, inner_tol=1e-12, outer_fair_weight=0.5),
            FairMetaProblem(c=5.0, inner_steps=50, inner_tol=1e-12)]


# PDFM's probability form (not convex): PDFM's sharpness, a sharper one, and a weak prox with a large multiplier
DP_PROBLEMS = [FairMetaProblem(c=0.01, constraint="dp", inner_steps=50, inner_tol=1e-12, outer_fair_weight=0.5),
               FairMetaProblem(c=0.01, constraint="dp", sharpness=4.0, inner_steps=50, inner_tol=1e-12,
                               outer_fair_weight=0.5),
               FairMetaProblem(c=0.0, constraint="dp", sharpness=4.0, prox=0.05, inner_steps=50, inner_tol=1e-12)]


@pytest.mark.parametrize("problem", PROBLEMS + DP_PROBLEMS, ids=["active", "inactive", "dp", "dp-k4", "dp-weak-prox"])
@pytest.mark.parametrize("solver", [MINRES(rtol=1e-12), GMRES(rtol=1e-12)], ids=["minres", "gmres"])
def test_meta_gradient_matches_finite_differences(problem, solver):
    report = check_hypergradient(problem, outer_point(), small_task(), solver=solver,
                                 references=("finite_differences", "direct"), rtol=1e-5, eps=1e-5)
    assert report.passed
    grad = report.grad
    assert float(grad["lambda0"].abs()) > 0 or problem.c > 1  # lambda0 matters when the constraint binds


def test_saddle_point_is_a_root_with_symmetric_indefinite_jacobian():
    problem, outer, data = PROBLEMS[0], outer_point(), small_task()
    inner = problem.solve_inner(outer, data, problem.initial_inner(outer, data))
    assert float(tree_norm(problem.optimality(inner, outer, data))) < 1e-10
    jac = flat_jacobian(lambda p: problem.optimality(p, outer, data), inner)
    torch.testing.assert_close(jac, jac.T, atol=1e-10, rtol=0)
    eig = torch.linalg.eigvalsh(jac)
    assert eig.min() < 0 < eig.max()  # indefinite: exactly one negative eigenvalue (the dual)
    assert int((eig < 0).sum()) == 1


def test_cg_reports_negative_curvature_instead_of_a_wrong_answer():
    problem, outer, data = PROBLEMS[0], outer_point(), small_task()
    result = bilevel.hypergradient(problem, outer, data, solver=CG(), on_failure="ignore")
    assert int(result.solve.status) == Status.NEGATIVE_CURVATURE
    assert not bool(result.solve.converged)
    with pytest.raises(bilevel.ConvergenceError, match="NEGATIVE_CURVATURE"):
        bilevel.hypergradient(problem, outer, data, solver=CG(), on_failure="raise")


def test_best_response_maximizes_the_lagrangian_and_tends_to_the_projected_step():
    outer, data = outer_point(), small_task()
    for problem in PROBLEMS:
        model = outer["theta"]
        rho = problem.best_rho(model, outer, data)
        grad_rho = problem.optimality({"model": model, "rho": rho}, outer, data)["rho"]
        assert abs(float(grad_rho)) < 1e-12
        for shift in (-0.1, 0.1):  # a maximum, not a minimum
            shifted = problem.lagrangian({"model": model, "rho": rho + shift}, outer, data)
            assert shifted < problem.lagrangian({"model": model, "rho": rho}, outer, data)
    tiny = FairMetaProblem(c=0.01, barrier=1e-12)
    h = tiny.violation(outer["theta"], data["xs"], data["zs"])
    lam = torch.exp(tiny.best_rho(outer["theta"], outer, data))
    torch.testing.assert_close(lam, torch.relu(outer["lambda0"] + h / tiny.mu), atol=1e-9, rtol=0)


def test_vmapped_meta_batch_matches_task_by_task():
    problem, outer = FairMetaProblem(c=0.01, inner_steps=30), outer_point()
    tasks = [small_task(seed) for seed in range(3)]
    batch = {k: torch.stack([t[k] for t in tasks]) for k in tasks[0]}
    solver = MINRES(rtol=1e-10, maxiter=20)
    batched = torch.func.vmap(lambda d: bilevel.hypergradient(problem, outer, d, solver=solver))(batch)
    bilevel.check_result(batched, on_failure="raise", residual_tol=problem.residual_tol)
    for i, task in enumerate(tasks):
        single = bilevel.hypergradient(problem, outer, task, solver=Direct(), on_failure="raise")
        row = bilevel.pytree.tree_map(lambda t: t[i], batched.grad)
        torch.testing.assert_close(ravel(single.grad)[0], ravel(row)[0], atol=1e-8, rtol=1e-6)


def test_rejects_parameters_that_break_uniqueness():
    with pytest.raises(ValueError, match="prox must be > 0"):
        FairMetaProblem(prox=0.0)
    with pytest.raises(ValueError, match="barrier must be > 0"):
        FairMetaProblem(barrier=0.0)
    with pytest.raises(ValueError, match="--newton-steps"):
        FairMetaProblem(inner_steps=0)


def test_task_constraint_set_uses_query_inputs_but_never_query_labels():
    outer, data = outer_point(), small_task()
    problem = FairMetaProblem(c=0.0, constraint_set="task", inner_steps=50, inner_tol=1e-12)

    def adapted(d):
        return problem.solve_inner(outer, d, problem.initial_inner(outer, d))["model"]

    base = adapted(data)
    flipped = adapted({**data, "yq": 1 - data["yq"]})
    torch.testing.assert_close(base, flipped, rtol=0, atol=0)
    support_only = FairMetaProblem(c=0.0, inner_steps=50, inner_tol=1e-12)
    other = support_only.solve_inner(outer, data, support_only.initial_inner(outer, data))["model"]
    assert float((base["w"] - other["w"]).abs().max()) > 1e-4  # the query inputs do enter the constraint


def test_task_constraint_set_meta_gradient_matches_finite_differences():
    problem = FairMetaProblem(c=0.01, constraint_set="task", inner_steps=50, inner_tol=1e-12,
                              outer_fair_weight=0.5)
    report = check_hypergradient(problem, outer_point(), small_task(), solver=MINRES(rtol=1e-12),
                                 references=("finite_differences", "direct"), rtol=1e-5, eps=1e-5)
    assert report.passed


def test_unknown_constraint_set_is_rejected():
    with pytest.raises(ValueError, match="unknown constraint_set 'query'"):
        FairMetaProblem(constraint_set="query")


def test_both_constraints_are_in_parity_gap_units():
    data, model = small_task(), outer_point()["theta"]
    x, z = data["xs"], data["zs"]
    s = x @ model["w"] + model["b"]
    group = lambda v: v[z == 1].mean() - v[z == 0].mean()  # noqa: E731
    torch.testing.assert_close(fairness_gap(model, x, z, "dbc"), group(s / 4))
    torch.testing.assert_close(fairness_gap(model, x, z, "dp"), group(torch.sigmoid(s)))
    sharp = fairness_gap(model, x, z, "dp", sharpness=1e4).abs()  # tends to the hard parity gap
    torch.testing.assert_close(sharp, parity_gap(s, z), atol=1e-3, rtol=0)
    assert float(fairness_gap(model, x, torch.zeros_like(z), "dp")) == 0.0  # one group: no gap, not NaN


def schur_min_eigenvalue(problem, inner, outer, data) -> float:
    """The reference: P's Hessian from the full saddle-point Jacobian, eliminated by hand."""
    jac = flat_jacobian(lambda p: problem.optimality(p, outer, data), inner)
    schur = jac[:-1, :-1] - torch.outer(jac[:-1, -1], jac[-1, :-1]) / jac[-1, -1]
    return float(torch.linalg.eigvalsh(schur)[0])


def test_curvature_detects_an_indefinite_dp_system_and_never_flags_dbc():
    data = small_task()
    w = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outer = {"theta": {"w": 0.3 * w, "b": torch.zeros((), dtype=torch.float64)},
             "lambda0": torch.tensor(10.0, dtype=torch.float64)}
    dp = FairMetaProblem(c=0.0, constraint="dp", sharpness=4.0, prox=1e-2, mu=1e-3)
    dbc = FairMetaProblem(c=0.0, prox=1e-2, mu=1e-3)
    for problem in (dp, dbc):
        inner = problem.initial_inner(outer, data)
        curvature = float(problem.curvature(inner, outer, data))
        assert curvature == pytest.approx(schur_min_eigenvalue(problem, inner, outer, data), rel=1e-8)
        assert (curvature < 0) if problem is dp else (curvature >= problem.prox)
    # from that indefinite start, the modified Newton solve still reaches a root with positive curvature
    solved = dp.solve_inner(outer, data, dp.initial_inner(outer, data))
    assert float(tree_norm(dp.optimality(solved, outer, data))) < 1e-9
    assert float(dp.curvature(solved, outer, data)) > 0


def test_unknown_constraint_and_bad_sharpness_are_rejected():
    with pytest.raises(ValueError, match="unknown constraint 'eo'"):
        FairMetaProblem(constraint="eo")
    with pytest.raises(ValueError, match="sharpness must be > 0"):
        FairMetaProblem(constraint="dp", sharpness=0.0)
