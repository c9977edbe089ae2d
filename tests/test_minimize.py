"""The inner solvers (``bilevel.solvers.minimize``): minimizers that report what happened.

References: quadratics ``1/2 x^T A x - b^T x`` with the known minimizer ``A^{-1} b``
across condition numbers 1 to 1e6; Rosenbrock's minimizer (1, 1); logistic
regression against its own optimality condition; a vmapped solve against a loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.solvers.minimize import (LBFGS, MINIMIZERS, Armijo, GradientDescent, LineSearch, MinimizeStatus, Nesterov,
                                      NewtonCG, default_rtol, get_minimizer)

DT = torch.float64


def quadratic(seed: int, n: int, cond: float, batch: tuple[int, ...] = ()):
    """``f(x) = 1/2 x^T A x - b^T x`` with eigenvalues log-spaced in [1, cond], and ``x* = A^{-1} b``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
    A = q @ torch.diag(eig) @ q.transpose(-1, -2)
    b = torch.randn(*batch, n, generator=g, dtype=DT)
    x_star = torch.linalg.solve(A, b)

    def f(x):
        return 0.5 * (x * (A @ x.unsqueeze(-1)).squeeze(-1)).sum(-1) - (b * x).sum(-1)

    return f, A, b, x_star


def status(result, i=None) -> MinimizeStatus:
    code = result.status if i is None else result.status[i]
    return MinimizeStatus(int(code))


def true_gradient_norm(f, x):
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return torch.linalg.vector_norm(g, dim=-1)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), log_cond=st.floats(0, 6), n=st.integers(2, 30))
def test_newton_cg_solves_quadratics_to_the_known_minimizer_up_to_cond_1e6(seed, log_cond, n):
    cond = 10 ** log_cond
    f, A, b, x_star = quadratic(seed, n, cond)
    # 1e-10 is above float64's rounding floor at condition 1e6 (about eps * cond)
    result = NewtonCG(rtol=1e-10)(f, torch.zeros(n, dtype=DT))
    assert status(result) is MinimizeStatus.CONVERGED
    # ||x - x*|| <= ||A^-1|| ||grad f(x)|| with ||A^-1|| = 1 (smallest eigenvalue 1)
    assert float((result.x - x_star).norm()) <= float(true_gradient_norm(f, result.x)) * 1.01 + 1e-12
    assert float(result.grad_norm) <= 1e-10 * float(b.norm())


def test_the_default_tolerance_below_the_rounding_floor_stalls_with_no_decrease():
    """At condition 1e6 float64's floor is near the default tolerance: a problem that cannot get
    there stops within a few dozen iterations, NO_DECREASE, still accurate to about eps * cond."""
    stalled = 0
    for seed in range(3):
        f, A, b, x_star = quadratic(seed, 30, 1e6)
        result = NewtonCG()(f, torch.zeros(30, dtype=DT))
        assert status(result) in (MinimizeStatus.CONVERGED, MinimizeStatus.NO_DECREASE)
        assert int(result.iterations) < 400  # of maxiter 1000
        assert float((result.x - x_star).norm() / x_star.norm()) < 1e-10
        stalled += status(result) is MinimizeStatus.NO_DECREASE
        assert (status(result) is MinimizeStatus.CONVERGED) == (float(result.grad_norm) <= default_rtol(DT) * float(b.norm()))
    assert stalled >= 1


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), log_cond=st.floats(0, 4), n=st.integers(2, 20))
def test_lbfgs_solves_quadratics_up_to_cond_1e4(seed, log_cond, n):
    f, A, b, x_star = quadratic(seed, n, 10 ** log_cond)
    result = LBFGS(maxiter=5000)(f, torch.zeros(n, dtype=DT))
    assert status(result) is MinimizeStatus.CONVERGED
    assert float((result.x - x_star).norm()) <= float(true_gradient_norm(f, result.x)) * 1.01 + 1e-12


@pytest.mark.parametrize("minimizer", [NewtonCG(), LBFGS(), Armijo(maxiter=20_000), GradientDescent(lr=0.5, maxiter=5000),
                                       Nesterov(lr=0.3, maxiter=5000)], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e6])
