"""
Getting started: define a problem, swap solvers, check gradients
================================================================

The three things a first session with bilevel does, on one small problem: a
ridge regression whose L2 weight ``exp(theta_j)`` is tuned per feature on a
validation set::

    inner:  w*(theta) = argmin_w  ||X w - y||^2 / (2n) + sum_j exp(theta_j) w_j^2 / 2
    outer:  F(theta)  = ||X_val w*(theta) - y_val||^2 / (2 n_val)

The walk-through in words is ``docs/getting_started.md``. As a module this file
provides a factory for ``bilevel check``::

    bilevel check examples/getting_started.py:make_problem --points 3
"""

from __future__ import annotations

import torch

import bilevel


# %%
# 1. Define a problem
# -------------------
# Three methods: the inner objective, the outer objective and where the inner
# solve starts. Nothing else: the library minimizes the inner objective itself
# (with :class:`bilevel.solvers.minimize.NewtonCG`, to a tolerance tied to the
# hypergradient's accuracy) and differentiates through its solution by the
# implicit function theorem.
class PerFeatureRidge(bilevel.BilevelProblem):
    def inner_objective(self, w, theta, data):
        X, y, _, _ = data
        return (X @ w - y).pow(2).mean() / 2 + (theta.exp() * w.pow(2)).sum() / 2

    def outer_objective(self, w, theta, data):
        _, _, X_val, y_val = data
        return (X_val @ w - y_val).pow(2).mean() / 2

    def initial_inner(self, theta, data):
        return torch.zeros(data[0].shape[1], dtype=data[0].dtype)


def make_data(seed: int = 0, n: int = 50, features: int = 3) -> tuple[torch.Tensor, ...]:
    """``(X, y, X_val, y_val)``: noisy training targets, clean validation targets."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(features, generator=g, dtype=torch.float64)
    X = torch.randn(n, features, generator=g, dtype=torch.float64)
    X_val = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = X @ w_true + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, X_val, X_val @ w_true


def make_problem(seed: int):
    """Factory for ``bilevel check``: ``(problem, outer, data)`` at a random outer point."""
    g = torch.Generator().manual_seed(1000 + seed)
    theta = torch.empty(3, dtype=torch.float64).uniform_(-1.0, 1.0, generator=g)
    return PerFeatureRidge(), theta, make_data(seed)


if __name__ == "__main__":
    import matplotlib.pyplot as plt

    from bilevel.solvers import MINRES
    from bilevel.testing import check_hypergradient

    problem, data, theta = PerFeatureRidge(), make_data(0), torch.zeros(3, dtype=torch.float64)
    result = bilevel.hypergradient(problem, theta, data)
    print("hypergradient:", result.grad)
    print("inner solve:  ", result.inner_solve)  # NewtonCG: status CONVERGED, its iterations
    print("adjoint solve:", result.solve)        # CG: status CONVERGED, decided on the true residual

    # %%
    # 2. Swap solvers
    # ---------------
    # The adjoint linear solver is one argument (an instance, or its name), the
    # inner minimizer one attribute of the problem. Both report their status.
    same = bilevel.hypergradient(problem, theta, data, solver=MINRES(rtol=1e-10))
    problem_lbfgs = PerFeatureRidge()
    problem_lbfgs.inner_solver = "lbfgs"
    other_inner = bilevel.hypergradient(problem_lbfgs, theta, data, solver="minres")
    print("MINRES:         ", same.grad, same.solve)
    print("L-BFGS + MINRES:", other_inner.grad, other_inner.inner_solve)

    # %%
    # 3. Check the gradient
    # ---------------------
    # :func:`bilevel.testing.check_hypergradient` compares the hypergradient with
    # finite differences, reverse mode through unrolled inner steps and a dense
    # solve, in float64, and raises with the table when one disagrees.
    print(check_hypergradient(problem, theta, data))

    # %%
    # The outer problem itself: a few steps of gradient descent on ``theta``, each
    # with its hypergradient. The validation loss falls as the per-feature
    # weights adapt.
    losses, theta_k = [], theta.clone()
    for _ in range(15):
        step = bilevel.hypergradient(problem, theta_k, data)
        losses.append(float(step.outer_loss))
        theta_k = theta_k - 2.0 * step.grad

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses, marker="o")
    ax.set_xlabel("outer step")
    ax.set_ylabel("validation loss F(theta)")
    ax.set_title("Tuning per-feature L2 weights by hypergradient")
    fig.tight_layout()
    plt.show()
