"""Baselines in the fair harness: iMAML (implicit, CG), PDFM (first-order primal-dual, as published)."""

from __future__ import annotations

import torch

import bilevel
from bilevel.problems.fair.baselines import (PDFMProblem, ProxLogisticProblem, dbc_bound, pdfm_dual_step,
                                            probability_dbc)
from bilevel.problems.fair.model import bce
from bilevel.solvers import CG
from bilevel.testing import check_hypergradient

from bilevel.problems.fair.data import halves, synthetic_tasks
from bilevel.problems.fair.model import init_params


def small_task() -> dict[str, torch.Tensor]:
    return halves(synthetic_tasks(1, n=20, dim=4)[0])


def outer_point() -> dict:
    theta = init_params(4)
    theta["w"] = 0.3 * torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return {"theta": theta, "lambda0": torch.tensor(0.7, dtype=torch.float64)}


def test_imaml_meta_gradient_matches_finite_differences_with_cg():
    problem = ProxLogisticProblem(prox=1.0, inner_steps=2000, inner_tol=1e-12)
    report = check_hypergradient(problem, outer_point(), small_task(), solver=CG(rtol=1e-12),
                                 references=("finite_differences", "direct"), rtol=1e-5)
    assert report.passed and int(report.solve.status) == 0
    assert float(report.grad["lambda0"]) == 0.0  # the unconstrained method ignores the dual centre


def test_pdfm_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_model():
    problem, outer, data = PDFMProblem(c=0.01), outer_point(), small_task()
    result = bilevel.hypergradient(problem, outer, data, mode="first_order")
    adapted = problem.solve_inner(outer, data, problem.initial_inner(outer, data))
    expected = torch.func.grad(lambda m: bce(m, data["xq"], data["yq"]))(adapted)
    torch.testing.assert_close(result.grad["theta"], expected)


def test_pdfm_dual_steps_are_projected_ascent():
    outer, data = outer_point(), small_task()
    outer = {**outer, "lambda0": torch.tensor(0.0, dtype=torch.float64)}
    assert probability_dbc(outer["theta"], data["xs"], data["zs"]) > 0  # the constraint c = 0 is violated
    strict = PDFMProblem(c=0.0, pd_updates=2, inner_steps=1, inner_lr=0.0)
    adapted = strict.solve_inner(outer, data, strict.initial_inner(outer, data))
    torch.testing.assert_close(adapted["w"], outer["theta"]["w"])  # lr 0: the primal never moves
    dual = pdfm_dual_step(torch.tensor(0.2), torch.tensor([0.1, 0.3]), bound=0.05, meta_dual_lr=0.5)
    torch.testing.assert_close(dual, torch.tensor(0.2 + 0.5 * (0.05 + 0.25)))
    torch.testing.assert_close(pdfm_dual_step(torch.tensor(0.01), torch.tensor([0.0]), bound=0.5, meta_dual_lr=1.0),
                               torch.tensor(0.0))  # projected onto lambda >= 0


def test_pdfm_bound_is_in_gap_units():
    """|DBC_p| <= c zbar (1 - zbar) is exactly the soft parity gap |mean_1 p - mean_0 p| <= c."""
    outer, data = outer_point(), small_task()
    x, z = data["xs"], torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.float64)
    p = torch.sigmoid(x @ outer["theta"]["w"] + outer["theta"]["b"])
    soft = (p[z == 1].mean() - p[z == 0].mean()).abs()
    zbar = z.mean()
    torch.testing.assert_close(probability_dbc(outer["theta"], x, z) / (zbar * (1 - zbar)), soft)
    torch.testing.assert_close(dbc_bound(0.2, z), 0.2 * 0.3 * 0.7 * torch.ones((), dtype=torch.float64))


def test_pdfm_task_constraint_set_sees_query_inputs_only():
    outer, data = outer_point(), small_task()
    problem = PDFMProblem(c=0.0, constraint_set="task")
    adapted = problem.solve_inner(outer, data, problem.initial_inner(outer, data))
    flipped = problem.solve_inner(outer, {**data, "yq": 1 - data["yq"]}, outer["theta"])
    torch.testing.assert_close(adapted, flipped, rtol=0, atol=0)
    published = PDFMProblem(c=0.0)
    other = published.solve_inner(outer, data, published.initial_inner(outer, data))
    assert float((adapted["w"] - other["w"]).abs().max()) > 1e-6
