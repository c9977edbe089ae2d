"""The core API: structures, modes, call counts, vmap, and every error path of bilevel.hypergradient."""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import pytest
import torch
from torch import nn

import bilevel
from bilevel import BilevelError, BilevelProblem, ConvergenceError, ConvergenceWarning, NonFiniteError
from bilevel.solvers import CG, Direct
from bilevel.solvers.minimize import MinimizeStatus

DT = torch.float64


def make_data(n: int = 12, p: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=DT) for shape in [(n, p), (n,), (n, p), (n,)])


class Ridge(BilevelProblem):
    """Inner: ridge with per-feature penalties exp(lam); outer: validation squared error."""

    inner_lr = 0.02
    inner_steps = 3000
    inner_tol = 1e-12

    def inner_objective(self, w, lam, data):
        X, y, _, _ = data
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (torch.exp(lam) * w**2).sum()

    def outer_objective(self, w, lam, data):
        _, _, Xv, yv = data
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    def initial_inner(self, lam, data):
        return torch.zeros(data[0].shape[1], dtype=data[0].dtype)


class ClosedFormRidge(Ridge):
    """Same problem with an exact inner solve, so counts concern the hypergradient only."""

    def __init__(self):
        self.optimality_calls = 0

    def optimality(self, w, lam, data):
        self.optimality_calls += 1
        return super().optimality(w, lam, data)

    def solve_inner(self, lam, data, init):
        X, y, _, _ = data
        return torch.linalg.solve(X.T @ X + torch.diag(torch.exp(lam)), X.T @ y)


def ridge_reference(lam, data):
    X, y, Xv, yv = data

    def loss(lam):
        w = torch.linalg.solve(X.T @ X + torch.diag(torch.exp(lam)), X.T @ y)
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    return torch.func.grad(loss)(lam)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_modes_match_closed_form(mode):
    data = make_data()
    lam = torch.linspace(-0.5, 0.5, 4, dtype=DT)
    kwargs = {"solver": CG(rtol=1e-12)} if mode == "implicit" else {}
    result = bilevel.hypergradient(Ridge(), lam, data, mode=mode, **kwargs)
    assert rel(result.grad, ridge_reference(lam, data)) < 1e-8
    assert float(result.inner_residual) < 1e-9


def test_truncated_approaches_unrolled_and_first_order_is_direct_term():
    data = make_data()
    lam = torch.zeros(4, dtype=DT)
    ref = ridge_reference(lam, data)
    short = bilevel.hypergradient(Ridge(), lam, data, mode="truncated", truncate=5)
    long = bilevel.hypergradient(Ridge(), lam, data, mode="truncated", truncate=400)
    assert rel(long.grad, ref) < rel(short.grad, ref)
    # The initialization does not depend on lam and f has no direct lam term: zero, and said so.
    with pytest.warns(bilevel.BilevelWarning, match="all-zero hypergradient"):
        first = bilevel.hypergradient(Ridge(), lam, data, mode="first_order")
    assert torch.equal(first.grad, torch.zeros_like(lam))


def test_linearization_built_once_and_one_vjp_per_iteration():
    problem = ClosedFormRidge()
    calls = {"matvec": 0}
    cg = CG(rtol=1e-12)

    def counting_solver(matvec, b, x0=None):
        def counted(v):
            calls["matvec"] += 1
            return matvec(v)
        return cg(counted, b, x0)

    data = make_data()
    result = bilevel.hypergradient(problem, torch.zeros(4, dtype=DT), data, solver=counting_solver)
    assert problem.optimality_calls == 1
    assert calls["matvec"] <= int(result.solve.iterations) + 2
    assert rel(result.grad, ridge_reference(torch.zeros(4, dtype=DT), data)) < 1e-10


