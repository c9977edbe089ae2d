"""Failure reporting, option validation, scipy iteration counts, vmap detection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.solvers import (CG, GMRES, MINRES, BiCGSTAB, Direct, LinearSolver, Neumann, NormalCG,
                             Status, is_vmapped)

F64 = torch.float64
ITERATIVE = [CG, MINRES, GMRES, BiCGSTAB, Neumann]


def mv(A: torch.Tensor):
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def spd(n: int, seed: int, cond: float = 1e3) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.tensor(Q @ np.diag(np.logspace(0, np.log10(cond), n)) @ Q.T, dtype=F64)


def test_maxiter_reports_max_iterations():
    A = spd(30, 0, cond=1e4)
    b = torch.ones(2, 30, dtype=F64)
    for solver in (CG(maxiter=3), MINRES(maxiter=3), GMRES(maxiter=3), BiCGSTAB(maxiter=3),
                   Neumann(alpha=1e-4, maxiter=3)):
        res = solver(mv(A), b)
        assert (res.status == Status.MAX_ITERATIONS).all(), type(solver).__name__
        assert not res.converged.any()
        assert (res.iterations == 3).all()
        assert "MAX_ITERATIONS after 3 iterations" in res.failures()[0]


def test_cg_reports_negative_curvature_and_minres_solves_it():
    diag = torch.tensor([3.0, -1.0, 2.0, -4.0, 1.0], dtype=F64)
    A = torch.diag(diag)
    b = torch.ones(5, dtype=F64)
    res = CG()(mv(A), b)
    assert int(res.status) == Status.NEGATIVE_CURVATURE and not res.converged
    assert res.x.isfinite().all()
    torch.testing.assert_close(res.residual_norm, torch.linalg.vector_norm(b - A @ res.x))
    assert "MINRES" in res.failures()[0]
    fixed = MINRES(rtol=1e-12)(mv(A), b)
    assert fixed.all_converged
    torch.testing.assert_close(fixed.x, b / diag)


def test_cg_curvature_flag_is_per_system():
    A = torch.stack([torch.diag(torch.tensor([1.0, 2.0, 3.0])),
                     torch.diag(torch.tensor([1.0, -2.0, 3.0]))]).double()
    res = CG()(mv(A), torch.ones(2, 3, dtype=F64))
    assert res.status.tolist() == [Status.CONVERGED, Status.NEGATIVE_CURVATURE]


def test_neumann_diverges_with_large_alpha():
    A = spd(10, 1, cond=10.0)  # eigenvalues in [1, 10]
    b = torch.ones(10, dtype=F64)
    res = Neumann(alpha=0.5, maxiter=500)(mv(A), b)
    assert int(res.status) == Status.DIVERGED
    assert int(res.iterations) < 500 and res.x.isfinite().all()
    ok = Neumann(alpha=0.15, maxiter=500, rtol=1e-8)(mv(A), b)
    assert ok.all_converged


def test_gmres_converges_where_cg_fails():
    rng = np.random.default_rng(3)
    n = 16
    skew = rng.standard_normal((n, n))
    A = torch.tensor(np.eye(n) + 2.0 * (skew - skew.T) / np.sqrt(n), dtype=F64)
    b = torch.tensor(rng.standard_normal(n), dtype=F64)
    cg = CG(rtol=1e-8, maxiter=4 * n)(mv(A), b)
    assert not cg.converged
    for solver in (GMRES(rtol=1e-8, restart=6, maxiter=2000), GMRES(rtol=1e-8),
                   BiCGSTAB(rtol=1e-8)):
        res = solver(mv(A), b)
        assert res.all_converged, res.failures()
        torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("A", [
    torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=F64),
    torch.eye(4, dtype=F64) + torch.diag(torch.ones(3, dtype=F64), -1),
])
def test_bicgstab_restarts_when_the_shadow_residual_becomes_orthogonal(A):
    """Triangular operators (as in ADMM's fixed point) make (r_0, r_1) = 0 after one step."""
    b = torch.zeros(A.shape[0], dtype=F64)
    b[0] = 1.0
    res = BiCGSTAB(rtol=1e-10)(mv(A), b)
    assert res.all_converged, res.failures()
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-12)


def test_bicgstab_breakdown():
    A = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    b = torch.tensor([1.0, 0.0], dtype=F64)
    res = BiCGSTAB()(mv(A), b)
    assert int(res.status) == Status.BREAKDOWN and res.x.isfinite().all()
    assert GMRES()(mv(A), b).all_converged


def test_minres_reports_a_singular_inconsistent_system():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))
    res = MINRES()(mv(A), torch.ones(3, dtype=F64))
    assert int(res.status) == Status.SINGULAR
    assert res.x.isfinite().all()


@pytest.mark.parametrize("cls", ITERATIVE + [Direct])
def test_nonfinite_operator(cls):
    def nan_matvec(v):
        return v * torch.nan

    solver = cls(alpha=0.1) if cls is Neumann else cls()
    res = solver(nan_matvec, torch.ones(2, 4, dtype=F64))
    assert (res.status == Status.NONFINITE).all(), res.status
    assert not res.converged.any()


