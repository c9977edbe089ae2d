"""Neumann without a step size: a step chosen per system by power iterations, at any scale of the operator.

References: ``torch.linalg.solve`` on the dense matrix; the implicit gradient of a linear root
``A phi = B theta + c`` is ``J = A^{-1} B`` (closed form).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel
from bilevel import solvers
from bilevel.errors import ConvergenceWarning
from bilevel.solvers import Neumann, Status
from bilevel.solvers.neumann import step_size
from bilevel.testing.strategies import operator_matrix

F64 = torch.float64
SCALES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3)


def spd(n: int, condition: float, seed: int, scale: float) -> torch.Tensor:
    return scale * operator_matrix("spd", n, condition, seed)


def rhs(n: int, seed: int, *batch: int) -> torch.Tensor:
    return torch.randn(*batch, n, generator=torch.Generator().manual_seed(seed + 7), dtype=F64)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), condition=st.sampled_from((1.0, 2.0, 4.0)), seed=st.integers(0, 2**16),
       scale=st.sampled_from(SCALES))
def test_default_step_converges_on_spd_systems_of_any_scale(n, condition, seed, scale):
    """With the defaults (rtol 1e-5, 100 terms) the series meets the tolerance whatever the scale of ``A``."""
    A, b = spd(n, condition, seed, scale), rhs(n, seed)
    result = Neumann()(lambda v: v @ A.T, b)
    assert int(result.status) == Status.CONVERGED, Status(int(result.status)).name
    want = torch.linalg.solve(A, b)
    assert float((result.x - want).norm()) <= 1e-5 * condition * float(want.norm())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 30), condition=st.sampled_from((1.0, 10.0, 100.0, 1e4)), seed=st.integers(0, 2**16),
       scale=st.sampled_from(SCALES))
def test_the_chosen_step_makes_the_series_contract(n, condition, seed, scale):
    """The property behind the choice: ``1/lambda_max <= alpha < 2/lambda_max`` for SPD ``A``, so
    every eigenvalue of ``I - alpha A`` lies in ``(-1, 1)``."""
    A = spd(n, condition, seed, scale)
    alpha = float(step_size(lambda v: v @ A.T, lambda v: v, rhs(n, seed), 10))
    top = float(torch.linalg.eigvalsh(A)[-1])
    assert 1.0 / top * (1 - 1e-9) <= alpha < 2.0 / top


def test_the_step_is_chosen_per_system_in_a_batch_and_under_vmap():
    """Systems of scales 1e-3 and 1e3 in one batch each get their own step; vmap gives the same."""
    n = 12
    A = torch.stack([spd(n, 3.0, 1, 1e-3), spd(n, 3.0, 2, 1.0), spd(n, 3.0, 3, 1e3)])
    b = rhs(n, 0, 3)
    matvec = lambda v: torch.einsum("...ij,...j->...i", A, v)  # noqa: E731
    batched = Neumann(rtol=1e-10, maxiter=400)(matvec, b)
    assert bool(batched.converged.all()), batched.status
    torch.testing.assert_close(batched.x, torch.linalg.solve(A, b), rtol=1e-8, atol=0.0)
    vmapped = torch.func.vmap(lambda M, v: Neumann(rtol=1e-10, maxiter=400)(lambda u: M @ u, v).x)(A, b)
    torch.testing.assert_close(vmapped, batched.x, rtol=1e-12, atol=0.0)
    steps = step_size(matvec, lambda v: v, b, 10)
    tops = torch.linalg.eigvalsh(A)[:, -1]
    assert bool(((steps * tops > 1 - 1e-9) & (steps * tops < 2)).all()), steps * tops


def test_cost_is_power_iterations_matvecs_before_the_terms():
    A, b = spd(8, 2.0, 0, 50.0), rhs(8, 0)
    calls = []

    def matvec(v):
        calls.append(1)
        return v @ A.T

    for power in (1, 4, 10):
        calls.clear()
        result = Neumann(power_iterations=power, rtol=1e-8, maxiter=200)(matvec, b)
        terms = int(result.iterations)
        # power iterations, one per term, and the final true residual
        assert len(calls) == power + terms + 1, (power, terms, len(calls))
    calls.clear()
    fixed = Neumann(alpha=1 / 100, rtol=1e-8, maxiter=200)(matvec, b)
    assert len(calls) == int(fixed.iterations) + 1  # an explicit alpha costs nothing more


def test_an_explicit_alpha_is_used_as_given():
    """``alpha = 1`` on an operator with eigenvalues up to 1e3 diverges, as it must: it is not corrected."""
    A, b = spd(6, 2.0, 0, 1e3), rhs(6, 0)
    assert int(Neumann(alpha=1.0)(lambda v: v @ A.T, b).status) == Status.DIVERGED
    assert int(Neumann()(lambda v: v @ A.T, b).status) == Status.CONVERGED
    # a step that is valid but small is kept too: one term moves x by exactly alpha * b
    one = Neumann(alpha=1e-4, maxiter=1, rtol=0.0)(lambda v: v @ A.T, b)
    torch.testing.assert_close(one.x, 1e-4 * b)


def test_a_preconditioned_series_chooses_its_step_on_m_a():
    A = spd(10, 50.0, 4, 1e2)
    b = rhs(10, 4)
    jacobi = solvers.jacobi(torch.diagonal(A))
    result = Neumann(M=jacobi, rtol=1e-10, maxiter=2000)(lambda v: v @ A.T, b)
    assert bool(result.converged)
    torch.testing.assert_close(result.x, torch.linalg.solve(A, b), rtol=1e-7, atol=0.0)


def test_indefinite_and_broken_operators_are_reported_not_hidden():
    A, b = 10.0 * operator_matrix("indefinite", 6, 3.0, 0), rhs(6, 0)
    result = Neumann()(lambda v: v @ A.T, b)
    assert int(result.status) in (Status.DIVERGED, Status.MAX_ITERATIONS)
    nan = Neumann()(lambda v: v * float("nan"), b)
    assert int(nan.status) == Status.NONFINITE and not bool(torch.isfinite(nan.x).any())
    zero = Neumann()(lambda v: torch.zeros_like(v), b)  # no step can help: the step falls back to 1
    assert int(zero.status) != Status.CONVERGED


def test_options_are_validated():
    for bad in ({"alpha": 0.0}, {"alpha": -1.0}, {"power_iterations": 0}, {"power_iterations": 2.5}):
        with pytest.raises((ValueError, TypeError)):
            Neumann(**bad)
    assert Neumann().alpha is None and Neumann().power_iterations == 10


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("mode", ["backward", "jacfwd"])
def test_neumann_by_name_gives_the_implicit_gradient_at_any_scale(scale, mode):
    """``solver="neumann"`` with every default, on ``A phi = B theta + c`` with ``A`` scaled by ``scale``:
    the gradient of the closed form, and no warning."""
    A = spd(5, 3.0, 11, scale)
    g = torch.Generator().manual_seed(3)
    B, c = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    theta, w = torch.tensor([0.4, -1.2], dtype=F64), torch.linspace(-1, 1, 5, dtype=F64)

    @bilevel.implicit_root(lambda p, t: A @ p - B @ t - c, solver="neumann", residual_tol=None)
    def phi_star(t):
        return torch.linalg.solve(A, B @ t + c)

    J = torch.linalg.solve(A, B)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        if mode == "backward":
            t = theta.clone().requires_grad_()
            (phi_star(t) @ w).backward()
            got, want = t.grad, J.T @ w
        else:
            got, want = torch.func.jacfwd(phi_star)(theta), J
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_hypergradient_with_neumann_by_name_on_a_scaled_quadratic():
    from bilevel.testing.families import quadratic_case

    for scale in (1e-3, 1e3):
        case = quadratic_case(4, 2, 3.0, 5, [0.3, -0.6])
        data = dict(case.data, A=scale * case.data["A"])
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            got = bilevel.hypergradient(case.problem, case.outer, data, solver="neumann").grad
        torch.testing.assert_close(got, case.problem.closed_form(case.outer, data), rtol=1e-4, atol=1e-10)