@pytest.mark.parametrize("linearization", ["auto", "functional"])
def test_cross_term_reuses_the_solvers_last_application(monkeypatch, linearization):
    """Exactly one VJP per CG iteration plus the true residual's: (d_theta G)^T v is taken from that
    last application at the solution, and equals a fresh VJP (Direct never applies the operator at x)."""
    hg = importlib.import_module("bilevel.hypergradient")  # the module, not the function of that name
    calls = {"vjp": 0}
    real_linearize = hg.linearize

    def counting_linearize(*args):
        out, vjp_fn = real_linearize(*args)

        def counted(cotangent):
            calls["vjp"] += 1
            return vjp_fn(cotangent)
        return out, counted

    monkeypatch.setattr(hg, "linearize", counting_linearize)
    lam, data = torch.full((4,), 0.3, dtype=DT), make_data()
    iterative = bilevel.hypergradient(ClosedFormRidge(), lam, data, solver=CG(rtol=1e-12),
                                      linearization=linearization)
    assert calls["vjp"] == int(iterative.solve.iterations) + 1
    calls["vjp"] = 0
    direct = bilevel.hypergradient(ClosedFormRidge(), lam, data, solver=Direct(), linearization=linearization)
    assert calls["vjp"] >= 1
    torch.testing.assert_close(iterative.grad, direct.grad, rtol=1e-9, atol=1e-12)
    assert rel(iterative.grad, ridge_reference(lam, data)) < 1e-9

    def rescaling_solver(matvec, b, x0=None):  # applies A at x, then changes x in place
        result = CG(rtol=1e-12)(matvec, b)
        x = result.x.clone()
        x.mul_(0.5)
        matvec(x)
        x.mul_(2.0)
        return dataclasses.replace(result, x=x)

    custom = bilevel.hypergradient(ClosedFormRidge(), lam, data, solver=rescaling_solver)
    torch.testing.assert_close(custom.grad, direct.grad, rtol=1e-9, atol=1e-12)


def test_vmap_over_meta_batch_equals_loop():
    data = make_data()
    lams = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=DT) * 0.3
    problem = ClosedFormRidge()
    batched = torch.func.vmap(lambda lam: bilevel.hypergradient(problem, lam, data, solver=CG(rtol=1e-12)))(lams)
    looped = torch.stack([bilevel.hypergradient(problem, lam, data, solver=CG(rtol=1e-12)).grad for lam in lams])
    torch.testing.assert_close(batched.grad, looped, rtol=1e-10, atol=1e-12)
    assert batched.solve.converged.shape == (5,)
    bilevel.check_result(batched, on_failure="raise")


def test_vmap_over_task_data_unrolled():
    datas = [make_data(seed=s) for s in range(3)]
    stacked = tuple(torch.stack(parts) for parts in zip(*datas))
    problem = Ridge()
    problem.inner_steps = 200
    lam = torch.zeros(4, dtype=DT)
    batched = torch.func.vmap(lambda d: bilevel.hypergradient(problem, lam, d, mode="unrolled"))(stacked)
    looped = torch.stack([bilevel.hypergradient(problem, lam, d, mode="unrolled").grad for d in datas])
    torch.testing.assert_close(batched.grad, looped)


class DictRidge(BilevelProblem):
    """Inner and outer given as dicts: a weight and a bias, with two regularizers."""

    inner_lr = 0.02
    inner_steps = 4000
    inner_tol = 1e-12

    def inner_objective(self, inner, outer, data):
        X, y, _, _ = data
        r = X @ inner["w"] + inner["b"] - y
        return 0.5 * (r**2).sum() + 0.5 * torch.exp(outer["log_w"]) * (inner["w"] ** 2).sum() \
            + 0.5 * torch.exp(outer["log_b"]) * inner["b"] ** 2

    def outer_objective(self, inner, outer, data):
        _, _, Xv, yv = data
        return 0.5 * ((Xv @ inner["w"] + inner["b"] - yv) ** 2).sum()

    def initial_inner(self, outer, data):
        return {"w": torch.zeros(data[0].shape[1], dtype=DT), "b": torch.zeros((), dtype=DT)}


def test_dict_parameters_implicit_matches_unrolled():
    data = make_data()
    outer = {"log_w": torch.tensor(0.3, dtype=DT), "log_b": torch.tensor(-0.2, dtype=DT)}
    imp = bilevel.hypergradient(DictRidge(), outer, data, solver=CG(rtol=1e-12))
    unr = bilevel.hypergradient(DictRidge(), outer, data, mode="unrolled")
    assert set(imp.grad) == {"log_w", "log_b"}
    for key in outer:
        torch.testing.assert_close(imp.grad[key], unr.grad[key], rtol=1e-7, atol=1e-10)


