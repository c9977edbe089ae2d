"""A problem that defines only its objectives is solved by the library: hypergradients at default
settings against closed forms and finite differences (float64), ill-conditioned and non-quadratic
inner problems, under vmap, and the inner solve's report under the failure policy."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel
from bilevel import BilevelError, BilevelProblem, ConvergenceError, ConvergenceWarning
from bilevel.solvers.minimize import LBFGS, GradientDescent, MinimizeStatus, NewtonCG

DT = torch.float64


class Ridge(BilevelProblem):
    """Per-feature ridge: ``g = 1/2n ||X w - y||^2 + 1/2 sum exp(theta) w^2``, no inner settings."""

    def inner_objective(self, w, theta, data):
        X, y, _, _ = data
        return (X @ w - y).pow(2).mean() / 2 + (theta.exp() * w.pow(2)).sum() / 2

    def outer_objective(self, w, theta, data):
        _, _, X_val, y_val = data
        return (X_val @ w - y_val).pow(2).mean() / 2

    def initial_inner(self, theta, data):
        return torch.zeros(data[0].shape[1], dtype=data[0].dtype)


def ridge_data(seed: int, spread: float, n: int = 200, p: int = 20):
    """Features scaled over ``spread`` decades, so that the inner Hessian's condition number is
    up to about ``100 ** spread`` at small ``theta``."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, spread, p, dtype=DT)
    X = torch.randn(n, p, generator=g, dtype=DT) * scales
    X_val = torch.randn(n, p, generator=g, dtype=DT) * scales
    w = torch.randn(p, generator=g, dtype=DT)
    return X, X @ w + 0.1 * torch.randn(n, generator=g, dtype=DT), X_val, X_val @ w


def ridge_closed_form(theta, data):
    """``dF/dtheta`` through ``w* = (X^T X / n + diag(exp theta))^{-1} X^T y / n``."""
    X, y, X_val, y_val = data
    theta = theta.detach().requires_grad_()
    w = torch.linalg.solve(X.T @ X / len(X) + torch.diag(theta.exp()), X.T @ y / len(X))
    (grad,) = torch.autograd.grad((X_val @ w - y_val).pow(2).mean() / 2, theta)
    return grad


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), spread=st.floats(0.0, 2.0), log_reg=st.floats(-3.0, 0.0))
def test_ill_conditioned_ridge_at_default_settings_matches_the_closed_form(seed, spread, log_reg):
    data = ridge_data(seed, spread)
    theta = torch.full((20,), log_reg * math.log(10), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report: solved and converged
        result = bilevel.hypergradient(Ridge(), theta, data)
    assert relative_error(result.grad, ridge_closed_form(theta, data)) < 1e-6
    assert MinimizeStatus(int(result.inner_solve.status)) is MinimizeStatus.CONVERGED
    assert bool(result.solve.converged)


def test_the_ill_conditioned_ridge_that_fixed_steps_got_wrong():
    """Condition number about 1e4: gradient descent of step 0.1 diverges there, and small steps
    stop far from the solution; the default inner solver is right to 1e-6."""
    data = ridge_data(0, 2.0)
    theta = torch.full((20,), -4.0, dtype=DT)
    X = data[0]
    cond = torch.linalg.cond(X.T @ X / len(X) + torch.diag(theta.exp()))
    assert 1e3 < float(cond) < 1e5
    result = bilevel.hypergradient(Ridge(), theta, data, on_failure="raise")
    assert relative_error(result.grad, ridge_closed_form(theta, data)) < 1e-6

    class FixedStep(Ridge):
        inner_lr, inner_steps = 0.1, 100

    with pytest.raises(ConvergenceError, match="inner solve diverged"):  # named as such, not the outer data
        bilevel.hypergradient(FixedStep(), theta, data, on_failure="raise")


class Logistic(BilevelProblem):
    """Multiclass logistic regression with per-feature L2 (convex, not quadratic)."""

    def inner_objective(self, W, theta, data):
        X, y, _, _ = data
        return F.cross_entropy(X @ W, y) + (theta.exp()[:, None] * W.pow(2)).sum() / 2

    def outer_objective(self, W, theta, data):
        _, _, X_val, y_val = data
        return F.cross_entropy(X_val @ W, y_val)

    def initial_inner(self, theta, data):
        return torch.zeros(data[0].shape[1], 4, dtype=DT)


class Huber(Ridge):
    """Huber regression with per-feature L2 (convex, piecewise quadratic)."""

    def inner_objective(self, w, theta, data):
        X, y, _, _ = data
        return F.huber_loss(X @ w, y, delta=0.5) + (theta.exp() * w.pow(2)).sum() / 2


def classification_data(seed: int):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 0.5, 10, dtype=DT)
    X, X_val = (torch.randn(150, 10, generator=g, dtype=DT) * scales for _ in range(2))
    W = torch.randn(10, 4, generator=g, dtype=DT)
    return X, (X @ W).argmax(1), X_val, (X_val @ W).argmax(1)