def test_every_status_is_decided_on_the_gradient_at_the_returned_point(minimizer, cond):
    """Converged exactly when the recomputed gradient meets the tolerance; then x is the minimizer
    to within ||A^-1|| times that gradient. A slow method on a hard problem says MAX_ITERATIONS."""
    f, A, b, x_star = quadratic(1, 8, cond)
    if isinstance(minimizer, (GradientDescent, Nesterov)):
        minimizer = type(minimizer)(lr=min(minimizer.lr, 1.0 / cond), maxiter=minimizer.maxiter)
    result = minimizer(f, torch.zeros(8, dtype=DT))
    gnorm = float(true_gradient_norm(f, result.x))
    tol = default_rtol(DT) * float(b.norm())
    assert math.isclose(float(result.grad_norm), gnorm, rel_tol=1e-6, abs_tol=1e-15)
    assert (status(result) is MinimizeStatus.CONVERGED) == (gnorm <= tol) or status(result) is MinimizeStatus.NO_DECREASE
    if status(result) is MinimizeStatus.CONVERGED:
        assert float((result.x - x_star).norm()) <= gnorm * 1.01 + 1e-12
    else:
        assert status(result) in (MinimizeStatus.MAX_ITERATIONS, MinimizeStatus.NO_DECREASE)
        assert not bool(result.converged)


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize("minimizer", [NewtonCG(), LBFGS()], ids=lambda m: type(m).__name__)
def test_rosenbrock_reaches_its_minimizer(minimizer):
    result = minimizer(rosenbrock, torch.tensor([-1.2, 1.0], dtype=DT))
    assert status(result) is MinimizeStatus.CONVERGED
    assert torch.allclose(result.x, torch.ones(2, dtype=DT), atol=1e-8)


def logistic_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(100, 5, generator=g, dtype=DT) * torch.logspace(0, 1, 5, dtype=DT)
    y = torch.randint(0, 3, (100,), generator=g)

    def f(params):
        W, c = params["W"], params["c"]
        return torch.nn.functional.cross_entropy(X @ W + c, y) + 1e-2 * (W ** 2).sum() / 2

    start = {"W": torch.zeros(5, 3, dtype=DT), "c": torch.zeros(3, dtype=DT)}
    return f, start


@pytest.mark.parametrize("minimizer", [NewtonCG(), LBFGS(), Armijo(maxiter=20_000, rtol=1e-6)],
                         ids=lambda m: type(m).__name__)
def test_logistic_regression_pytree_parameters(minimizer):
    f, start = logistic_problem()
    result = minimizer(f, start)
    assert status(result) is MinimizeStatus.CONVERGED
    assert set(result.x) == {"W", "c"} and result.x["W"].shape == (5, 3)
    reference = NewtonCG()(f, start)
    err = max(float((result.x[k] - reference.x[k]).abs().max()) for k in start)
    assert err <= (1e-4 if isinstance(minimizer, Armijo) else 1e-7)


@pytest.mark.parametrize("name", sorted(MINIMIZERS))
def test_vmap_equals_a_loop_and_a_native_batch(name):
    """Each problem keeps its own steps, memory and status: a vmapped solve, a natively batched
    one (an objective returning one value per problem) and a loop give the same bits."""
    options = dict(rtol=1e-6, maxiter=300, **({"lr": 0.05} if hasattr(get_minimizer(name), "lr") else {}))
    minimizer = type(get_minimizer(name))(**options)
    g = torch.Generator().manual_seed(3)
    D = torch.logspace(0, 1.3, 6, dtype=DT) * (0.5 + torch.rand(4, 6, generator=g, dtype=DT))
    B = torch.randn(4, 6, generator=g, dtype=DT)

    def objective(d, b):  # elementwise, so that every layout rounds alike
        return lambda x: 0.5 * (d * x * x).sum(-1) - (b * x).sum(-1) + 0.1 * (x ** 4).sum(-1)

    def one(d, b):
        return minimizer(objective(d, b), torch.zeros(6, dtype=DT))

    looped = [one(D[i], B[i]) for i in range(4)]
    assert len({int(r.iterations) for r in looped}) > 1  # the problems stop at different iterations
    vmapped = torch.func.vmap(one)(D, B)
    batched = minimizer(objective(D, B), torch.zeros(4, 6, dtype=DT))
    for i, r in enumerate(looped):
        for other in (vmapped, batched):
            assert int(other.status[i]) == int(r.status) == int(MinimizeStatus.CONVERGED)
            assert int(other.iterations[i]) == int(r.iterations)
            assert torch.equal(other.x[i], r.x)


def test_problems_of_one_batch_stop_on_their_own():
    """An easy problem converges in few iterations and is frozen while a hard one goes on."""
    easy, *_ = quadratic(0, 5, 1.0)
    hard, *_ = quadratic(1, 5, 1e3)
    result = LBFGS()(lambda x: torch.stack([easy(x[0]), hard(x[1])]), torch.zeros(2, 5, dtype=DT))
    assert bool(result.converged.all())
    assert int(result.iterations[0]) < int(result.iterations[1])