class ModuleProblem(BilevelProblem):
    """iMAML-style: nn.Module parameters through functional_call, proximal to the outer ones."""

    inner_lr = 0.05
    inner_steps = 2000
    inner_tol = 1e-10

    def __init__(self, net):
        self.net = net

    def loss(self, params, x, y):
        return ((torch.func.functional_call(self.net, params, (x,)).squeeze(-1) - y) ** 2).mean()

    def inner_objective(self, inner, outer, data):
        x, y, _, _ = data
        prox = sum(((inner[k] - outer[k]) ** 2).sum() for k in inner)
        return self.loss(inner, x, y) + 0.5 * 2.0 * prox

    def outer_objective(self, inner, outer, data):
        _, _, xq, yq = data
        return self.loss(inner, xq, yq)

    def initial_inner(self, outer, data):
        return dict(outer)


def test_module_parameters_implicit_matches_unrolled_and_finite_differences():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    outer = bilevel.module_params(net)
    g = torch.Generator().manual_seed(3)
    x, xq = torch.randn(10, 1, generator=g, dtype=DT), torch.randn(10, 1, generator=g, dtype=DT)
    data = (x, torch.sin(x[:, 0]), xq, torch.sin(xq[:, 0]))
    problem = ModuleProblem(net)
    imp = bilevel.hypergradient(problem, outer, data, solver=CG(rtol=1e-12, maxiter=200))
    unr = bilevel.hypergradient(problem, outer, data, mode="unrolled")
    for k in outer:
        torch.testing.assert_close(imp.grad[k], unr.grad[k], rtol=1e-6, atol=1e-9)
    # central finite difference along a random direction
    direction = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in outer.items()}
    eps = 1e-5

    def value(t):
        shifted = {k: outer[k] + t * direction[k] for k in outer}
        return float(bilevel.hypergradient(problem, shifted, data, mode="first_order").outer_loss)

    fd = (value(eps) - value(-eps)) / (2 * eps)
    analytic = sum(float((imp.grad[k] * direction[k]).sum()) for k in outer)
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_float32_close_to_float64_closed_form():
    data = make_data()
    lam = torch.linspace(-0.5, 0.5, 4, dtype=DT)
    data32 = tuple(t.float() for t in data)
    result = bilevel.hypergradient(ClosedFormRidge(), lam.float(), data32, solver=CG(rtol=1e-6))
    assert result.grad.dtype == torch.float32
    assert rel(result.grad.double(), ridge_reference(lam, data)) < 1e-4


# ------------------------------------------------------------------ implicit_root

def ridge_objective(w, lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (torch.exp(lam) * w**2).sum()


@bilevel.implicit_root(torch.func.grad(ridge_objective), solver=CG(rtol=1e-12))
def ridge_solution(lam, X, y):
    return torch.linalg.solve(X.T @ X + torch.diag(torch.exp(lam)), X.T @ y)


def test_implicit_root_backward_grad_and_vmap():
    data = make_data()
    X, y, Xv, yv = data
    lam = torch.linspace(-0.3, 0.3, 4, dtype=DT).requires_grad_()
    w = ridge_solution(lam, X, y)
    (0.5 * ((Xv @ w - yv) ** 2).sum()).backward()
    ref = ridge_reference(lam.detach(), data)
    assert rel(lam.grad, ref) < 1e-10
    assert bool(ridge_solution.last_solve.converged)
    assert isinstance(ridge_solution.solver, CG) and callable(ridge_solution.optimality)

    def outer(lam):
        return 0.5 * ((Xv @ ridge_solution(lam, X, y) - yv) ** 2).sum()

    lams = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=DT) * 0.3
    batched = torch.func.vmap(torch.func.grad(outer))(lams)
    looped = torch.stack([ridge_reference(l, data) for l in lams])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)


