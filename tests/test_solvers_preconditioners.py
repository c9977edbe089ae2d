"""Jacobi preconditioning and the Hutchinson diagonal estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.solvers import CG, GMRES, MINRES, BiCGSTAB, Neumann, hutchinson_diagonal, jacobi

F64 = torch.float64


def mv(A: torch.Tensor):
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def badly_scaled(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    """``D^(1/2) S D^(1/2)``: diagonally dominant SPD ``S``, scales spanning 1e5."""
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(batch):
        E = rng.uniform(-1, 1, (n, n))
        S = (E + E.T) / 2
        S += np.diag(np.abs(S).sum(1) + 1.0)
        d = np.sqrt(np.logspace(0, 5, n)[rng.permutation(n)])
        mats.append(d[:, None] * S * d[None, :])
    return torch.tensor(np.stack(mats), dtype=F64)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(8, 30), seed=st.integers(0, 10_000))
def test_jacobi_cg_takes_fewer_iterations(n, seed):
    A = badly_scaled(n, seed, batch=2)
    b = torch.tensor(np.random.default_rng(seed).standard_normal((2, n)), dtype=F64)
    plain = CG(rtol=1e-8, maxiter=50 * n)(mv(A), b)
    pre = CG(rtol=1e-8, maxiter=50 * n, M=jacobi(torch.diagonal(A, dim1=-2, dim2=-1)))(mv(A), b)
    assert pre.all_converged, pre.failures()
    assert (pre.iterations < plain.iterations).all()
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("solver", [MINRES(rtol=1e-9), GMRES(rtol=1e-9),
                                    BiCGSTAB(rtol=1e-9), Neumann(alpha=0.5, rtol=1e-9,
                                                                 maxiter=4000)],
                         ids=["MINRES", "GMRES", "BiCGSTAB", "Neumann"])
def test_preconditioned_solvers_solve_the_original_system(solver):
    A = badly_scaled(12, 1)[0]
    b = torch.linspace(-1, 1, 12, dtype=F64)
    M = jacobi(torch.diagonal(A))
    res = type(solver)(**{**solver.__dict__, "M": M})(mv(A), b)
    assert res.all_converged, res.failures()
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-9)
    # The stopping test is on the unpreconditioned residual ||b - A x||.
    assert float(res.residual_norm) <= 1.01e-9 * float(torch.linalg.vector_norm(b))


def test_jacobi_guards_zero_and_nonfinite_entries():
    M = jacobi(torch.tensor([2.0, 0.0, float("inf"), -4.0]))
    out = M(torch.ones(4))
    torch.testing.assert_close(out, torch.tensor([0.5, 1.0, 1.0, -0.25]))
    with pytest.raises(TypeError):
        jacobi(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        jacobi(torch.tensor(1.0))


def test_hutchinson_exact_for_diagonal_operators():
    d = torch.linspace(1, 5, 7, dtype=F64)
    est = hutchinson_diagonal(lambda v: d * v, torch.zeros(7, dtype=F64), num_samples=1)
    torch.testing.assert_close(est, d)


@settings(max_examples=5, deadline=None)
@given(n=st.integers(4, 20), seed=st.integers(0, 10_000))
def test_hutchinson_close_with_many_samples(n, seed):
    A = badly_scaled(n, seed, batch=2)
    like = torch.zeros(2, n, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    est = hutchinson_diagonal(mv(A), like, num_samples=4000, generator=gen)
    true = torch.diagonal(A, dim1=-2, dim2=-1)
    # Standard error of entry i: ||A_i,offdiag|| / sqrt(samples).
    off = torch.linalg.vector_norm(A - torch.diag_embed(true), dim=-1)
    assert ((est - true).abs() <= 5 * off / 4000 ** 0.5 + 1e-12).all()
    assert est.shape == like.shape and est.dtype == F64


def test_hutchinson_reproducible_and_validated():
    A = badly_scaled(6, 0)[0]
    like = torch.zeros(6, dtype=F64)
    one = hutchinson_diagonal(mv(A), like, 16, torch.Generator().manual_seed(1))
    two = hutchinson_diagonal(mv(A), like, 16, torch.Generator().manual_seed(1))
    assert torch.equal(one, two)
    with pytest.raises(ValueError):
        hutchinson_diagonal(mv(A), like, num_samples=0)
    with pytest.raises(TypeError):
        hutchinson_diagonal(mv(A), torch.zeros(6, dtype=torch.int64))


def test_hutchinson_jacobi_end_to_end():
    A = badly_scaled(20, 5)[0]
    b = torch.ones(20, dtype=F64)
    diag = hutchinson_diagonal(mv(A), b, num_samples=200,
                               generator=torch.Generator().manual_seed(0))
    plain = CG(rtol=1e-8, maxiter=2000)(mv(A), b)
    pre = CG(rtol=1e-8, maxiter=2000, M=jacobi(diag))(mv(A), b)
    assert pre.all_converged and int(pre.iterations) < int(plain.iterations)
