"""The failure policy under every torch.func transform: raise raises, warn warns once per call, and
where no value can be read (CUDA-graph capture, compilation) a failed system's output is NaN.

Reference: the linear root ``G(phi, theta) = A phi - B theta - c`` has ``phi* = A^{-1} (B theta + c)``
and the Jacobian ``A^{-1} B``; every derivative below is a closed form in it.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel
from bilevel import solvers
from bilevel.errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from bilevel.testing.families import quadratic_case, stack_data
from bilevel.testing.strategies import operator_matrix

F64 = torch.float64
N, M = 6, 3


def linear_root(kind: str = "spd", condition: float = 30.0, seed: int = 0):
    A = operator_matrix(kind, N, condition, seed)
    g = torch.Generator().manual_seed(seed + 1)
    B = torch.randn(N, M, generator=g, dtype=F64)
    c = torch.randn(N, generator=g, dtype=F64)
    return A, B, c


def decorate(A, B, c, solver, on_failure, *, fixed_point=False, offset=0.0, residual_tol=1e-4):
    """``phi*(theta)`` through ``implicit_root`` (or ``implicit_fixed_point``), solved exactly
    (plus ``offset``, to hand the decorator a point that is not a root)."""
    if fixed_point:
        decorator = bilevel.implicit_fixed_point(lambda z, t: z - (A @ z - B @ t - c), solver,
                                                 on_failure=on_failure, residual_tol=residual_tol)
    else:
        decorator = bilevel.implicit_root(lambda p, t: A @ p - B @ t - c, solver, on_failure=on_failure,
                                          residual_tol=residual_tol)

    @decorator
    def phi_star(theta):
        return torch.linalg.solve(A, B @ theta + c) + offset

    return phi_star


W = torch.linspace(-1.0, 1.0, N, dtype=F64)  # a fixed cotangent
D = torch.tensor([0.5, -1.0, 2.0], dtype=F64)  # a fixed tangent


def _half_square(f):
    def loss(t):
        phi = f(t)  # one call: the policy speaks once per call
        return 0.5 * phi @ phi
    return loss


# transform name -> (derivative through it, closed form from A, B, c, theta)
TRANSFORMS = {
    "grad": (lambda f, t: torch.func.grad(lambda s: f(s) @ W)(t), lambda J, H, t: J.T @ W),
    "vjp": (lambda f, t: torch.func.vjp(f, t)[1](W)[0], lambda J, H, t: J.T @ W),
    "jacrev": (lambda f, t: torch.func.jacrev(f)(t), lambda J, H, t: J),
    "jacfwd": (lambda f, t: torch.func.jacfwd(f)(t), lambda J, H, t: J),
    "jvp": (lambda f, t: torch.func.jvp(f, (t,), (D,))[1], lambda J, H, t: J @ D),
    "hessian": (lambda f, t: torch.func.hessian(_half_square(f))(t), lambda J, H, t: H),
    "vmap(grad)": (lambda f, t: torch.func.vmap(torch.func.grad(lambda s, w: f(s) @ w))(
        t.expand(N, M), torch.eye(N, dtype=F64)), lambda J, H, t: J),
    "vmap(jacrev)": (lambda f, t: torch.func.vmap(torch.func.jacrev(f))(torch.stack([t, 2 * t])),
                     lambda J, H, t: torch.stack([J, J])),
    "grad(grad)": (lambda f, t: torch.func.grad(lambda s: torch.func.grad(_half_square(f))(s) @ D)(t),
                   lambda J, H, t: H @ D),
    "jacrev(jacrev)": (lambda f, t: torch.func.jacrev(torch.func.jacrev(_half_square(f)))(t), lambda J, H, t: H),
    "jacfwd(vmap(grad))": (lambda f, t: torch.func.jacfwd(lambda s: torch.func.vmap(torch.func.grad(_half_square(f)))(
        s.expand(2, M)).sum(0))(t), lambda J, H, t: 2 * H),
}


def closed_forms(A, B, c, theta):
    J = torch.linalg.solve(A, B)
    return J, J.T @ J  # d phi*/d theta; the Hessian of |phi*|^2 / 2 (phi* is affine in theta)


def run(name, f, theta):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = TRANSFORMS[name][0](f, theta)
    return value, [w for w in caught if issubclass(w.category, ConvergenceWarning)]


THETA = torch.tensor([0.3, -0.7, 1.1], dtype=F64)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_raise_raises_under_every_transform(name):
    f = decorate(*linear_root(), solvers.CG(maxiter=1), "raise")
    with pytest.raises(ConvergenceError, match="MAX_ITERATIONS after 1 iterations"):
        run(name, f, THETA)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_warn_warns_once_per_call_under_every_transform(name):
    A, B, c = linear_root()
    f = decorate(A, B, c, solvers.CG(maxiter=1), "warn")
    value, caught = run(name, f, THETA)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].filename == __file__, "the warning points at the caller, not into torch"
    J, H = closed_forms(A, B, c, THETA)
    want = TRANSFORMS[name][1](J, H, THETA)
    assert value.shape == want.shape
    assert not torch.allclose(value, want, rtol=1e-6, atol=1e-9), "one CG step cannot have solved the system"
    # A second call is a new call: it warns again.
    assert len(run(name, f, THETA)[1]) == 1


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_converged_solves_are_right_and_quiet_under_every_transform(name):
    A, B, c = linear_root()
    f = decorate(A, B, c, solvers.CG(rtol=1e-13, maxiter=200), "raise")
    value, caught = run(name, f, THETA)
    assert caught == []
    J, H = closed_forms(A, B, c, THETA)
    torch.testing.assert_close(value, TRANSFORMS[name][1](J, H, THETA), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["jacrev", "jacfwd", "vmap(grad)", "hessian"])
def test_ignore_says_nothing_under_a_transform(name):
    f = decorate(*linear_root(), solvers.CG(maxiter=1), "ignore")
    value, caught = run(name, f, THETA)
    assert caught == [] and bool(torch.isfinite(value).all())


@pytest.mark.parametrize("name", ["jacrev", "jacfwd", "vmap(grad)"])
@pytest.mark.parametrize("on_failure", ["raise", "warn"])
def test_cg_on_a_nonsymmetric_fixed_point_is_caught_under_transforms(name, on_failure):
    """``I - d_z T`` is nonsymmetric: CG stops with NONSYMMETRIC (or misses the tolerance), never silently."""
    f = decorate(*linear_root("nonsymmetric", 10.0), solvers.CG(rtol=1e-10, maxiter=200), on_failure,
                 fixed_point=True)
    if on_failure == "raise":
        with pytest.raises(ConvergenceError, match="adjoint linear solve did not converge"):
            run(name, f, THETA)
    else:
        assert len(run(name, f, THETA)[1]) == 1


@pytest.mark.parametrize("name", ["jacrev", "jacfwd", "vmap(grad)"])
def test_the_default_gmres_of_a_fixed_point_is_right_under_transforms(name):
    A, B, c = linear_root("nonsymmetric", 10.0)
    f = decorate(A, B, c, solvers.GMRES(rtol=1e-13), "raise", fixed_point=True)
    value, caught = run(name, f, THETA)
    J, H = closed_forms(A, B, c, THETA)
    assert caught == []
    torch.testing.assert_close(value, TRANSFORMS[name][1](J, H, THETA), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["jacrev", "jacfwd", "vmap(grad)"])
def test_an_inner_point_that_is_not_a_root_is_caught_under_transforms(name):
    f = decorate(*linear_root(), solvers.Direct(), "raise", offset=1e-2)
    with pytest.raises(ConvergenceError, match="not a root of the optimality condition"):
        run(name, f, THETA)


def test_a_nan_member_raises_under_vmap_unless_ignored():
    A, B, c = linear_root()
    thetas = torch.stack([THETA, THETA.clone().fill_(math.nan), 2 * THETA])
    with pytest.raises(NonFiniteError, match="the output of phi_star"):
        torch.func.vmap(torch.func.grad(lambda t: decorate(A, B, c, solvers.CG(rtol=1e-12), "warn")(t) @ W))(thetas)
    # "ignore" reads nothing under a transform: the NaN member stays NaN, the others are right.
    got = torch.func.vmap(decorate(A, B, c, solvers.CG(rtol=1e-12), "ignore"))(thetas)
    assert bool(torch.isnan(got[1]).all())
    torch.testing.assert_close(got[[0, 2]], torch.linalg.solve(A, B @ thetas[[0, 2]].T + c[:, None]).T)


def test_host_view_lays_out_every_vmap_level_first_and_lines_leaves_up():
    """Beneath nested vmaps (batch dimensions not in front), each level becomes a leading dimension,
    outermost first; a leaf batched at fewer levels is broadcast along the others."""
    from bilevel.policy import host_view

    x = torch.arange(24.0).reshape(2, 3, 4)
    y = torch.arange(2.0)
    seen = []

    def inner(t, s):
        seen.append(host_view({"t": t, "s": s, "n": None}))
        return t

    torch.func.vmap(torch.func.vmap(inner, in_dims=(1, None)), in_dims=(0, 0))(x, y)
    (view,) = seen
    torch.testing.assert_close(view["t"], x.permute(0, 2, 1))  # [i, j] is the member x[i, :, j]
    torch.testing.assert_close(view["s"], y[:, None].expand(2, 4))
    assert view["n"] is None
    plain = torch.arange(3.0)
    assert torch.equal(host_view(plain), plain)
    grads = []
    torch.func.grad(lambda t: grads.append(host_view(t)) or t.sum())(plain)  # a gradient wrapper is looked through
    assert torch.equal(grads[0], plain)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert host_view({"fake": mode.from_tensor(plain)}) is None  # no values behind it: no decision


# ------------------------------------------------------------------ hypergradient

def _case():
    return quadratic_case(5, 3, 50.0, 7, [0.2, -0.4, 0.9])


def test_hypergradient_under_vmap_raises_and_warns_once():
    cases = [quadratic_case(5, 3, 50.0, s, [0.2, -0.4, 0.9]) for s in (1, 2, 3)]
    data, problem, outer = stack_data(cases), cases[0].problem, cases[0].outer

    def batched(on_failure, solver):
        return torch.func.vmap(lambda d: bilevel.hypergradient(problem, outer, d, solver=solver,
                                                               on_failure=on_failure))(data)

    with pytest.raises(ConvergenceError, match="system 2: MAX_ITERATIONS"):
        batched("raise", solvers.CG(maxiter=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched("warn", solvers.CG(maxiter=1))
    assert sum(issubclass(w.category, ConvergenceWarning) for w in caught) == 1
    result = batched("raise", solvers.CG(rtol=1e-13, maxiter=100))
    torch.testing.assert_close(result.grad, torch.stack([c.expected() for c in cases]), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("transform", [torch.func.jacfwd, torch.func.jacrev])
def test_hypergradient_differentiated_in_its_outer_point_raises(transform):
    """Forward mode (jacfwd: the outer point batched by vmap) and reverse mode (jacrev) over ``hypergradient``."""
    case = _case()
    with pytest.raises(ConvergenceError, match="MAX_ITERATIONS"):
        transform(lambda o: bilevel.hypergradient(case.problem, o, case.data, solver=solvers.CG(maxiter=1),
                                                  on_failure="raise").grad)(case.outer)


def test_hypergradient_inner_residual_is_checked_under_vmap():
    case = _case()

    class Loose(type(case.problem)):
        def solve_inner(self, theta, data, init):
            return super().solve_inner(theta, data, init) + 1e-3

    problem = Loose()
    problem.__dict__.update(case.problem.__dict__)
    data = stack_data([case, case])
    with pytest.raises(ConvergenceError, match="not a root"):
        torch.func.vmap(lambda d: bilevel.hypergradient(problem, case.outer, d, solver="direct",
                                                        on_failure="raise"))(data)


# -------------------------------------------- where no value can be read: NaN, never a number

@pytest.fixture
def capturing(monkeypatch):
    """CPU stand-in for CUDA-graph capture: the library is told a graph is being recorded (as
    ``is_capturing`` says on a GPU), while the test can still read what comes out."""
    import bilevel.solvers._base
    import bilevel.solvers._transforms

    for module in (bilevel.solvers._transforms, bilevel.solvers._base):
        monkeypatch.setattr(module, "is_capturing", lambda t: True)


@pytest.mark.parametrize("on_failure", ["warn", "raise"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_failed_systems_are_nan_where_nothing_can_be_read(capturing, on_failure, mode):
    A, B, c = linear_root()
    theta = THETA.clone().requires_grad_(mode == "reverse")

    def derivative(f):
        if mode == "reverse":
            (g,) = torch.autograd.grad(f(theta) @ W, theta)
            return g
        return torch.func.jvp(f, (theta,), (D,))[1]

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # no host decision: neither warns nor raises
        failed = derivative(decorate(A, B, c, solvers.CG(maxiter=1), on_failure))
        solved = derivative(decorate(A, B, c, solvers.CG(rtol=1e-13, maxiter=60), on_failure))
        ignored = derivative(decorate(A, B, c, solvers.CG(maxiter=1), "ignore"))
    assert bool(torch.isnan(failed).all())
    J, _ = closed_forms(A, B, c, THETA)
    torch.testing.assert_close(solved, J.T @ W if mode == "reverse" else J @ D, rtol=1e-9, atol=1e-11)
    assert bool(torch.isfinite(ignored).all())  # "ignore" accepts the unconverged number


def test_check_result_where_nothing_can_be_read_returns_nan_for_failures(capturing):
    case = _case()
    failed = bilevel.hypergradient(case.problem, case.outer, case.data, solver=solvers.CG(maxiter=1))
    assert bool(torch.isnan(failed.grad).all())
    kept = bilevel.hypergradient(case.problem, case.outer, case.data, solver=solvers.CG(maxiter=1),
                                 on_failure="ignore")
    assert bool(torch.isfinite(kept.grad).all())
    solved = bilevel.hypergradient(case.problem, case.outer, case.data, solver=solvers.CG(rtol=1e-13, maxiter=60))
    torch.testing.assert_close(solved.grad, case.expected(), rtol=1e-9, atol=1e-11)


def test_compiled_vmapped_hypergradient_is_nan_where_a_solve_failed():
    """Under ``torch.compile`` (fullgraph: no host decision while tracing) a failed member's gradient is
    NaN with "warn", a converged one is right, and ``check_result`` on the output applies the policy."""
    cases = [quadratic_case(5, 3, 50.0, s, [0.2, -0.4, 0.9]) for s in (1, 2)]
    data, problem, outer = stack_data(cases), cases[0].problem, cases[0].outer

    def compiled(solver):
        def batch(o, d):
            return torch.func.vmap(lambda t: bilevel.hypergradient(problem, o, t, solver=solver))(d)
        torch._dynamo.reset()
        return torch.compile(batch, backend="aot_eager", fullgraph=True)(outer, data)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        failed = compiled(solvers.CG(maxiter=1))
        solved = compiled(solvers.CG(maxiter=6, rtol=1e-12))
    assert bool(torch.isnan(failed.grad).all())
    with pytest.raises(ConvergenceError, match="MAX_ITERATIONS"):
        bilevel.check_result(failed, on_failure="raise", residual_tol=problem.residual_tol)
    torch.testing.assert_close(solved.grad, torch.stack([c.expected() for c in cases]), rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------ the property

@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(("spd", "indefinite", "nonsymmetric")), condition=st.sampled_from((1.0, 1e2, 1e4)),
       seed=st.integers(0, 2**16), solver=st.sampled_from(("cg", "minres", "gmres", "bicgstab", "neumann")),
       maxiter=st.sampled_from((1, 3, 10, 500)), name=st.sampled_from(("jacrev", "jacfwd", "vmap(grad)", "jvp")),
       on_failure=st.sampled_from(("warn", "raise")))
def test_a_derivative_that_comes_back_without_a_word_is_right(kind, condition, seed, solver, maxiter, name,
                                                            on_failure):
    """Whatever the solver, its cap and the operator's structure: an error, a warning, or the closed form."""
    A, B, c = linear_root(kind, condition, seed)
    f = decorate(A, B, c, type(solvers.get_solver(solver))(rtol=1e-13, maxiter=maxiter), on_failure)
    try:
        value, caught = run(name, f, THETA)
    except ConvergenceError:
        assert on_failure == "raise"
        return
    if caught:
        assert on_failure == "warn" and len(caught) == 1
        return
    J, H = closed_forms(A, B, c, THETA)
    want = TRANSFORMS[name][1](J, H, THETA)
    assert float((value - want).abs().max()) <= 1e-6 * float(want.abs().max()), "a silent wrong derivative"
