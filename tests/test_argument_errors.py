"""Misshapen or mistyped arguments get a BilevelError naming each argument's shapes and dtypes,
never torch's bare "size mismatch" from deep inside a solve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel import BilevelError, BilevelProblem

DT = torch.float64


class Ridge(BilevelProblem):
    def inner_objective(self, w, theta, data):
        X, y = data
        return F.mse_loss(X @ w, y) / 2 + (theta.exp() * w.pow(2)).sum() / 2

    def outer_objective(self, w, theta, data):
        X, y = data
        return F.mse_loss(X @ w, y)

    def initial_inner(self, theta, data):
        return torch.zeros(data[0].shape[1], dtype=DT)


def data(features: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, features, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)


@pytest.mark.parametrize("mode", ["implicit", "unrolled", "first_order"])
def test_an_initial_inner_of_the_wrong_length_is_named(mode):
    class WrongStart(Ridge):
        def initial_inner(self, theta, data):
            return torch.zeros(5, dtype=DT)

    with pytest.raises(BilevelError, match=r"(?s)could not use the arguments.*size mismatch.*"
                                           r"WrongStart.initial_inner's result: float64 \(5,\).*data: \[0\] float64 "
                                           r"\(20, 3\)"):
        bilevel.hypergradient(WrongStart(), torch.zeros(3, dtype=DT), data(), mode=mode)


def test_outer_parameters_of_the_wrong_shape_are_named():
    with pytest.raises(BilevelError, match=r"(?s)outer: float64 \(4,\).*outer has the shape the objectives expect"):
        bilevel.hypergradient(Ridge(), torch.zeros(4, dtype=DT), data())


def test_an_init_of_the_wrong_length_is_named():
    with pytest.raises(BilevelError, match=r"init: float64 \(2,\)"):
        bilevel.hypergradient(Ridge(), torch.zeros(3, dtype=DT), data(), init=torch.zeros(2, dtype=DT))


def test_integer_data_where_it_meets_the_parameters_is_named_with_the_fix():
    X, y = data()
    with pytest.raises(BilevelError, match=r"(?s)\[0\] int64 \(20, 3\).*converted with \.to\(outer's dtype\)"):
        bilevel.hypergradient(Ridge(), torch.zeros(3, dtype=DT), (X.round().long(), y))


def test_integer_class_labels_are_fine():
    class Logistic(Ridge):
        def inner_objective(self, W, theta, data):
            X, y = data
            return F.cross_entropy(X @ W, y) + (theta.exp()[:, None] * W.pow(2)).sum() / 2

        def outer_objective(self, W, theta, data):
            X, y = data
            return F.cross_entropy(X @ W, y)

        def initial_inner(self, theta, data):
            return torch.zeros(3, 2, dtype=DT)

    X, y = data()
    result = bilevel.hypergradient(Logistic(), torch.zeros(3, dtype=DT), (X, (y > 0).long()), on_failure="raise")
    assert result.grad.shape == (3,)


def test_the_librarys_own_errors_pass_through_unchanged():
    class Capped(Ridge):
        inner_solver = bilevel.solvers.minimize.LBFGS(maxiter=1)

    with pytest.raises(bilevel.ConvergenceError):
        bilevel.hypergradient(Capped(), torch.full((3,), -6.0, dtype=DT), data(), on_failure="raise")