def finite_differences(problem, theta, data, step=1e-5):
    """Central differences of ``F(theta) = f(phi*(theta), theta)`` with ``phi*`` solved tightly."""
    tight = NewtonCG(rtol=0.0, atol=1e-13, maxiter=100)
    problem.inner_solver = tight

    def F(t):
        inner = problem.inner_solve(t, data, problem.initial_inner(t, data)).x
        return float(problem.outer_objective(inner, t, data))

    grad = torch.zeros_like(theta)
    for i in range(len(theta)):
        e = torch.zeros_like(theta)
        e[i] = step
        grad[i] = (F(theta + e) - F(theta - e)) / (2 * step)
    problem.inner_solver = None
    return grad


@pytest.mark.parametrize("problem, make_data", [(Logistic(), classification_data), (Huber(), lambda s: ridge_data(s, 0.5))],
                         ids=["logistic", "huber"])
def test_convex_non_quadratic_inner_problems_at_default_settings(problem, make_data):
    data = make_data(1)
    p = data[0].shape[1]
    theta = torch.linspace(-3, -1, p, dtype=DT)
    result = bilevel.hypergradient(problem, theta, data, on_failure="raise")
    assert relative_error(result.grad, finite_differences(problem, theta, data)) < 1e-6
    # and against the dense implicit-function-theorem solve at a tightly solved point
    problem.inner_solver = NewtonCG(rtol=0.0, atol=1e-13, maxiter=100)
    reference = bilevel.hypergradient(problem, theta, data, solver="direct", on_failure="ignore")
    problem.inner_solver = None
    assert relative_error(result.grad, reference.grad) < 1e-6


def test_vmapped_default_hypergradients_equal_a_loop_and_the_closed_form():
    data = ridge_data(2, 1.0)
    thetas = torch.stack([torch.full((20,), v, dtype=DT) for v in (-4.0, -2.0, 0.0)])
    vmapped = torch.func.vmap(lambda t: bilevel.hypergradient(Ridge(), t, data))(thetas)
    bilevel.check_result(vmapped, on_failure="raise")
    for i, theta in enumerate(thetas):
        assert relative_error(vmapped.grad[i], ridge_closed_form(theta, data)) < 1e-6
        looped = bilevel.hypergradient(Ridge(), theta, data)
        assert int(vmapped.inner_solve.iterations[i]) == int(looped.inner_solve.iterations)
    assert vmapped.inner_solve.status.shape == (3,)


def test_the_inner_solver_is_chosen_by_name_instance_or_gradient_descent_settings():
    data = ridge_data(0, 0.3)
    theta = torch.zeros(20, dtype=DT)
    assert isinstance(Ridge().inner_minimizer(), NewtonCG)

    class ByName(Ridge):
        inner_solver = "lbfgs"

    assert isinstance(ByName().inner_minimizer(), LBFGS)
    result = bilevel.hypergradient(ByName(), theta, data, on_failure="raise")
    assert relative_error(result.grad, ridge_closed_form(theta, data)) < 1e-6

    class Settings(Ridge):
        inner_lr, inner_steps, inner_tol = 0.05, 7, None

    minimizer = Settings().inner_minimizer()
    assert isinstance(minimizer, GradientDescent) and (minimizer.lr, minimizer.maxiter) == (0.05, 7)
    result = bilevel.hypergradient(Settings(), theta, data, on_failure="ignore")
    assert int(result.inner_solve.iterations) == 7  # no tolerance: all the steps
    assert MinimizeStatus(int(result.inner_solve.status)) is MinimizeStatus.MAX_ITERATIONS


