"""
Your own problem: a solver swap and a gradient check
====================================================

Ridge regression whose L2 weight ``exp(theta_j)`` is tuned per feature on a
validation set::

    inner:  w*(theta) = argmin_w  ||X w - y||^2 / (2n) + sum_j exp(theta_j) w_j^2 / 2
    outer:  F(theta)  = ||X_val w*(theta) - y_val||^2 / (2 n_val)

Run as a script, it computes the hypergradient with three adjoint solvers and by
unrolling, checks it against finite differences, and plots the four. As a module
it provides the factories of ``bilevel check``::

    bilevel check examples/ridge_check.py:make_problem --points 3
    bilevel check examples.ridge_check:make_problem        # the same, as a module path

``make_buggy_problem`` has a deliberate bug (the optimality condition holds the
regularization weight constant), which the check reports with exit status 1.
"""

from __future__ import annotations

import torch

import bilevel
from bilevel import BilevelProblem


class PerFeatureRidge(BilevelProblem):
    """Per-feature L2 ridge regression; ``data = (X, y, X_val, y_val)``."""

    inner_lr = 0.1
    inner_steps = 2000
    inner_tol = 1e-12

    def inner_objective(self, w, theta, data):
        X, y, _, _ = data
        return (X @ w - y).pow(2).mean() / 2 + (theta.exp() * w.pow(2)).sum() / 2

    def outer_objective(self, w, theta, data):
        _, _, X_val, y_val = data
        return (X_val @ w - y_val).pow(2).mean() / 2

    def initial_inner(self, theta, data):
        return torch.zeros(data[0].shape[1], dtype=data[0].dtype)


class DetachedRidge(PerFeatureRidge):
    """The bug: ``theta.detach()`` drops d_theta G, so the implicit hypergradient misses a term."""

    def inner_objective(self, w, theta, data):
        return super().inner_objective(w, theta.detach(), data)


def _data(seed: int, n: int = 20, features: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(features, generator=g)
    X, X_val = torch.randn(n, features, generator=g), torch.randn(n, features, generator=g)
    return X, X @ w_true + 0.1 * torch.randn(n, generator=g), X_val, X_val @ w_true


def make_problem(seed: int):
    """Factory for ``bilevel check``: ``(problem, outer, data)`` at a random outer point."""
    theta = torch.empty(3).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1000 + seed))
    return PerFeatureRidge(), theta, _data(seed)


def make_buggy_problem(seed: int):
    """The same with the deliberate bug: ``bilevel check`` exits with status 1."""
    _, theta, data = make_problem(seed)
    return DetachedRidge(), theta, data


if __name__ == "__main__":
    import matplotlib.pyplot as plt

    from bilevel.solvers import CG, MINRES, Direct
    from bilevel.testing import check_hypergradient

    problem, theta, data = make_problem(0)
    theta, data = theta.double(), tuple(d.double() for d in data)
    # %%
    # The same hypergradient with three adjoint solvers (one argument), and by unrolling the inner steps.
    grads = {}
    for name, solver in (("CG", CG(rtol=1e-10)), ("MINRES", MINRES(rtol=1e-10)), ("Direct", Direct())):
        result = bilevel.hypergradient(problem, theta, data, solver=solver)
        print(name, result.solve)
        grads[name] = result.grad
    grads["unrolled"] = bilevel.hypergradient(problem, theta, data, mode="unrolled").grad

    # %%
    # The check compares the implicit hypergradient with finite differences, unrolling and a dense solve;
    # the buggy variant fails it.
    print(check_hypergradient(problem, theta, data))  # raises AssertionError with the table when it fails
    buggy, _, _ = make_buggy_problem(0)
    print(check_hypergradient(buggy, theta, data, raise_exception=False))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(grads)
    for i, (name, grad) in enumerate(grads.items()):
        ax.bar(torch.arange(3) + i * width, grad, width, label=name)
    ax.set_xticks(torch.arange(3) + 0.4 - width / 2, [f"theta_{j}" for j in range(3)])
    ax.set_ylabel("dF / dtheta")
    ax.set_title("One hypergradient, four ways")
    ax.legend()
    fig.tight_layout()
    plt.show()
