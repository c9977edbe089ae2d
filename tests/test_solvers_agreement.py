"""Solutions agree with scipy.sparse.linalg and torch.linalg.solve; batching and vmap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.solvers import CG, GMRES, MINRES, BiCGSTAB, Direct, Neumann, SolveResult, Status

F64 = torch.float64


def matrix(kind: str, n: int, seed: int) -> np.ndarray:
    """A random ``n x n`` matrix of the given family, condition number <= ~1e4."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    if kind == "spd":
        return Q @ np.diag(rng.uniform(1.0, 10.0, n)) @ Q.T
    if kind == "ill":
        return Q @ np.diag(np.logspace(0, 4, n)) @ Q.T
    if kind == "indefinite":
        eig = rng.uniform(1.0, 10.0, n) * rng.choice([-1.0, 1.0], n)
        eig[0] = abs(eig[0])
        eig[-1] = -abs(eig[-1])
        return Q @ np.diag(eig) @ Q.T
    if kind == "nonsymmetric":
        return rng.standard_normal((n, n)) / np.sqrt(n) + 2.0 * np.eye(n)
    raise ValueError(kind)


def batch_of(kind: str, n: int, seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    A = np.stack([matrix(kind, n, seed + i) for i in range(batch)])
    b = np.random.default_rng(seed + 999).standard_normal((batch, n))
    return torch.tensor(A, dtype=F64), torch.tensor(b, dtype=F64)


def mv(A: torch.Tensor):
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def true_residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(b - mv(A)(x), dim=-1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((torch.linalg.vector_norm(x - ref, dim=-1)
                  / torch.linalg.vector_norm(ref, dim=-1)).max())


# (solver, matrix families it is meant for, scipy counterpart)
CASES = [
    (CG(rtol=1e-10), ["spd", "ill"], sla.cg),
    (MINRES(rtol=1e-10), ["spd", "indefinite"], sla.minres),
    (GMRES(rtol=1e-10, restart=30), ["spd", "nonsymmetric", "indefinite"], sla.gmres),
    (GMRES(rtol=1e-10, restart=5, maxiter=2000), ["nonsymmetric"], sla.gmres),
    (BiCGSTAB(rtol=1e-10), ["spd", "nonsymmetric"], sla.bicgstab),
    (Direct(), ["spd", "ill", "indefinite", "nonsymmetric"], None),
]
PAIRS = [(solver, kind, ref) for solver, kinds, ref in CASES for kind in kinds]
IDS = [f"{type(s).__name__}-{getattr(s, 'restart', '')}-{k}" for s, k, _ in PAIRS]


@pytest.mark.parametrize("solver,kind,reference", PAIRS, ids=IDS)
@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 10_000), batch=st.sampled_from([None, 3]))
def test_agrees_with_torch_and_scipy(solver, kind, reference, n, seed, batch):
    A, b = batch_of(kind, n, seed, batch or 1)
    if batch is None:
        A, b = A[0], b[0]
    res = solver(mv(A), b)
    assert res.x.shape == b.shape
    assert res.converged.shape == b.shape[:-1] == res.status.shape
    assert res.iterations.dtype == torch.int64 and res.status.dtype == torch.int64
    assert res.all_converged, res.failures()
    assert (res.status == Status.CONVERGED).all()
    cond = float(torch.linalg.cond(A).max())
    assert rel_err(res.x, torch.linalg.solve(A, b)) <= 1e-9 * cond + 1e-12
    # The reported residual is the true one.
    torch.testing.assert_close(res.residual_norm, true_residual(A, res.x, b),
                               rtol=1e-6, atol=1e-14)
    if not isinstance(solver, Direct):
        assert (res.residual_norm <= 1.01e-10 * torch.linalg.vector_norm(b, dim=-1)).all()
    if reference is not None:
        A2, b2 = A.reshape(-1, n, n), b.reshape(-1, n)
        for i in range(A2.shape[0]):
            ref, info = reference(A2[i].numpy(), b2[i].numpy(), rtol=1e-10, maxiter=20 * n)
            if info == 0:
                got = res.x.reshape(-1, n)[i]
                assert rel_err(got, torch.tensor(ref)) <= 1e-8 * cond + 1e-12


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 10_000))
def test_neumann_agrees_on_contractions(n, seed):
    A, b = batch_of("spd", n, seed, 2)
    alpha = 1.0 / float(torch.linalg.eigvalsh(A).max())
    res = Neumann(alpha=alpha, rtol=1e-9, maxiter=5000)(mv(A), b)
    assert res.all_converged, res.failures()
    assert rel_err(res.x, torch.linalg.solve(A, b)) <= 1e-7
    torch.testing.assert_close(res.residual_norm, true_residual(A, res.x, b),
                               rtol=1e-6, atol=1e-14)


SOLVERS = [
    (CG(rtol=1e-9), "spd"),
    (MINRES(rtol=1e-9), "indefinite"),
    (GMRES(rtol=1e-9, restart=4, maxiter=600), "nonsymmetric"),
    (BiCGSTAB(rtol=1e-9), "nonsymmetric"),
    (Neumann(alpha=0.09, rtol=1e-9, maxiter=2000), "spd"),
    (Direct(), "nonsymmetric"),
]
SOLVER_IDS = [type(s).__name__ for s, _ in SOLVERS]