def test_an_unsolved_inner_problem_is_reported_with_the_inner_solvers_status():
    data = ridge_data(0, 1.0)
    theta = torch.full((20,), -4.0, dtype=DT)

    class Capped(Ridge):
        inner_solver = LBFGS(maxiter=3)

    with pytest.warns(ConvergenceWarning, match=r"(?s)not a root.*inner solver stopped with MAX_ITERATIONS after"):
        result = bilevel.hypergradient(Capped(), theta, data)
    assert not bool(result.inner_solve.converged)
    with pytest.raises(ConvergenceError, match="MAX_ITERATIONS"):
        bilevel.hypergradient(Capped(), theta, data, on_failure="raise")


def test_nan_in_the_inner_solve_is_named_as_such():
    X, y, X_val, y_val = ridge_data(0, 0.0)
    y = y.clone()
    y[3] = math.nan
    with pytest.raises(bilevel.NonFiniteError, match="NaN or Inf in the inner solve"):
        bilevel.hypergradient(Ridge(), torch.zeros(20, dtype=DT), (X, y, X_val, y_val))


def test_a_root_problem_iterates_its_update_and_rejects_an_inner_solver():
    class Root(BilevelProblem):
        inner_lr, inner_steps, inner_tol = 0.5, 200, 1e-12

        def optimality(self, x, theta, data):
            return x - 0.5 * torch.tanh(x) - theta  # a contraction's fixed point

        def outer_objective(self, x, theta, data):
            return x.pow(2).sum()

        def initial_inner(self, theta, data):
            return torch.zeros_like(theta)

    theta = torch.tensor([0.3, -0.2], dtype=DT)
    assert Root().inner_minimizer() is None
    result = bilevel.hypergradient(Root(), theta, on_failure="raise")
    assert result.inner_solve is None and float(result.inner_residual) < 1e-10

    problem = Root()
    problem.inner_solver = "lbfgs"
    with pytest.raises(BilevelError, match="inner_solver minimizes inner_objective"):
        bilevel.hypergradient(problem, theta)
    problem.inner_solver = "bfgs"
    with pytest.raises(BilevelError, match="unknown inner solver 'bfgs'"):
        bilevel.hypergradient(problem, theta)


class Convex(Ridge):
    """A family of convex, mostly non-quadratic inner losses with per-feature L2."""

    loss = "ridge"

    def inner_objective(self, w, theta, data):
        X, y, _, _ = data
        z = X @ w
        fit = {"ridge": lambda: (z - y).pow(2).mean() / 2,
               "huber": lambda: F.huber_loss(z, y, delta=0.3),
               "logistic": lambda: F.binary_cross_entropy_with_logits(z, (y > 0).to(DT)),
               "poisson": lambda: (torch.exp(z) - y.abs() * z).mean(),
               "smooth_abs": lambda: (F.softplus(z - y) + F.softplus(y - z)).mean()}[self.loss]()
        return fit + (theta.exp() * w.pow(2)).sum() / 2


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), loss=st.sampled_from(["ridge", "huber", "logistic", "poisson", "smooth_abs"]),
       n=st.sampled_from([30, 100]), p=st.sampled_from([3, 10, 40]), spread=st.floats(0.0, 2.0))
def test_random_convex_inner_problems_at_default_settings_match_a_tight_dense_reference(seed, loss, n, p, spread):
    """Weakly or strongly regularized (theta in [-8, 1]), over- or under-determined: the default
    hypergradient, alone and vmapped, within 1e-6 of a tightly solved point's dense solve."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, spread, p, dtype=DT) / (10 if loss == "poisson" else 1)
    X, X_val = (torch.randn(n, p, generator=g, dtype=DT) * scales for _ in range(2))
    w = torch.randn(p, generator=g, dtype=DT)
    data = (X, X @ w + 0.3 * torch.randn(n, generator=g, dtype=DT), X_val, X_val @ w)
    theta = torch.empty(p, dtype=DT).uniform_(-8.0, 1.0, generator=g)
    problem = Convex()
    problem.loss = loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bilevel.hypergradient(problem, theta, data)
        vmapped = torch.func.vmap(lambda t: bilevel.hypergradient(problem, t, data))(torch.stack([theta, theta]))
    tight = Convex()
    tight.loss, tight.inner_solver = loss, NewtonCG(rtol=0.0, atol=1e-13, maxiter=2000, cg_maxiter=200)
    reference = bilevel.hypergradient(tight, theta, data, solver="direct", on_failure="ignore")
    assert relative_error(result.grad, reference.grad) < 1e-6
    assert relative_error(vmapped.grad[0], reference.grad) < 1e-6