def test_implicit_root_gradient_reaches_every_float_argument():
    X, y, Xv, yv = make_data()
    lam = torch.zeros(4, dtype=DT, requires_grad=True)
    Xg, yg = X.clone().requires_grad_(), y.clone().requires_grad_()
    w = ridge_solution(lam, Xg, yg)
    (0.5 * ((Xv @ w - yv) ** 2).sum()).backward()

    def loss(X, y):
        w = torch.linalg.solve(X.T @ X + torch.eye(4, dtype=DT), X.T @ y)
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    gX, gy = torch.func.grad(loss, argnums=(0, 1))(X, y)
    torch.testing.assert_close(Xg.grad, gX)
    torch.testing.assert_close(yg.grad, gy)


def test_implicit_root_dict_output_and_nonfloat_arguments():
    X, y, Xv, yv = make_data()
    labels = torch.arange(12)  # an integer tensor rides along without a gradient

    def condition(sol, scale, X, y, labels, note):
        return {"w": X.T @ (X @ sol["w"] - y) + scale * sol["w"]}

    @bilevel.implicit_root(condition, solver=Direct())
    def solve(scale, X, y, labels, note):
        return {"w": torch.linalg.solve(X.T @ X + scale * torch.eye(4, dtype=DT), X.T @ y)}

    scale = torch.tensor(1.5, dtype=DT, requires_grad=True)
    sol = solve(scale, X, y, labels, "any python object")
    (0.5 * ((Xv @ sol["w"] - yv) ** 2).sum()).backward()

    def loss(s):
        w = torch.linalg.solve(X.T @ X + s * torch.eye(4, dtype=DT), X.T @ y)
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    torch.testing.assert_close(scale.grad, torch.func.grad(loss)(scale.detach()))


def test_implicit_root_reports_unconverged_solve_and_residual():
    X, y, Xv, yv = make_data()

    @bilevel.implicit_root(torch.func.grad(ridge_objective), solver=CG(maxiter=1), on_failure="raise")
    def short_solve(lam, X, y):
        return torch.linalg.solve(X.T @ X + torch.diag(torch.exp(lam)), X.T @ y)

    lam = torch.zeros(4, dtype=DT, requires_grad=True)
    with pytest.raises(ConvergenceError, match="MAX_ITERATIONS"):
        (Xv @ short_solve(lam, X, y)).sum().backward()

    @bilevel.implicit_root(torch.func.grad(ridge_objective), solver=Direct())
    def wrong_solution(lam, X, y):
        return torch.zeros(4, dtype=DT)

    with pytest.warns(ConvergenceWarning, match="not a root"):
        (Xv @ wrong_solution(lam, X, y)).sum().backward()


# ------------------------------------------------------------------ error paths

def test_bad_mode_and_options():
    data = make_data()
    lam = torch.zeros(4, dtype=DT)
    with pytest.raises(BilevelError, match="mode must be one of"):
        bilevel.hypergradient(Ridge(), lam, data, mode="reverse")
    with pytest.raises(BilevelError, match="truncate=k"):
        bilevel.hypergradient(Ridge(), lam, data, mode="truncated")
    with pytest.raises(BilevelError, match="only to mode='truncated'"):
        bilevel.hypergradient(Ridge(), lam, data, truncate=3)
    with pytest.raises(BilevelError, match="only to mode='implicit'"):
        bilevel.hypergradient(Ridge(), lam, data, mode="unrolled", solver=CG())
    with pytest.raises(BilevelError, match="adjoint_x0= applies only"):
        bilevel.hypergradient(Ridge(), lam, data, mode="first_order", adjoint_x0=torch.zeros(4, dtype=DT))
    with pytest.raises(BilevelError, match="adjoint_x0 has shape"):
        bilevel.hypergradient(ClosedFormRidge(), lam, data, adjoint_x0=torch.zeros(3, dtype=DT))
    with pytest.raises(BilevelError, match="on_failure"):
        bilevel.hypergradient(Ridge(), lam, data, on_failure="panic")