@pytest.mark.parametrize("minimizer", [NewtonCG(), LBFGS(), Armijo()], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("objective", [lambda x: -x.sum(), lambda x: -(x ** 2).sum()], ids=["linear", "concave"])
def test_unbounded_objectives_are_diverged(minimizer, objective):
    result = minimizer(objective, torch.full((3,), 0.5, dtype=DT))
    assert status(result) is MinimizeStatus.DIVERGED and not bool(result.converged)


@pytest.mark.parametrize("minimizer", [NewtonCG(maxiter=50), LBFGS(maxiter=50), Armijo(maxiter=50)],
                         ids=lambda m: type(m).__name__)
def test_an_objective_unbounded_along_one_direction_is_not_converged(minimizer):
    """Curvature elsewhere caps the steps, so the descent may be linear: never reported converged."""
    result = minimizer(lambda x: -x[0] + (x[1:] ** 2).sum(), torch.full((3,), 0.5, dtype=DT))
    assert status(result) in (MinimizeStatus.MAX_ITERATIONS, MinimizeStatus.DIVERGED) and float(result.fun) < -10


def test_a_fixed_step_too_large_for_the_curvature_is_diverged():
    f, *_ = quadratic(0, 4, 100.0)
    result = GradientDescent(lr=0.1, maxiter=1000)(f, torch.zeros(4, dtype=DT))
    assert status(result) is MinimizeStatus.DIVERGED
    assert bool(torch.isfinite(result.x).all())  # stopped before overflowing


def test_nan_at_the_start_is_nonfinite_and_the_solution_is_nan():
    result = NewtonCG()(lambda x: torch.log(x).sum(), torch.tensor([-1.0, 2.0], dtype=DT))
    assert status(result) is MinimizeStatus.NONFINITE
    assert bool(torch.isnan(result.x).all())


def nan_beyond_two(x):
    """``(x - 1)^2`` where ``x < 2``, NaN beyond: a region a long step lands in."""
    return torch.where(x < 2, (x - 1) ** 2, torch.full_like(x, math.nan)).sum()


def test_nan_along_the_path():
    start = torch.tensor([0.0], dtype=DT)
    # A fixed step of 3 lands at x = 6, where the objective is NaN.
    assert status(GradientDescent(lr=3.0)(nan_beyond_two, start)) is MinimizeStatus.NONFINITE
    # A line search rejects the NaN trials and shrinks its step instead.
    for minimizer in (Armijo(lr=3.0), LBFGS(), NewtonCG()):
        result = minimizer(nan_beyond_two, start)
        assert status(result) is MinimizeStatus.CONVERGED
        assert abs(float(result.x) - 1.0) < 1e-8


@pytest.mark.parametrize("name", sorted(MINIMIZERS))
def test_flat_objective_is_converged_at_the_start(name):
    result = get_minimizer(name)(lambda x: (0 * x).sum(), torch.ones(3, dtype=DT))
    assert status(result) is MinimizeStatus.CONVERGED and int(result.iterations) == 0
    assert torch.equal(result.x, torch.ones(3, dtype=DT))


def test_maxiter_zero_returns_the_start_with_its_status():
    f, *_ = quadratic(0, 3, 10.0)
    result = LBFGS(maxiter=0)(f, torch.ones(3, dtype=DT))
    assert status(result) is MinimizeStatus.MAX_ITERATIONS and torch.equal(result.x, torch.ones(3, dtype=DT))


def test_float32_reaches_its_own_default_tolerance():
    f, start = logistic_problem()
    start = {k: v.float() for k, v in start.items()}
    result = NewtonCG()(lambda p: f({k: v.double() for k, v in p.items()}).float(), start)
    assert status(result) is MinimizeStatus.CONVERGED and result.x["W"].dtype == torch.float32


def test_result_repr_and_failures_name_the_statuses():
    f, *_ = quadratic(0, 3, 1e3)
    result = GradientDescent(lr=1e-3, maxiter=3)(f, torch.zeros(3, dtype=DT))
    assert "status=MAX_ITERATIONS" in repr(result)
    assert "MAX_ITERATIONS after 3 iterations, gradient norm" in result.failures()[0]


def test_options_are_validated_with_the_fix():
    with pytest.raises(ValueError, match="rtol"):
        LBFGS(rtol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        NewtonCG(maxiter=-1)
    with pytest.raises(ValueError, match="lr"):
        GradientDescent(lr=0.0)
    with pytest.raises(ValueError, match="c < 0.5"):
        LineSearch(c=0.7)
    with pytest.raises(ValueError, match="unknown inner solver 'bfgs'"):
        get_minimizer("bfgs")
    with pytest.raises(TypeError, match=r"pass LBFGS\(\), not LBFGS"):
        get_minimizer(LBFGS)
    assert isinstance(get_minimizer("Newton-CG"), NewtonCG)
    with pytest.raises(TypeError, match="floating"):
        LBFGS()(lambda x: x.sum(), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not start with it"):
        LBFGS()(lambda x: x[:2], torch.ones(3, dtype=DT))  # two values for a point of shape (3,)
