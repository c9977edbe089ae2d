"""Per-feature L2 and hyper-cleaning: hypergradients against finite differences of the
validation loss through a tightly solved inner problem (float64, small subsets), and the
HOAG outer loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bilevel
from bilevel import BilevelProblem
from bilevel.problems.hyperparameter.cleaning import HyperCleaning, corrupt_labels, separation
from bilevel.problems.hyperparameter.l2 import PerFeatureL2
from bilevel.problems.hyperparameter.linear import mean_loss, minimize
from bilevel.problems.hyperparameter.mnist import load_mnist
from bilevel.problems.hyperparameter.outer import HOAG
from bilevel.problems.hyperparameter.splits import Splits, split
from bilevel.problems.hyperparameter.tabular import load_tabular
from bilevel.solvers import CG, Direct
from bilevel.testing import check_hypergradient


@pytest.fixture(scope="module")
def german(shared_data) -> Splits:
    table = load_tabular("german", shared_data)
    return split(table.x, table.y, n_train=200, n_val=150, n_test=150, seed=1)


@pytest.fixture(scope="module")
def small_mnist(shared_data) -> Splits:
    """300 MNIST digits average-pooled to 7 x 7 (49 features, 10 classes): small enough for Newton."""
    mnist = load_mnist(shared_data)
    pixels = F.avg_pool2d(mnist.train_images[:300, None].double() / 255, 4).reshape(300, 49)
    labels = mnist.train_labels[:300]
    return Splits(pixels[:150], labels[:150], pixels[150:250], labels[150:250], pixels[250:], labels[250:])


def finite_difference(problem, outer, data, coords, eps):
    """Central differences of F(theta) = f(W*(theta)) with W* solved to round-off."""
    out = []
    for j in coords:
        e = torch.zeros_like(outer)
        e[j] = eps
        values = []
        for point in (outer + e, outer - e):
            inner = problem.solve_inner(point, data, problem.initial_inner(point, data))
            values.append(float(problem.outer_objective(inner, point, data)))
        out.append((values[0] - values[1]) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def test_l2_hypergradient_passes_bilevel_testing_check(german):
    """bilevel.testing: finite differences through a Newton-polished inner solution, and the dense solve."""
    lam = torch.linspace(-4, 0, german.x_train.shape[1], dtype=torch.float64)
    report = check_hypergradient(PerFeatureL2(inner_tol=1e-9), lam, german,
                                 references=("finite_differences", "direct"))
    assert report.passed


def test_cleaning_hypergradient_passes_bilevel_testing_check(small_mnist):
    noisy, _ = corrupt_labels(small_mnist.y_train, 0.5, 10, seed=1)
    theta = torch.linspace(-2, 2, 150, dtype=torch.float64)
    report = check_hypergradient(HyperCleaning(reg=1e-2, inner_tol=1e-9), theta, small_mnist._replace(y_train=noisy),
                                 references=("finite_differences", "direct"))
    assert report.passed


def test_multinomial_l2_hypergradient_matches_finite_differences(small_mnist):
    problem = PerFeatureL2(inner_tol=1e-11, method="newton")
    lam = torch.full((49,), -3.0, dtype=torch.float64)
    result = bilevel.hypergradient(problem, lam, small_mnist, solver=CG(rtol=1e-12), on_failure="raise")
    assert result.inner.shape == (50, 10)
    coords = [10, 24, 30]
    fd = finite_difference(problem, lam, small_mnist, coords, eps=1e-4)
    assert torch.allclose(result.grad[coords], fd, rtol=1e-5, atol=1e-9)


def test_cleaning_hypergradient_matches_finite_differences_and_the_direct_solve(small_mnist):
    noisy, _ = corrupt_labels(small_mnist.y_train, 0.5, 10, seed=0)
    data = small_mnist._replace(y_train=noisy)
    problem = HyperCleaning(reg=1e-2, inner_tol=1e-11, method="newton")
    theta = torch.linspace(-1, 1, 150, dtype=torch.float64)
    result = bilevel.hypergradient(problem, theta, data, solver=CG(rtol=1e-12), on_failure="raise")
    coords = [0, 7, 75, 149]
    fd = finite_difference(problem, theta, data, coords, eps=1e-4)
    assert torch.allclose(result.grad[coords], fd, rtol=1e-5, atol=1e-10)
    direct = bilevel.hypergradient(problem, theta, data, solver=Direct(), on_failure="raise")
    assert torch.allclose(result.grad, direct.grad, rtol=1e-8, atol=1e-13)


def test_lbfgs_and_newton_reach_the_same_minimizer(german):
    problem = PerFeatureL2()
    lam = torch.full((german.x_train.shape[1],), -2.0, dtype=torch.float64)
    objective = lambda w: problem.inner_objective(w, lam, german)  # noqa: E731
    init = problem.initial_inner(lam, german)
    w_newton, g_newton, _ = minimize(objective, init, tol=1e-10, max_iter=50, method="newton")
    w_lbfgs, g_lbfgs, _ = minimize(objective, init, tol=1e-7, max_iter=500, method="lbfgs")
    assert g_newton <= 1e-10 and g_lbfgs <= 1e-7
    assert torch.allclose(w_newton, w_lbfgs, atol=1e-5)
    with pytest.raises(ValueError, match="method must be 'lbfgs' or 'newton'"):
        minimize(objective, init, tol=1e-3, max_iter=5, method="sgd")


def test_hoag_decreases_the_validation_loss(german):
    hoag = HOAG(PerFeatureL2(), german, on_failure="raise")
    state = hoag.start(torch.full((german.x_train.shape[1],), -3.0, dtype=torch.float64))
    losses, accepted = [state.loss], 0
    for _ in range(12):
        state, info = hoag.step(state)
        losses.append(state.loss)
        accepted += info.accepted
        assert info.tol == pytest.approx(1e-3 * 0.9 ** state.iteration)
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 1e-3 and accepted >= 6
    assert float(mean_loss(state.inner, german.x_val, german.y_val)) == pytest.approx(state.loss)


class Shift(BilevelProblem):
    """w*(theta) = theta (one exact gradient step), F(theta) = 1/2 ||theta - 1||^2."""

    inner_lr = 1.0

    def inner_objective(self, inner, outer, data):
        return 0.5 * (inner - outer).square().sum()

    def outer_objective(self, inner, outer, data):
        return 0.5 * (inner - 1).square().sum()

    def initial_inner(self, outer, data):
        return torch.zeros_like(outer)


def test_hoag_rejects_a_step_that_raises_the_loss_and_backs_off():
    hoag = HOAG(Shift(), None, first_move=3.0, grow=2.0, on_failure="raise")
    state = hoag.start(torch.zeros(2, dtype=torch.float64))  # grad = -1, step 3: theta = 3, F = 4 > 1
    assert state.loss == pytest.approx(1.0) and state.step_size == pytest.approx(3.0)
    state, info = hoag.step(state)
    assert not info.accepted and info.candidate_loss == pytest.approx(4.0)
    assert torch.equal(state.outer, torch.zeros(2, dtype=torch.float64)) and state.step_size == pytest.approx(1.5)
    state, info = hoag.step(state)  # theta = 1.5, F = 0.25
    assert info.accepted and state.loss == pytest.approx(0.25) and state.step_size == pytest.approx(3.0)
    assert torch.allclose(state.outer, torch.full((2,), 1.5, dtype=torch.float64))


def test_hyper_cleaning_downweights_corrupted_examples(small_mnist):
    noisy, corrupted = corrupt_labels(small_mnist.y_train, 0.5, 10, seed=0)
    data = small_mnist._replace(y_train=noisy)
    hoag = HOAG(HyperCleaning(reg=1e-2, method="newton"), data, on_failure="raise")
    state = hoag.start(torch.zeros(150, dtype=torch.float64))
    first = state.loss
    for _ in range(6):
        state, _ = hoag.step(state)
    assert state.loss < first
    assert separation(torch.sigmoid(state.outer), corrupted)["auc"] > 0.7


def test_corrupt_labels_and_separation():
    labels = torch.arange(1000) % 10
    noisy, corrupted = corrupt_labels(labels, 0.5, 10, seed=4)
    assert torch.equal(corrupted, noisy != labels)
    assert 0.40 < corrupted.float().mean().item() < 0.50  # half replaced, 1 in 10 by the same class
    assert torch.equal(corrupt_labels(labels, 0.5, 10, seed=4)[0], noisy)
    with pytest.raises(ValueError, match="fraction"):
        corrupt_labels(labels, 1.5, 10)
    mask = torch.tensor([True, True, False, False])
    assert separation(torch.tensor([0.1, 0.2, 0.8, 0.9]), mask) == {"auc": 1.0, "precision": 1.0, "recall": 1.0}
    assert separation(torch.tensor([0.9, 0.8, 0.1, 0.2]), mask)["auc"] == 0.0
    assert separation(torch.full((4,), 0.7), mask)["auc"] == 0.5
    assert separation(torch.tensor([0.1, 0.6, 0.3, 0.9]), mask) == {"auc": 0.75, "precision": 0.5, "recall": 0.5}
