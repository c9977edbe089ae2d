"""A custom bilevel problem to check with ``bilevel check``.

Ridge regression whose L2 weight ``exp(theta_j)`` is tuned per feature on a
validation set::

    inner:  w*(theta) = argmin_w  ||X w - y||^2 / (2n) + sum_j exp(theta_j) w_j^2 / 2
    outer:  F(theta)  = ||X_val w*(theta) - y_val||^2 / (2 n_val)

Check its hypergradient at three random outer points::

    bilevel check examples/ridge_check.py:make_problem --points 3
    bilevel check examples.ridge_check:make_problem        # the same, as a module path

``make_buggy_problem`` has a deliberate bug (the optimality condition holds the
regularization weight constant), which the check reports with exit status 1.
"""

from __future__ import annotations

import torch

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
