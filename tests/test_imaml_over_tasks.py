"""How ``meta_gradient`` batches its tasks: vmap and the loop give the same answer and the same
diagnostics; ``"auto"`` measures both on its first calls, then keeps one; the adjoint's right-hand
side comes with the hypergradient instead of a second outer gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bilevel
from bilevel.problems.imaml import IMAMLProblem, SinusoidTasks, meta_gradient
from bilevel.problems.imaml import problem as imaml_problem
from bilevel.problems.imaml.models import mlp_forward, mlp_init
from bilevel.problems.imaml.problem import mse
from bilevel.problems.imaml.tasks import Task
from bilevel.solvers import CG, MINRES


def small_mlp(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in mlp_init(6, generator=torch.Generator().manual_seed(seed)).items()}


def sinusoid_tasks(batch: int, seed: int = 0) -> Task:
    tasks = SinusoidTasks(shots=5, queries=5).sample(np.random.default_rng(seed), batch)
    return Task(*(t.double() for t in tasks))


def assert_same(a, b) -> None:
    """Equal up to float64 rounding (amplified by the solves: vmap and the loop run different kernels)."""
    for name in a.grad:
        torch.testing.assert_close(a.grad[name], b.grad[name], rtol=1e-7, atol=1e-10, equal_nan=True)
    for field in ("query_loss", "status", "iterations", "inner_residual", "adjoint_residual", "indefinite"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("solver", [CG(maxiter=5), MINRES(maxiter=8, rtol=1e-8)], ids=["cg", "minres"])
def test_loop_and_vmap_agree_in_the_implicit_mode(solver):
    problem = IMAMLProblem(mlp_forward, mse, lam=1.0, inner_lr=0.02, inner_steps=4)  # indefinite for some tasks
    theta, tasks = small_mlp(), sinusoid_tasks(5)
    looped = meta_gradient(problem, theta, tasks, solver=solver, over_tasks="loop")
    vmapped = meta_gradient(problem, theta, tasks, solver=solver, over_tasks="vmap")
    assert_same(looped, vmapped)


@pytest.mark.parametrize("mode", ["unrolled", "first_order"])
def test_loop_and_vmap_agree_in_the_other_modes(mode):
    problem = IMAMLProblem(mlp_forward, mse, lam=2.0, inner_lr=0.05, inner_steps=3)
    theta, tasks = small_mlp(), sinusoid_tasks(3)
    assert_same(meta_gradient(problem, theta, tasks, mode=mode, over_tasks="loop"),
                meta_gradient(problem, theta, tasks, mode=mode, over_tasks="vmap"))


def test_the_adjoint_residual_is_the_true_relative_residual():
    """||b - A v|| / ||b|| with b = grad L_test(phi) and A = I + H/lam scaled by lam, recomputed here."""
    problem = IMAMLProblem(mlp_forward, mse, lam=10.0, inner_lr=0.02, inner_steps=10)
    theta, tasks = small_mlp(), sinusoid_tasks(3)
    out = meta_gradient(problem, theta, tasks, solver=CG(maxiter=3), over_tasks="loop")
    for i in range(3):
        task = tasks.index(i)
        result = bilevel.hypergradient(problem, theta, task, solver=CG(maxiter=3), on_failure="ignore")
        phi, unravel = bilevel.ravel(result.inner)
        b = torch.func.grad(lambda v: problem.query_loss(unravel(v), task))(phi)
        torch.testing.assert_close(result.adjoint_rhs, b, rtol=1e-10, atol=1e-12)
        hessian = torch.func.hessian(lambda v: problem.support_loss(unravel(v), task))(phi)
        residual = b - (hessian + 10.0 * torch.eye(len(phi), dtype=phi.dtype)) @ result.solve.x
        torch.testing.assert_close(out.adjoint_residual[i], residual.norm() / b.norm(), rtol=1e-8, atol=1e-12)


def test_auto_alternates_on_its_first_calls_then_keeps_the_faster(monkeypatch):
    problem = IMAMLProblem(mlp_forward, mse, lam=2.0, inner_lr=0.05, inner_steps=2)
    theta, tasks = small_mlp(), sinusoid_tasks(3)
    ways = []
    loop = imaml_problem._loop
    monkeypatch.setattr(imaml_problem, "_loop", lambda one, t: ways.append("loop") or loop(one, t))
    vmap = torch.func.vmap
    monkeypatch.setattr(imaml_problem.torch.func, "vmap", lambda *a, **k: ways.append("vmap") or vmap(*a, **k))
    for _ in range(4):
        meta_gradient(problem, theta, tasks)
    assert ways == ["vmap", "loop", "vmap", "loop"]
    (times,) = imaml_problem._TIMINGS[problem].values()
    assert len(times["vmap"]) == len(times["loop"]) == 2
    times["vmap"][:] = [2.0, 1.0]  # as if the loop were faster here
    times["loop"][:] = [0.5, 0.7]
    ways.clear()
    meta_gradient(problem, theta, tasks)
    assert ways == ["loop"] and len(times["loop"]) == 2  # settled: no longer timed
    times["vmap"][:] = [0.1, 0.3]
    ways.clear()
    meta_gradient(problem, theta, tasks)
    assert ways == ["vmap"]


def test_auto_loops_over_a_single_task_and_vmaps_chunks():
    problem = IMAMLProblem(mlp_forward, mse, lam=2.0, inner_lr=0.05, inner_steps=2)
    theta = small_mlp()
    meta_gradient(problem, theta, sinusoid_tasks(1))
    meta_gradient(problem, theta, sinusoid_tasks(4), chunk_size=2)
    assert problem not in imaml_problem._TIMINGS  # neither call needed a measurement
    with pytest.raises(ValueError, match="over_tasks"):
        meta_gradient(problem, theta, sinusoid_tasks(2), over_tasks="serial")
    with pytest.raises(ValueError, match="chunk_size"):
        meta_gradient(problem, theta, sinusoid_tasks(2), over_tasks="loop", chunk_size=1)


def test_a_nan_task_comes_back_as_nan_from_the_loop_as_from_vmap():
    """The loop reads values where vmap cannot; a NaN task must still come back, not raise."""
    problem = IMAMLProblem(mlp_forward, mse, lam=2.0, inner_lr=0.05, inner_steps=2)
    theta, tasks = small_mlp(), sinusoid_tasks(3)
    tasks.support_y[1, 0] = float("nan")
    looped = meta_gradient(problem, theta, tasks, over_tasks="loop")
    vmapped = meta_gradient(problem, theta, tasks, over_tasks="vmap")
    assert torch.isnan(looped.query_loss[1]) and torch.isfinite(looped.query_loss[[0, 2]]).all()
    assert_same(looped, vmapped)


@pytest.mark.parametrize("over_tasks", ["vmap", "loop"])
def test_the_default_path_costs_a_fixed_number_of_products_per_solve_and_one_pass_over_the_queries(
        over_tasks, monkeypatch):
    """Its checks (true residual, symmetry, singularity, relative residual) are paid per solve: 5 CG
    products and the closing one, and the queries are seen once per task (by the outer gradient)."""
    from bilevel.adjoint import AdjointOperator

    query_passes = []

    def forward(params, x):
        if x.shape[-2] == 7:  # the query set
            query_passes.append(1)
        return mlp_forward(params, x)

    products, solves = [], []
    apply, init = AdjointOperator.__call__, AdjointOperator.__init__
    monkeypatch.setattr(AdjointOperator, "__call__", lambda self, v: products.append(1) or apply(self, v))
    monkeypatch.setattr(AdjointOperator, "__init__", lambda self, *a, **k: solves.append(1) or init(self, *a, **k))
    problem = IMAMLProblem(forward, mse, lam=10.0, inner_lr=0.02, inner_steps=3)
    tasks = Task(*(t.double() for t in SinusoidTasks(shots=5, queries=7).sample(np.random.default_rng(0), 3)))
    meta_gradient(problem, small_mlp(), tasks, solver=CG(maxiter=5, rtol=0.0), over_tasks=over_tasks)
    assert len(products) == 6 * len(solves) and len(solves) == (1 if over_tasks == "vmap" else 3)
    assert len(query_passes) == len(solves)  # under vmap one pass serves every task
