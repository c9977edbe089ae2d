"""Inner solvers of the fair problem: damped Newton, alone and on a stiff saddle point."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from bilevel.problems.fair.data import halves, synthetic_tasks
from bilevel.problems.fair.model import init_params
from bilevel.problems.fair.optim import damped_newton
from bilevel.problems.fair.problem import FairMetaProblem
from bilevel.pytree import tree_norm


def logistic_ridge(x: torch.Tensor, y: torch.Tensor, reg: float):
    def value(w):
        s = x @ w
        return (torch.nn.functional.softplus(s) - y * s).mean() + 0.5 * reg * (w * w).sum()

    def grad_and_hessian(w):
        return torch.func.grad(value)(w), torch.func.hessian(value)(w)

    return value, grad_and_hessian


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1.0, 1e3))
def test_damped_newton_reaches_the_minimizer_of_an_ill_conditioned_problem(seed, scale):
    """Features scaled by up to 1e3 (condition number up to ~1e6): the gradient vanishes at the answer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64) * torch.logspace(0, torch.log10(torch.tensor(scale)), 5,
                                                                              dtype=torch.float64)
    y = (torch.rand(30, generator=g, dtype=torch.float64) < 0.5).double()
    value, grad_and_hessian = logistic_ridge(x, y, 1e-2)
    w = damped_newton(value, grad_and_hessian, torch.zeros(5, dtype=torch.float64), steps=60)
    grad, _ = grad_and_hessian(w)
    assert float(grad.norm()) < 1e-8
    assert float(value(w)) <= float(value(torch.zeros(5, dtype=torch.float64)))


def test_damped_newton_under_vmap_equals_one_problem_at_a_time():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 20, 4, generator=g, dtype=torch.float64) * 5
    ys = (torch.rand(3, 20, generator=g, dtype=torch.float64) < 0.5).double()

    def solve(x, y):
        value, grad_and_hessian = logistic_ridge(x, y, 0.1)
        return damped_newton(value, grad_and_hessian, torch.zeros(4, dtype=torch.float64), steps=25)

    batched = torch.func.vmap(solve)(xs, ys)
    for i in range(3):
        torch.testing.assert_close(batched[i], solve(xs[i], ys[i]), atol=1e-12, rtol=0)


def test_stiff_fairness_constraint_is_solved_to_round_off():
    """A sharp |u| (delta = 1e-4) and a stiff dual (mu = 1e-3): curvature 1e4 times the prox along the
    constraint normal, still a root of G after a few Newton steps, inside vmap too (no early exit)."""
    problem = FairMetaProblem(c=0.0, mu=1e-3, delta=1e-4, constraint_set="task", inner_steps=30)
    g = torch.Generator().manual_seed(2)
    outer = {"theta": init_params(4), "lambda0": torch.tensor(0.5, dtype=torch.float64)}
    outer["theta"]["w"] = torch.randn(4, generator=g, dtype=torch.float64)
    tasks = [halves(t) for t in synthetic_tasks(3, n=24, dim=4, seed=5)]
    batch = {k: torch.stack([t[k] for t in tasks]) for k in tasks[0]}

    def residual(data):
        inner = problem.solve_inner(outer, data, problem.initial_inner(outer, data))
        return tree_norm(problem.optimality(inner, outer, data))

    assert float(torch.func.vmap(residual)(batch).max()) < 1e-9