def test_non_scalar_objectives_are_named():
    class VectorOuter(ClosedFormRidge):
        def outer_objective(self, w, lam, data):
            return (data[2] @ w - data[3]) ** 2

    class VectorInner(Ridge):
        def inner_objective(self, w, lam, data):
            return (data[0] @ w - data[1]) ** 2

    data = make_data()
    with pytest.raises(BilevelError, match=r"VectorOuter.outer_objective must return a scalar.*\(12,\)"):
        bilevel.hypergradient(VectorOuter(), torch.zeros(4, dtype=DT), data)
    with pytest.raises(BilevelError, match="VectorInner.inner_objective must return a scalar"):
        bilevel.hypergradient(VectorInner(), torch.zeros(4, dtype=DT), data)


def test_structure_mismatch_is_named():
    class WrongShape(ClosedFormRidge):
        def solve_inner(self, lam, data, init):
            return torch.zeros(5, dtype=DT)

    class WrongContainer(ClosedFormRidge):
        def optimality(self, w, lam, data):
            return {"w": super().optimality(w, lam, data)}

    data = make_data()
    with pytest.raises(BilevelError, match=r"solve_inner's result.*shape \(5,\).*\(4,\)"):
        bilevel.hypergradient(WrongShape(), torch.zeros(4, dtype=DT), data)
    with pytest.raises(BilevelError, match="optimality's output has structure"):
        bilevel.hypergradient(WrongContainer(), torch.zeros(4, dtype=DT), data)


def test_missing_methods_are_named():
    class Empty(BilevelProblem):
        def outer_objective(self, inner, outer, data):
            return inner.sum()

        def initial_inner(self, outer, data):
            return torch.zeros(2)

    with pytest.raises(NotImplementedError, match="inner_objective.*or optimality"):
        bilevel.hypergradient(Empty(), torch.zeros(2), None)

    class NoInit(Ridge):
        initial_inner = BilevelProblem.initial_inner

    for mode in ("implicit", "unrolled", "first_order"):
        with pytest.raises(BilevelError, match="initial_inner.*init="):
            bilevel.hypergradient(NoInit(), torch.zeros(4, dtype=DT), make_data(), mode=mode)


def test_dtype_and_device_mismatch_are_named():
    data = make_data()
    with pytest.raises(BilevelError, match=r"torch.float32.*torch.float64|cast everything"):
        bilevel.hypergradient(Ridge(), torch.zeros(4, dtype=torch.float32), data)
    meta = tuple(t.to("meta") for t in data)
    with pytest.raises(BilevelError, match="move everything to one device"):
        bilevel.hypergradient(Ridge(), torch.zeros(4, dtype=DT), meta)