@pytest.mark.parametrize("solver,kind", SOLVERS, ids=SOLVER_IDS)
@settings(max_examples=5, deadline=None)
@given(n=st.integers(2, 20), seed=st.integers(0, 10_000))
def test_batched_equals_per_system(solver, kind, n, seed):
    A, b = batch_of(kind, n, seed, 4)

    def rowwise(M):  # the same reduction order whatever the batch shape
        return lambda v: (M * v.unsqueeze(-2)).sum(-1)

    batched = solver(rowwise(A), b)
    for i in range(4):
        single = solver(rowwise(A[i]), b[i])
        torch.testing.assert_close(batched.x[i], single.x, rtol=1e-12, atol=1e-14)
        assert int(batched.iterations[i]) == int(single.iterations)
        assert int(batched.status[i]) == int(single.status)


@pytest.mark.parametrize("solver,kind", SOLVERS, ids=SOLVER_IDS)
@settings(max_examples=3, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_vmap_equals_batched(solver, kind, n, seed):
    A, b = batch_of(kind, n, seed, 3)
    batched = solver(mv(A), b)
    mapped = torch.func.vmap(lambda A1, b1: solver(lambda v: A1 @ v, b1))(A, b)
    assert isinstance(mapped, SolveResult) and mapped.history is None
    torch.testing.assert_close(mapped.x, batched.x, rtol=1e-10, atol=1e-13)
    assert torch.equal(mapped.iterations, batched.iterations)
    assert torch.equal(mapped.status, batched.status)
    torch.testing.assert_close(mapped.residual_norm, batched.residual_norm)


@pytest.mark.parametrize("solver,kind", SOLVERS[:-1], ids=SOLVER_IDS[:-1])
def test_converged_system_does_not_move(solver, kind):
    """A system that starts converged keeps its x bit for bit while the others iterate."""
    A, b = batch_of(kind, 10, 7, 3)
    x_star = torch.linalg.solve(A, b)
    x0 = torch.zeros_like(b)
    x0[1] = x_star[1]
    b = b.clone()
    b[1] = mv(A[1])(x_star[1])  # x0[1] solves its system to rounding
    res = solver(mv(A), b, x0=x0)
    assert torch.equal(res.x[1], x0[1])
    assert int(res.iterations[1]) == 0
    assert (res.iterations[[0, 2]] > 0).all()
    assert res.all_converged, res.failures()


@pytest.mark.parametrize("solver,kind", SOLVERS[:-1], ids=SOLVER_IDS[:-1])
def test_history_records_residuals(solver, kind):
    A, b = batch_of(kind, 8, 3, 2)
    hist_solver = type(solver)(**{**solver.__dict__, "history": True, "maxiter": 50})
    res = hist_solver(mv(A), b)
    assert res.history is not None and res.history.shape == (51, 2)
    torch.testing.assert_close(res.history[0], torch.linalg.vector_norm(b, dim=-1))
    assert res.history.isfinite().all()
    assert solver(mv(A), b).history is None
    # Under vmap the history's batch dimension is its second one.
    mapped = torch.func.vmap(lambda A1, b1: hist_solver(lambda v: A1 @ v, b1),
                             out_dims=SolveResult(0, 0, 0, 0, 0, 1))(A, b)
    torch.testing.assert_close(mapped.history, res.history)


def test_float32_cg_and_gmres():
    A, b = batch_of("spd", 20, 11, 2)
    x_star = torch.linalg.solve(A, b)
    for solver in (CG(rtol=1e-5), GMRES(rtol=1e-5), MINRES(rtol=1e-5), BiCGSTAB(rtol=1e-5)):
        res = solver(mv(A.float()), b.float())
        assert res.x.dtype == torch.float32 and res.residual_norm.dtype == torch.float32
        assert res.all_converged, res.failures()
        assert rel_err(res.x.double(), x_star) < 1e-4


def test_ridge_solves_damped_system():
    A, b = batch_of("indefinite", 12, 5, 2)
    shift = 12.0  # all eigenvalues of A + 12 I are positive
    damped = A + shift * torch.eye(12, dtype=F64)
    for solver in (CG(rtol=1e-10, ridge=shift), MINRES(rtol=1e-10, ridge=shift),
                   GMRES(rtol=1e-10, ridge=shift), Direct(ridge=shift)):
        res = solver(mv(A), b)
        assert res.all_converged
        assert rel_err(res.x, torch.linalg.solve(damped, b)) < 1e-8
        torch.testing.assert_close(res.residual_norm, true_residual(damped, res.x, b))


def test_solver_under_func_grad_matches_adjoint_solve():
    A, b = batch_of("spd", 9, 2, 1)
    A, b = A[0], b[0]
    expected = torch.linalg.solve(A.T, torch.ones(9, dtype=F64))
    for solver in (CG(rtol=1e-12), MINRES(rtol=1e-12), GMRES(rtol=1e-12),
                   BiCGSTAB(rtol=1e-12), Direct()):
        grad = torch.func.grad(lambda bb, s=solver: s(lambda v: A @ v, bb).x.sum())(b)
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