def test_direct_singular_systems():
    A = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64))
    consistent = Direct()(mv(A), torch.tensor([2.0, 3.0, 0.0], dtype=F64))
    assert consistent.all_converged
    torch.testing.assert_close(consistent.x, torch.tensor([1.0, 3.0, 0.0], dtype=F64))
    inconsistent = Direct()(mv(A), torch.tensor([2.0, 3.0, 5.0], dtype=F64))
    assert int(inconsistent.status) == Status.SINGULAR
    torch.testing.assert_close(inconsistent.x, torch.tensor([1.0, 3.0, 0.0], dtype=F64))
    torch.testing.assert_close(inconsistent.residual_norm, torch.tensor(5.0, dtype=F64))


def test_direct_handles_matvec_that_vmap_cannot_trace():
    A = spd(6, 4)

    def host_matvec(v):  # a round trip through numpy: not traceable by vmap
        return torch.from_numpy(A.numpy() @ v.detach().numpy())

    b = torch.arange(6, dtype=F64)
    torch.testing.assert_close(Direct()(host_matvec, b).x, torch.linalg.solve(A, b))


def test_zero_rhs_and_exact_x0():
    A = spd(5, 2)
    for cls in ITERATIVE:
        solver = cls(alpha=0.5) if cls is Neumann else cls()
        zero = solver(mv(A), torch.zeros(5, dtype=F64))
        assert zero.all_converged and int(zero.iterations) == 0
        assert torch.equal(zero.x, torch.zeros(5, dtype=F64))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(5, 30), seed=st.integers(0, 10_000),
       logcond=st.floats(0.5, 3.0), rtol=st.sampled_from([1e-4, 1e-6, 1e-8]))
def test_cg_iterations_match_scipy(n, seed, logcond, rtol):
    A = spd(n, seed, cond=10.0 ** logcond)
    b = np.random.default_rng(seed + 1).standard_normal(n)
    count = [0]

    def callback(_):
        count[0] += 1

    _, info = sla.cg(A.numpy(), b, rtol=rtol, maxiter=10 * n, callback=callback)
    assert info == 0
    res = CG(rtol=rtol)(mv(A), torch.tensor(b))
    assert res.all_converged
    ours = int(res.iterations)
    assert abs(ours - count[0]) <= 0.1 * count[0] + 2, (ours, count[0])


@pytest.mark.parametrize("kwargs,error", [
    ({"rtol": -1.0}, ValueError),
    ({"atol": float("nan")}, ValueError),
    ({"ridge": -0.1}, ValueError),
    ({"maxiter": 0}, ValueError),
    ({"maxiter": 2.5}, TypeError),
    ({"maxiter": True}, TypeError),
    ({"rtol": "small"}, TypeError),
    ({"M": 3}, TypeError),
    ({"history": 1}, TypeError),
])
@pytest.mark.parametrize("cls", ITERATIVE)
def test_constructor_validation(cls, kwargs, error):
    with pytest.raises(error):
        cls(**kwargs)


@pytest.mark.parametrize("cls,kwargs,error", [
    (GMRES, {"restart": 0}, ValueError),
    (GMRES, {"restart": None}, TypeError),
    (Neumann, {"alpha": 0.0}, ValueError),
    (Neumann, {"alpha": -1.0}, ValueError),
    (Neumann, {"divergence_factor": 0.0}, ValueError),
    (Direct, {"ridge": -1.0}, ValueError),
    (Direct, {"rtol": float("inf")}, ValueError),
])
def test_solver_specific_validation(cls, kwargs, error):
    with pytest.raises(error):
        cls(**kwargs)


def test_call_validation():
    A = spd(4, 0)
    solver = CG()
    with pytest.raises(ValueError, match="shaped like its input"):
        solver(lambda v: v[..., :2], torch.ones(4, dtype=F64))
    with pytest.raises(TypeError, match="floating"):
        solver(mv(A), torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="x0"):
        solver(mv(A), torch.ones(4, dtype=F64), x0=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="0-d"):
        solver(mv(A), torch.tensor(1.0))


def test_solvers_are_frozen_protocol_instances():
    for solver in (CG(), MINRES(), GMRES(), BiCGSTAB(), Neumann(), Direct()):
        assert isinstance(solver, LinearSolver)
        with pytest.raises(dataclasses.FrozenInstanceError):
            solver.rtol = 1.0  # type: ignore[misc]
    assert CG() == CG() and hash(CG(rtol=1e-3)) == hash(CG(rtol=1e-3))


def test_is_vmapped():
    x = torch.ones(3, 2)
    assert not is_vmapped(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(is_vmapped(t)) or t)(x)
    torch.func.grad(lambda t: seen.append(is_vmapped(t)) or t.sum())(x[0])
    torch.func.vmap(torch.func.grad(lambda t: seen.append(is_vmapped(t)) or t.sum()))(x)
    assert seen == [True, False, True]


def test_status_codes_describe_themselves():
    for status in Status:
        assert status.describe()


def test_solvers_by_name_cover_every_solver_and_solve_an_spd_system():
    from bilevel.solvers import SOLVERS

    assert set(SOLVERS.values()) == {CG, MINRES, GMRES, BiCGSTAB, Neumann, Direct, NormalCG}
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for name, cls in SOLVERS.items():
        options = {} if cls is Direct else {"rtol": 1e-10, "maxiter": 500}
        if cls is Neumann:
            options["alpha"] = 0.5  # spectral radius of I - A/2 below 1
        solver = cls(**options)
        assert isinstance(solver, LinearSolver), name
        result = solver(lambda v: v @ A.T, b)
        torch.testing.assert_close(result.x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