def test_unconverged_inner_solve_warn_raise_ignore():
    problem = Ridge()
    problem.inner_steps = 3
    data = make_data()
    lam = torch.zeros(4, dtype=DT)
    with pytest.warns(ConvergenceWarning, match=r"(?s)not a root.*\|\|G\(phi\*, theta\)\|\| = \d"):
        bilevel.hypergradient(problem, lam, data)
    with pytest.raises(ConvergenceError, match="not a root"):
        bilevel.hypergradient(problem, lam, data, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bilevel.hypergradient(problem, lam, data, on_failure="ignore")
    assert float(result.inner_residual) > problem.residual_tol


def test_unconverged_adjoint_solve_is_reported():
    data = make_data()
    lam = torch.zeros(4, dtype=DT)
    with pytest.warns(ConvergenceWarning, match=r"(?s)adjoint linear solve did not converge.*MAX_ITERATIONS"):
        result = bilevel.hypergradient(ClosedFormRidge(), lam, data, solver=CG(maxiter=1))
    assert not bool(result.solve.converged)


def test_nan_in_inner_solution_and_hypergradient_are_named():
    class Diverging(Ridge):
        inner_lr = 10.0
        inner_steps = 400

    data = make_data()
    with pytest.raises(ConvergenceError, match=r"(?s)inner solve diverged.*DIVERGED after \d+ iterations"):
        bilevel.hypergradient(Diverging(), torch.zeros(4, dtype=DT), data, on_failure="raise")
    with pytest.warns(ConvergenceWarning, match="inner solve diverged"):  # the inner solve, not the outer data
        result = bilevel.hypergradient(Diverging(), torch.zeros(4, dtype=DT), data)
    assert MinimizeStatus(int(result.inner_solve.status)) is MinimizeStatus.DIVERGED

    class NanOuter(ClosedFormRidge):
        def outer_objective(self, w, lam, data):
            return (torch.sqrt(lam - 10.0) * w).sum()  # sqrt of a negative: NaN in d_theta f

    with pytest.raises(NonFiniteError, match="outer loss"):
        bilevel.hypergradient(NanOuter(), torch.zeros(4, dtype=DT), data, on_failure="ignore")

    class InfGradient(ClosedFormRidge):
        def outer_objective(self, w, lam, data):
            return w.pow(2).sum() + torch.sqrt(lam).sum()  # finite at lam = 0, d_theta f = Inf

    with pytest.raises(NonFiniteError, match="hypergradient"):
        bilevel.hypergradient(InfGradient(), torch.zeros(4, dtype=DT), data, on_failure="ignore")


def test_check_result_after_vmap_raises_for_failed_systems():
    data = make_data()
    lams = torch.zeros(2, 4, dtype=DT)
    batched = torch.func.vmap(
        lambda lam: bilevel.hypergradient(ClosedFormRidge(), lam, data, solver=CG(maxiter=1)))(lams)
    with pytest.raises(ConvergenceError, match="system 1: MAX_ITERATIONS"):
        bilevel.check_result(batched, on_failure="raise")


def test_problem_without_optimality_condition_reports_no_residual():
    class FixedSteps(BilevelProblem):
        """MAML-style: a fixed inner procedure, no optimality condition."""

        inner_steps = 3

        def inner_update(self, w, theta, data):
            return w - 0.1 * (w - theta)

        def outer_objective(self, w, theta, data):
            return (w**2).sum()

        def initial_inner(self, theta, data):
            return theta

    theta = torch.ones(2, dtype=DT)
    unrolled = bilevel.hypergradient(FixedSteps(), theta, None, mode="unrolled")
    assert unrolled.inner_residual is None
    torch.testing.assert_close(unrolled.grad, 2 * theta)  # w = theta at every step
    first = bilevel.hypergradient(FixedSteps(), theta, None, mode="first_order")
    assert first.inner_residual is None
    with pytest.raises(NotImplementedError, match="inner_objective.*or optimality"):
        bilevel.hypergradient(FixedSteps(), theta, None)


def test_default_inner_solver_under_vmap_over_data_only():
    """The early-exit check must not read batched values, whichever argument vmap batches."""
    datas = [make_data(seed=s) for s in range(3)]
    stacked = tuple(torch.stack(parts) for parts in zip(*datas))
    problem = Ridge()
    problem.inner_steps = 40  # several early-exit checkpoints
    lam = torch.zeros(4, dtype=DT)
    batched = torch.func.vmap(
        lambda d: bilevel.hypergradient(problem, lam, d, on_failure="ignore"))(stacked)
    looped = [bilevel.hypergradient(problem, lam, d, on_failure="ignore") for d in datas]
    torch.testing.assert_close(batched.inner, torch.stack([r.inner for r in looped]))


def test_inner_tol_none_runs_every_step():
    problem = Ridge()
    problem.inner_steps, problem.inner_tol = 30, None
    data = make_data()
    init = torch.zeros(4, dtype=DT)
    expected = init
    for _ in range(30):
        expected = problem.inner_update(expected, torch.zeros(4, dtype=DT), data)
    torch.testing.assert_close(problem.solve_inner(torch.zeros(4, dtype=DT), data, init), expected)


def test_adjoint_warm_start_reuses_the_previous_solution():
    data = make_data()
    lam = torch.zeros(4, dtype=DT)
    cold = bilevel.hypergradient(ClosedFormRidge(), lam, data, solver=CG(rtol=1e-10))
    warm = bilevel.hypergradient(ClosedFormRidge(), lam, data, solver=CG(rtol=1e-10), adjoint_x0=cold.solve.x)
    assert int(cold.solve.iterations) > 0 and int(warm.solve.iterations) == 0
    torch.testing.assert_close(warm.grad, cold.grad)
