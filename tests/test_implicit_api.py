"""The implicit-differentiation API: forward mode, has_aux, keywords, fixed points, solvers by name,
the normal-equations solver, vmap that stops when converged, and an optional initial_inner.

Everything in float64 against closed forms (ridge: ``w* = H^{-1} X^T y / m``; the linear
contraction ``z* = (I - W)^{-1} (U theta + b)``) or against unrolled differentiation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel
from bilevel import solvers
from bilevel.testing import strategies as bst
from bilevel.testing.strategies import operator_matrix

F64 = torch.float64


def ridge_parts(features: int, samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, features, generator=g, dtype=F64)
    y = torch.randn(samples, generator=g, dtype=F64)
    lam = 0.3 * torch.randn(features, generator=g, dtype=F64)
    return X, y, lam


def inner_loss(w, lam, X, y):
    return 0.5 * (X @ w - y).pow(2).mean() + 0.5 * (lam.exp() * w * w).sum()


def exact_ridge(lam, X, y):
    m = X.shape[0]
    return torch.linalg.solve(X.T @ X / m + torch.diag(lam.exp()), X.T @ y / m)


def implicit_ridge(solver="cg", **options):
    @bilevel.implicit_root(torch.func.grad(inner_loss), solver=solver, **options)
    def ridge(lam, X, y):
        return exact_ridge(lam, X, y)

    return ridge


ridge_shapes = st.tuples(st.integers(1, 5), st.integers(1, 12), bst.seeds())


# ----------------------------------------------------------------- forward mode

@settings(max_examples=15)
@given(shape=ridge_shapes, solver=st.sampled_from(("cg", "minres", "gmres", "direct", "normal_cg")))
def test_forward_mode_matches_the_closed_form(shape, solver):
    X, y, lam = ridge_parts(*shape)
    chosen = solvers.Direct() if solver == "direct" else type(solvers.get_solver(solver))(rtol=1e-12)
    ridge = implicit_ridge(chosen)
    tangent = torch.randn(lam.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, got = torch.func.jvp(lambda l: ridge(l, X, y), (lam,), (tangent,))
    _, want = torch.func.jvp(lambda l: exact_ridge(l, X, y), (lam,), (tangent,))
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # jacfwd (vmap over jvp) and jvp through a data argument too
    torch.testing.assert_close(torch.func.jacfwd(ridge)(lam, X, y), torch.func.jacfwd(exact_ridge)(lam, X, y),
                               rtol=1e-8, atol=1e-10)
    _, got_x = torch.func.jvp(lambda a: ridge(lam, a, y), (X,), (torch.ones_like(X),))
    _, want_x = torch.func.jvp(lambda a: exact_ridge(lam, a, y), (X,), (torch.ones_like(X),))
    torch.testing.assert_close(got_x, want_x, rtol=1e-8, atol=1e-10)


@settings(max_examples=8)
@given(shape=ridge_shapes)
def test_hessian_through_implicit_root(shape):
    X, y, lam = ridge_parts(*shape)
    ridge = implicit_ridge(solvers.CG(rtol=1e-13))
    got = torch.func.hessian(lambda l: ridge(l, X, y).pow(2).sum())(lam)
    want = torch.func.hessian(lambda l: exact_ridge(l, X, y).pow(2).sum())(lam)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_forward_mode_reports_a_failed_solve():
    X, y, lam = ridge_parts(4, 10, 0)
    ridge = implicit_ridge(solvers.CG(maxiter=1), on_failure="raise")
    with pytest.raises(bilevel.ConvergenceError, match="MAX_ITERATIONS"):
        torch.func.jvp(lambda l: ridge(l, X, y), (lam,), (torch.ones_like(lam),))


# --------------------------------------------------------- has_aux and keywords

def test_has_aux_returns_aux_and_differentiates_the_solution_only():
    X, y, lam = ridge_parts(3, 9, 2)

    @bilevel.implicit_root(torch.func.grad(inner_loss), solver="direct", has_aux=True)
    def ridge(lam, X, y):
        w, steps = torch.zeros(3, dtype=F64), 0
        while steps < 10_000:
            g = torch.func.grad(inner_loss)(w, lam, X, y)
            if float(g.norm()) < 1e-13:
                break
            w, steps = w - 0.5 * g, steps + 1
        return w, {"steps": steps, "final_grad": g}

    theta = lam.clone().requires_grad_()
    w, aux = ridge(theta, X, y)
    assert aux["steps"] > 0 and not aux["final_grad"].requires_grad
    w.pow(2).sum().backward()
    torch.testing.assert_close(theta.grad, torch.func.grad(lambda l: exact_ridge(l, X, y).pow(2).sum())(lam),
                               rtol=1e-8, atol=1e-10)
    with pytest.raises(bilevel.BilevelError, match="has_aux=True"):
        bilevel.implicit_root(torch.func.grad(inner_loss))(lambda lam, X, y: (exact_ridge(lam, X, y), 3))(lam, X, y)
    with pytest.raises(bilevel.BilevelError, match=r"\(solution, aux\)"):
        bilevel.implicit_root(torch.func.grad(inner_loss), has_aux=True)(exact_ridge)(lam, X, y)


@settings(max_examples=10)
@given(shape=ridge_shapes, style=st.sampled_from(("keywords", "mixed", "positional")))
def test_keyword_tensors_are_differentiable(shape, style):
    X, y, lam = ridge_parts(*shape)
    ridge = implicit_ridge(solvers.CG(rtol=1e-12))
    theta, data = lam.clone().requires_grad_(), X.clone().requires_grad_()
    if style == "keywords":
        w = ridge(lam=theta, X=data, y=y)
    elif style == "mixed":
        w = ridge(theta, data, y=y)
    else:
        w = ridge(theta, data, y)
    w.pow(2).sum().backward()
    want_lam, want_x = torch.func.grad(lambda l, a: exact_ridge(l, a, y).pow(2).sum(), argnums=(0, 1))(lam, X)
    torch.testing.assert_close(theta.grad, want_lam, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(data.grad, want_x, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ fixed points

@settings(max_examples=15)
@given(case=bst.contraction_problems(), mode=st.sampled_from(("reverse", "forward")))
def test_implicit_fixed_point_matches_the_closed_form(case, mode):
    d = case.data

    @bilevel.implicit_fixed_point(lambda z, theta: d["W"] @ z + d["U"] @ theta + d["b"],
                                  solver=solvers.GMRES(rtol=1e-12))
    def fixed_point(theta):
        return case.problem.solve_inner(theta, d, None)

    def exact(theta):
        n = d["W"].shape[0]
        return torch.linalg.solve(torch.eye(n, dtype=F64) - d["W"], d["U"] @ theta + d["b"])

    jac = torch.func.jacrev if mode == "reverse" else torch.func.jacfwd
    torch.testing.assert_close(jac(fixed_point)(case.outer), jac(exact)(case.outer), rtol=1e-8, atol=1e-10)


def test_deep_equilibrium_layer_matches_unrolled_differentiation():
    g = torch.Generator().manual_seed(0)
    W = 0.4 * torch.randn(6, 6, generator=g, dtype=F64) / 6 ** 0.5
    x = torch.randn(6, generator=g, dtype=F64)

    def layer(z, W, x):
        return torch.tanh(W @ z + x)

    def unrolled(W, x):
        z = torch.zeros_like(x)
        for _ in range(200):
            z = layer(z, W, x)
        return z

    by_default = bilevel.implicit_fixed_point(layer)(unrolled)
    assert isinstance(by_default.solver, solvers.GMRES) and by_default.mapping is layer
    equilibrium = bilevel.implicit_fixed_point(layer, solvers.GMRES(rtol=1e-11))(unrolled)
    got = torch.func.jacrev(equilibrium, argnums=(0, 1))(W, x)
    want = torch.func.jacrev(unrolled, argnums=(0, 1))(W, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # The default CG on z - T(z) now refuses instead of returning a wrong gradient.
    with pytest.raises(bilevel.ConvergenceError, match="NONSYMMETRIC"):
        wrong = bilevel.implicit_root(lambda z, W, x: z - layer(z, W, x), on_failure="raise")(unrolled)
        Wg = W.clone().requires_grad_()
        wrong(Wg, x).sum().backward()


# --------------------------------------------------------------- solvers by name

@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_every_solver_by_name_in_implicit_root(name):
    X, y, lam = ridge_parts(3, 12, 4)
    want = torch.func.grad(lambda l: exact_ridge(l, X, y).pow(2).sum())(lam)
    theta = lam.clone().requires_grad_()
    implicit_ridge(name)(theta, X, y).pow(2).sum().backward()
    torch.testing.assert_close(theta.grad, want, rtol=1e-3, atol=1e-6)


def test_solver_names_and_classes_get_clear_errors():
    X, y, lam = ridge_parts(3, 12, 4)
    with pytest.raises(TypeError, match=r"pass CG\(\), not CG"):
        bilevel.implicit_root(torch.func.grad(inner_loss), solver=solvers.CG)
    with pytest.raises(ValueError, match="unknown solver 'lsqr'.*normal_cg"):
        bilevel.implicit_root(torch.func.grad(inner_loss), solver="lsqr")
    assert isinstance(solvers.get_solver("GMRES"), solvers.GMRES)
    assert solvers.get_solver(None) == solvers.CG()


# --------------------------------------------------------------------- NormalCG

@settings(max_examples=25)
@given(op=bst.linear_operators(max_dim=8), batch=st.sampled_from(((), (3,))), seed=bst.seeds())
def test_normal_cg_solves_every_kind_of_operator(op, batch, seed):
    b = torch.randn(*batch, op.matrix.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    result = solvers.NormalCG(rtol=1e-10, maxiter=200)(op.matvec, b)
    assert result.all_converged, result.failures()
    want = torch.linalg.solve(op.matrix, b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(result.x, want, rtol=1e-6, atol=1e-8)
    vmapped = torch.func.vmap(lambda v: solvers.NormalCG(rtol=1e-10, maxiter=200)(op.matvec, v).x)(b.reshape(-1, b.shape[-1]))
    torch.testing.assert_close(vmapped, want.reshape(-1, b.shape[-1]), rtol=1e-6, atol=1e-8)


def test_normal_cg_finds_the_least_squares_solution_and_says_singular():
    A = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64))
    result = solvers.NormalCG()(lambda v: v @ A.T, torch.tensor([2.0, 3.0, 5.0], dtype=F64))
    assert int(result.status) == solvers.Status.SINGULAR
    torch.testing.assert_close(result.x, torch.tensor([1.0, 3.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="no preconditioner"):
        solvers.NormalCG(M=lambda v: v)


# ------------------------------------------------------ vmap stops when converged

@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab", "normal_cg"])
def test_vmapped_solves_stop_when_every_member_has_converged(name):
    A = operator_matrix("spd", 30, 10.0, 0)
    calls = {"n": 0}

    def matvec(v):
        calls["n"] += 1
        return v @ A.T

    b = torch.randn(4, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    solver = type(solvers.get_solver(name))(rtol=1e-8)
    result = torch.func.vmap(lambda v: solver(matvec, v))(b)
    assert bool(result.converged.all())
    # scipy's default cap would be 10 n = 300 iterations; the batch stops with its slowest member.
    assert calls["n"] <= 2 * int(result.iterations.max()) + 6 < 300
    # Rounding differs between a batched and a single product, so the two may stop an iteration
    # apart: both are within the tolerance of the solution.
    want = torch.linalg.solve(A, b.T).T
    torch.testing.assert_close(result.x, want, rtol=1e-6, atol=1e-8)


def test_jacrev_through_implicit_root_costs_iterations_not_maxiter():
    X, y, lam = ridge_parts(24, 80, 3)
    calls = {"n": 0}

    def optimality(w, lam, X, y):
        calls["n"] += 1
        return torch.func.grad(inner_loss)(w, lam, X, y)

    ridge = bilevel.implicit_root(optimality)(exact_ridge)
    got = torch.func.jacrev(ridge)(lam, X, y)
    torch.testing.assert_close(got, torch.func.jacrev(exact_ridge)(lam, X, y), rtol=1e-4, atol=1e-6)
    assert calls["n"] < 60  # CG's default cap is 10 n = 240 vector-Jacobian products


# ------------------------------------------------------------- optional start

class ClosedFormRidge(bilevel.BilevelProblem):
    def inner_objective(self, w, lam, data):
        return inner_loss(w, lam, *data)

    def outer_objective(self, w, lam, data):
        return w.pow(2).sum()

    def solve_inner(self, lam, data, init):
        assert init is None
        return exact_ridge(lam, *data)


def test_initial_inner_is_optional_for_a_closed_form_solve_inner():
    X, y, lam = ridge_parts(3, 10, 5)
    result = bilevel.hypergradient(ClosedFormRidge(), lam, (X, y), solver=solvers.CG(rtol=1e-12))
    want = torch.func.grad(lambda l: exact_ridge(l, X, y).pow(2).sum())(lam)
    torch.testing.assert_close(result.grad, want, rtol=1e-8, atol=1e-10)
    for mode in ("unrolled", "first_order"):
        with pytest.raises(bilevel.BilevelError, match="initial_inner"):
            bilevel.hypergradient(ClosedFormRidge(), lam, (X, y), mode=mode)


def test_check_hypergradient_accepts_a_has_aux_function():
    from bilevel.testing import check_hypergradient

    X, y, lam = ridge_parts(3, 10, 6)

    @bilevel.implicit_root(torch.func.grad(inner_loss), solver=solvers.CG(rtol=1e-12), has_aux=True)
    def ridge(lam, X, y):
        return exact_ridge(lam, X, y), {"note": "closed form"}

    report = check_hypergradient(ridge, lam, (X, y), outer_loss=lambda w, lam, X, y: w.pow(2).sum())
    assert report.passed, report


def test_an_argument_the_condition_ignores_gets_a_zero_gradient_under_vmap():
    """Its cross term is an unbatched zero while the solve's status is batched."""
    X, y, lam = ridge_parts(3, 10, 7)

    @bilevel.implicit_root(lambda w, lam, unused, X, y: torch.func.grad(inner_loss)(w, lam, X, y),
                           solver=solvers.CG(rtol=1e-12))
    def ridge(lam, unused, X, y):
        return exact_ridge(lam, X, y)

    ys = torch.stack([y, 2 * y])
    loss = lambda l, u, yy: ridge(l, u, X, yy).pow(2).sum()  # noqa: E731
    got_lam, got_unused = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(
        lam, torch.ones(2, dtype=F64), ys)
    want = torch.stack([torch.func.grad(lambda l: exact_ridge(l, X, yy).pow(2).sum())(lam) for yy in ys])
    torch.testing.assert_close(got_lam, want, rtol=1e-8, atol=1e-10)
    assert torch.equal(got_unused, torch.zeros(2, 2, dtype=F64))
