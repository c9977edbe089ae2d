"""The autograd fast paths of bilevel.adjoint agree with the torch.func transforms they stand in for,
and torch.compile traces the whole vmapped implicit hypergradient in one graph."""

from __future__ import annotations

import pytest
import torch

import bilevel
from bilevel.adjoint import autograd_applies, gradient, grads_and_value
from bilevel.errors import BilevelError
from bilevel.solvers import CG, Status

DT = torch.float64


class TinyMAML(bilevel.BilevelProblem):
    """Proximal inner problem of a 1-8-1 tanh network: ``L(phi) + lam/2 ||phi - theta||^2``."""

    residual_tol = None
    inner_lr, inner_steps, lam = 0.05, 4, 3.0

    def inner_objective(self, inner, outer, data):
        x, y = data
        w1, w2 = inner
        prox = sum(((p - t) ** 2).sum() for p, t in zip(inner, outer))
        return ((torch.tanh(x @ w1) @ w2 - y) ** 2).mean() + 0.5 * self.lam * prox

    def outer_objective(self, inner, outer, data):
        x, y = data
        return ((torch.tanh(x @ inner[0]) @ inner[1] - 2 * y) ** 2).mean()

    def initial_inner(self, outer, data):
        return outer


def make(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(1, 8, generator=g, dtype=DT), torch.randn(8, 1, generator=g, dtype=DT) / 3)
    x = torch.randn(3, 10, 1, generator=g, dtype=DT)
    return theta, (x, torch.sin(x))


def objective(inner, outer, data):
    return TinyMAML().inner_objective(inner, outer, data)


def test_gradient_equals_func_grad_plain_tracked_and_aliased():
    theta, (x, y) = make()
    data = (x[0], y[0])
    phi = tuple(t + 0.1 for t in theta)
    expected = torch.func.grad(objective)(phi, theta, data)
    got = gradient(objective, phi, theta, data)
    torch.testing.assert_close(got, expected)
    assert not any(g.requires_grad for g in got)

    # an input on a graph: the result stays on it, and its derivative matches func.grad's
    outer = tuple(t.clone().requires_grad_() for t in theta)
    got = gradient(objective, phi, outer, data)
    ref = torch.func.grad(objective)(phi, outer, data)
    assert all(g.requires_grad for g in got)
    d_got = torch.autograd.grad(sum(g.sum() for g in got), outer)
    d_ref = torch.autograd.grad(sum(g.sum() for g in ref), outer)
    torch.testing.assert_close(d_got, d_ref)

    # the same tensors as inner and outer: the partial derivative in the first argument only
    torch.testing.assert_close(gradient(objective, outer, outer, data), torch.func.grad(objective)(outer, outer, data))


def test_grads_and_value_equal_func_grad_and_value():
    theta, (x, y) = make()
    phi = tuple(t - 0.2 for t in theta)
    (d_in, d_out), value = grads_and_value(objective, phi, theta, (x[1], y[1]))
    (r_in, r_out), r_value = torch.func.grad_and_value(objective, argnums=(0, 1))(phi, theta, (x[1], y[1]))
    torch.testing.assert_close((d_in, d_out, value), (r_in, r_out, r_value))
    assert not value.requires_grad


def test_autograd_applies_only_outside_transforms_and_graphs():
    theta, (x, y) = make()
    assert autograd_applies(theta, theta, (x, y))
    assert not autograd_applies(theta, tuple(t.clone().requires_grad_() for t in theta), (x, y))
    assert not autograd_applies(theta, theta, (torch.nn.Linear(1, 1), x))  # tensors out of sight
    seen = torch.func.vmap(lambda xi: torch.tensor(autograd_applies(theta, theta, (xi, y))))(x)
    assert not seen.any()


@pytest.mark.parametrize("vmapped", [False, True])
def test_hypergradient_auto_equals_functional(vmapped):
    theta, data = make()
    problem, solver = TinyMAML(), CG(maxiter=6, rtol=0.0)

    def run(linearization):
        def one(task):
            return bilevel.hypergradient(problem, theta, task, solver=solver, on_failure="ignore",
                                         linearization=linearization)
        if vmapped:
            return torch.func.vmap(one)(data)
        results = [one((data[0][i], data[1][i])) for i in range(3)]
        return (torch.stack([torch.cat([g.reshape(-1) for g in r.grad]) for r in results]),
                torch.stack([r.solve.status for r in results]))

    auto, functional = run("auto"), run("functional")
    if vmapped:
        torch.testing.assert_close(auto.grad, functional.grad)
        assert torch.equal(auto.solve.status, functional.solve.status)
    else:
        torch.testing.assert_close(auto[0], functional[0], rtol=1e-10, atol=1e-12)
        assert torch.equal(auto[1], functional[1])


def test_hypergradient_auto_falls_back_when_outer_is_on_a_graph():
    theta, data = make()
    task = (data[0][0], data[1][0])
    outer = tuple(t.clone().requires_grad_() for t in theta)
    result = bilevel.hypergradient(TinyMAML(), outer, task, solver=CG(maxiter=6, rtol=0.0), on_failure="ignore")
    plain = bilevel.hypergradient(TinyMAML(), theta, task, solver=CG(maxiter=6, rtol=0.0), on_failure="ignore")
    torch.testing.assert_close(tuple(g.detach() for g in result.grad), plain.grad, rtol=1e-10, atol=1e-12)


def test_unknown_linearization_is_refused():
    theta, data = make()
    with pytest.raises(BilevelError, match="linearization"):
        bilevel.hypergradient(TinyMAML(), theta, (data[0][0], data[1][0]), linearization="double")


def test_compiled_vmapped_hypergradient_equals_eager():
    theta, data = make()
    problem = TinyMAML()
    solver = CG(maxiter=20, rtol=1e-6)  # the tasks converge after 5, 6 and 6 iterations

    def batch(outer, tasks):
        return torch.func.vmap(lambda task: bilevel.hypergradient(problem, outer, task, solver=solver,
                                                                    on_failure="ignore"))(tasks)

    eager = batch(theta, data)
    # fullgraph: no graph break (the solvers' host-side early exit and checks stand aside while
    # tracing, the compiled solve runs maxiter iterations with finished systems frozen by masks)
    compiled = torch.compile(batch, backend="aot_eager", fullgraph=True)(theta, data)
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(compiled.solve.x, eager.solve.x, rtol=1e-9, atol=1e-12)
    assert torch.equal(compiled.solve.status, eager.solve.status)
    assert torch.equal(compiled.solve.iterations, eager.solve.iterations)
    assert (eager.solve.status == int(Status.CONVERGED)).all() and eager.solve.iterations.unique().numel() > 1
    bilevel.check_result(compiled, on_failure="raise", residual_tol=None)


def test_compiled_imaml_meta_gradient_equals_eager():
    from bilevel.problems.imaml import IMAMLProblem, mlp_forward, mlp_init
    from bilevel.problems.imaml.problem import meta_gradient, mse
    from bilevel.problems.imaml.tasks import Task

    g = torch.Generator().manual_seed(0)
    problem = IMAMLProblem(mlp_forward, mse, lam=1.0, inner_lr=0.02, inner_steps=3)
    theta = mlp_init(generator=g)
    x = torch.rand(3, 10, 1, generator=g) * 10 - 5
    tasks = Task(x, torch.sin(x), x + 0.1, torch.sin(x + 0.1))

    def step(outer, batch):
        return meta_gradient(problem, outer, batch)

    eager = step(theta, tasks)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(theta, tasks)
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.iterations, eager.iterations)
