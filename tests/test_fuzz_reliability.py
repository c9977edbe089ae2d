"""Reliability fuzz through the public API: every case ends correct, in a clear error, or reported.

Each hypothesis example is one case; :func:`bilevel.testing.outcomes.classify`
sorts it into correct / clear error / reported / silent wrong / silent NaN / raw
crash, and no case may land in the last three. Valid problems come from the
families with closed forms (plain and vmapped); bad inputs cover NaN/Inf in any
tensor, parameters of the wrong kind, dtype or structure, broken problem
definitions, bad options, solvers that do not fit the operator, ill-conditioned
and singular systems in float32 and float64, NaN reaching ``implicit_root``, and a
share of derivatives taken through ``torch.func`` (``jacrev``, ``jacfwd``,
``vmap(grad)``, ``jvp``, and ``hypergradient`` under ``vmap``) with unconverged,
mismatched and nonsymmetric solves.

Examples per test: ``FUZZ_EXAMPLES`` (default 40; the ``thorough`` hypothesis
profile 400). ``BILEVEL_FUZZ_REPORT=path.json`` writes the tally of outcomes.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bilevel
from bilevel import solvers
from bilevel.testing import strategies as bst
from bilevel.testing.families import ProblemCase, stack_data
from bilevel.testing.outcomes import TRANSFORMS, Outcome, Verdict, classify, derivative_through, linear_reference
from bilevel.testing.strategies import operator_matrix

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 400 if PROFILE == "thorough" else 40))
fuzz = settings(max_examples=EXAMPLES, deadline=None)

TALLY: Counter = Counter()
STRUCTURE = {"ridge": "spd", "quadratic": "spd", "logistic": "spd", "contraction": "nonsymmetric",
             "saddle": "symmetric_indefinite"}
FITTING = {"spd": ("cg", "minres", "gmres", "direct"), "symmetric_indefinite": ("minres", "gmres", "direct"),
           "nonsymmetric": ("gmres", "bicgstab", "direct")}
F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    yield
    path = os.environ.get("BILEVEL_FUZZ_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump({"examples_per_test": EXAMPLES,
                       "outcomes": {f"{k[0]}/{k[1]}": v for k, v in sorted(TALLY.items())},
                       "total": sum(TALLY.values())}, fh, indent=1)


def record(kind: str, verdict: Verdict, *allowed: Outcome) -> Verdict:
    """Tally ``verdict`` under ``kind``; fail unless it is honest (and in ``allowed``, if given)."""
    TALLY[(kind, verdict.outcome.value)] += 1
    assert verdict.outcome.honest, f"{kind}: {verdict.outcome.value}: {verdict.detail}"
    if allowed:
        assert verdict.outcome in allowed, f"{kind}: {verdict.outcome.value}, expected {allowed}: {verdict.detail}"
    return verdict


def tight(name: str) -> solvers.LinearSolver:
    return solvers.Direct() if name == "direct" else solvers.get_solver(name).__class__(rtol=1e-11, maxiter=500)


def grad_vs(case: ProblemCase):
    want = case.expected()
    return lambda result: (result.grad, want)


# ---------------------------------------------------------------- valid problems

@fuzz
@given(case=bst.problems(), data=st.data())
def test_valid_problems_come_out_right(case, data):
    name = data.draw(st.sampled_from(FITTING[STRUCTURE[case.family]]), label="solver")
    by_name = data.draw(st.booleans(), label="solver given by name")
    solver = name if by_name else tight(name)
    tol = 1e-2 if by_name and name != "direct" else 1e-6  # a name means the default rtol=1e-5
    verdict = classify(lambda: bilevel.hypergradient(case.problem, case.outer, case.data, solver=solver),
                       grad_vs(case), rtol=tol, atol=1e-9)
    record("valid", verdict, Outcome.CORRECT)


@fuzz
@given(data=st.data())
def test_vmapped_batches_come_out_right_and_nan_members_stay_nan(data):
    family = data.draw(st.sampled_from(("ridge", "quadratic", "saddle")), label="family")
    cases = data.draw(bst.problem_batches(family, max_size=3), label="cases")
    batch = stack_data(cases)
    poisoned = data.draw(st.booleans(), label="poison one member")
    if poisoned:
        key = data.draw(st.sampled_from(sorted(batch)), label="leaf")
        member = data.draw(st.integers(0, len(cases) - 1), label="member")
        batch[key] = batch[key].clone()
        flat = batch[key][member].reshape(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1), label="entry")] = math.nan
    problem, outer = cases[0].problem, cases[0].outer
    solver = solvers.Direct() if family != "saddle" else solvers.MINRES(rtol=1e-11, maxiter=500)

    def run():
        result = torch.func.vmap(lambda d: bilevel.hypergradient(problem, outer, d, solver=solver))(batch)
        if poisoned:  # the failed member's gradient must not be a number, before the policy raises
            assert not bool(torch.isfinite(result.grad[member]).all()), "a NaN member got a finite gradient"
        return bilevel.check_result(result, residual_tol=problem.residual_tol)

    want = torch.stack([c.expected() for c in cases])
    verdict = classify(run, lambda r: (r.grad, want), rtol=1e-6, atol=1e-9)
    record("vmap", verdict, Outcome.CLEAR_ERROR if poisoned else Outcome.CORRECT)


# ------------------------------------------------------------------- NaN and Inf

@fuzz
@given(case=bst.problems(), data=st.data())
def test_nan_or_inf_anywhere_is_a_clear_error(case, data):
    value = data.draw(st.sampled_from((math.nan, math.inf, -math.inf)), label="value")
    target = data.draw(st.sampled_from(("outer", *sorted(case.data))), label="tensor")
    outer, tensors = case.outer.clone(), {k: v.clone() for k, v in case.data.items()}
    t = outer if target == "outer" else tensors[target]
    t.reshape(-1)[data.draw(st.integers(0, t.numel() - 1), label="entry")] = value
    mode = data.draw(st.sampled_from(("implicit", "unrolled", "first_order")), label="mode")
    solver = tight(FITTING[STRUCTURE[case.family]][0]) if mode == "implicit" else None
    if mode != "implicit":
        case.problem.inner_steps = min(case.problem.inner_steps, 50)
    verdict = classify(lambda: bilevel.hypergradient(case.problem, outer, tensors, mode=mode, solver=solver,
                                                     on_failure="ignore"))
    record("nan-inf", verdict, Outcome.CLEAR_ERROR)


# -------------------------------------------------------------- bad parameters

def _bad_outer(case: ProblemCase, kind: str):
    theta = case.outer
    return {
        "list of floats": theta.tolist(),
        "python float": float(theta[0]),
        "integer tensor": theta.round().long(),
        "bool tensor": theta > 0,
        "float32 against float64 data": theta.float(),
        "None": None,
        "empty dict": {},
        "dict holding a string": {"theta": "0.5"},
        "meta device": theta.to("meta"),
    }[kind]


BAD_OUTER = ("list of floats", "python float", "integer tensor", "bool tensor", "float32 against float64 data",
             "None", "empty dict", "dict holding a string", "meta device")


@fuzz
@given(case=bst.problems(), kind=st.sampled_from(BAD_OUTER),
       mode=st.sampled_from(("implicit", "unrolled", "first_order")))
def test_parameters_of_the_wrong_kind_are_clear_errors(case, kind, mode):
    outer = _bad_outer(case, kind)
    case.problem.inner_steps = min(case.problem.inner_steps, 50)
    verdict = classify(lambda: bilevel.hypergradient(case.problem, outer, case.data, mode=mode))
    record("bad-outer", verdict, Outcome.CLEAR_ERROR)


BAD_DEFINITIONS = ("optimality too short", "optimality as a tuple", "optimality returns a float",
                   "outer objective not scalar", "outer objective returns a float", "solve_inner too long",
                   "solve_inner in float32", "initial_inner in float32", "initial_inner too short",
                   "no initial_inner")


def _broken(case: ProblemCase, kind: str) -> bilevel.BilevelProblem:
    problem = case.problem
    base = type(problem)

    class Broken(base):  # type: ignore[misc, valid-type]
        pass

    if kind == "optimality too short":
        Broken.optimality = lambda self, i, o, d: base.optimality(self, i, o, d)[:-1]
    elif kind == "optimality as a tuple":
        Broken.optimality = lambda self, i, o, d: (base.optimality(self, i, o, d),)
    elif kind == "optimality returns a float":
        Broken.optimality = lambda self, i, o, d: 0.0
    elif kind == "outer objective not scalar":
        Broken.outer_objective = lambda self, i, o, d: base.outer_objective(self, i, o, d) * torch.ones(2, dtype=F64)
    elif kind == "outer objective returns a float":
        Broken.outer_objective = lambda self, i, o, d: 1.0
    elif kind == "solve_inner too long":
        Broken.solve_inner = lambda self, o, d, init: torch.cat([base.solve_inner(self, o, d, init),
                                                                 torch.zeros(1, dtype=F64)])
    elif kind == "solve_inner in float32":
        Broken.solve_inner = lambda self, o, d, init: base.solve_inner(self, o, d, init).float()
    elif kind == "initial_inner in float32":
        Broken.initial_inner = lambda self, o, d: base.initial_inner(self, o, d).float()
    elif kind == "initial_inner too short":
        Broken.initial_inner = lambda self, o, d: base.initial_inner(self, o, d)[:-1]
    elif kind == "no initial_inner":
        Broken.initial_inner = bilevel.BilevelProblem.initial_inner
        Broken.solve_inner = bilevel.BilevelProblem.solve_inner
    out = Broken()
    out.__dict__.update(problem.__dict__)
    out.inner_steps = min(problem.inner_steps, 50)
    return out


@fuzz
@given(case=bst.problems(families=("ridge", "quadratic")),  # closed-form solve_inner: never calls optimality
       kind=st.sampled_from(BAD_DEFINITIONS), mode=st.sampled_from(("implicit", "unrolled", "first_order")))
def test_broken_problem_definitions_are_clear_errors(case, kind, mode):
    # Unrolled mode has no reference shape for the start: a short one fails in the user's objective.
    assume(not (kind == "initial_inner too short" and mode == "unrolled"))
    problem = _broken(case, kind)
    solver = tight(FITTING[STRUCTURE[case.family]][0]) if mode == "implicit" else None
    # 50 unrolled steps leave an inner residual up to the family's residual_tol (1e-6): compare at 1e-4.
    verdict = classify(lambda: bilevel.hypergradient(problem, case.outer, case.data, mode=mode, solver=solver),
                       grad_vs(case), rtol=1e-4, atol=1e-8)
    record("broken-definition", verdict)
    # Harmless where the broken method is not used: solve_inner in the unrolled mode.
    unused = kind.startswith("solve_inner") and mode == "unrolled"
    if not unused:
        assert verdict.outcome is Outcome.CLEAR_ERROR, f"{kind}: {verdict.outcome.value}: {verdict.detail}"


BAD_OPTIONS = ("solver class", "unknown solver name", "solver is an int", "solver is a string of a class",
               "mode", "truncate in implicit mode", "truncate too large", "on_failure", "adjoint_x0 shape",
               "solver in unrolled mode")


@fuzz
@given(case=bst.problems(families=("ridge", "quadratic")), kind=st.sampled_from(BAD_OPTIONS))
def test_bad_options_are_clear_errors(case, kind):
    kwargs = {
        "solver class": {"solver": solvers.CG},
        "unknown solver name": {"solver": "conjugate"},
        "solver is an int": {"solver": 3},
        "solver is a string of a class": {"solver": "CG()"},
        "mode": {"mode": "implicitly"},
        "truncate in implicit mode": {"truncate": 3},
        "truncate too large": {"mode": "truncated", "truncate": case.problem.inner_steps + 1},
        "on_failure": {"on_failure": "complain"},
        "adjoint_x0 shape": {"adjoint_x0": torch.zeros(case.outer.numel() + 7, dtype=F64)},
        "solver in unrolled mode": {"mode": "unrolled", "solver": "gmres"},
    }[kind]
    verdict = classify(lambda: bilevel.hypergradient(case.problem, case.outer, case.data, **kwargs))
    record("bad-option", verdict, Outcome.CLEAR_ERROR)


# ------------------------------------------------------- solvers that do not fit

@fuzz
@given(case=bst.problems(families=("contraction", "saddle", "ridge", "quadratic")),
       name=st.sampled_from(("cg", "minres", "neumann", "bicgstab")),
       on_failure=st.sampled_from(("warn", "raise")), alpha=st.sampled_from((None, 1.0)))
def test_any_solver_on_any_structure_is_right_or_says_so(case, name, on_failure, alpha):
    # Neumann with its own step (power iterations) or with a fixed alpha = 1
    solver = solvers.Neumann(alpha=alpha, rtol=1e-10) if name == "neumann" else tight(name)
    verdict = classify(lambda: bilevel.hypergradient(case.problem, case.outer, case.data, solver=solver,
                                                     on_failure=on_failure),
                       grad_vs(case), rtol=1e-6, atol=1e-9)
    record("mismatched-solver", verdict)


# ------------------------------------------------------------ the solvers alone

def _true_residual_check(A: torch.Tensor, b: torch.Tensor, rtol: float, atol: float):
    def judge(result: solvers.SolveResult):
        r = torch.linalg.vector_norm(b.double() - (result.x.double() @ A.double().T), dim=-1)
        tol = torch.clamp(rtol * torch.linalg.vector_norm(b.double(), dim=-1), min=atol)
        # Rounding in the residual itself, in the working precision.
        slack = 10 * torch.finfo(b.dtype).eps * (torch.linalg.matrix_norm(A.double(), ord=2)
                                                 * result.x.double().norm(dim=-1) + b.double().norm(dim=-1))
        return r, tol + slack
    return judge


@fuzz
@given(data=st.data())
def test_solver_status_is_decided_on_the_true_residual(data):
    kind = data.draw(st.sampled_from(("spd", "indefinite", "nonsymmetric", "singular")), label="kind")
    n = data.draw(st.integers(2, 40), label="n")
    dtype = data.draw(st.sampled_from((torch.float32, F64)), label="dtype")
    seed = data.draw(bst.seeds(), label="seed")
    condition = data.draw(st.sampled_from((1.0, 1e2, 1e4, 1e6)), label="condition")
    if kind == "singular":
        A = operator_matrix(data.draw(st.sampled_from(("spd", "nonsymmetric"))), n, condition, seed)
        U, S, Vh = torch.linalg.svd(A)
        S[-data.draw(st.integers(1, n - 1), label="rank deficit"):] = 0.0
        A = (U * S) @ Vh
    else:
        A = operator_matrix(kind, n, condition, seed)
    A = A.to(dtype)
    batch = data.draw(st.sampled_from(((), (3,), (2, 2))), label="batch")
    b = torch.randn(*batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype)
    rtol = data.draw(st.sampled_from((1e-2, 1e-5, 1e-8, 1e-12)), label="rtol")
    name = data.draw(st.sampled_from(("cg", "minres", "gmres", "bicgstab", "direct")), label="solver")
    cls = type(solvers.get_solver(name))
    solver = cls(rtol=rtol) if name == "direct" else cls(rtol=rtol, maxiter=data.draw(st.sampled_from((5, 4 * n))))
    if name == "gmres":
        solver = cls(rtol=rtol, maxiter=solver.maxiter, restart=data.draw(st.integers(1, n)))
    result = solver(lambda v: v @ A.T, b)
    r, bound = _true_residual_check(A, b, rtol, 0.0)(result)
    converged = result.converged
    # The property itself: a CONVERGED system meets the tolerance on its true residual.
    assert bool((r[converged] <= bound[converged]).all()), (
        f"CONVERGED with true residual {r[converged].tolist()} over {bound[converged].tolist()}")
    assert bool((converged == (result.status == int(solvers.Status.CONVERGED))).all())
    verdict = classify(lambda: result, lambda res: (torch.zeros(()), torch.zeros(())))
    record("solver", verdict)


@fuzz
@given(n=st.integers(1, 12), name=st.sampled_from(("cg", "minres", "gmres", "bicgstab", "neumann", "direct")),
       where=st.sampled_from(("b", "operator")), value=st.sampled_from((math.nan, math.inf)),
       entry=st.integers(0, 11))
def test_nan_in_a_solve_gives_nan_and_nonfinite(n, name, where, value, entry):
    A = operator_matrix("spd", n, 10.0, n)
    b = torch.ones(n, dtype=F64)
    if where == "b":
        b[entry % n] = value

    def matvec(v):
        out = v @ A.T
        if where == "operator":
            out = out.clone()
            out[..., entry % n] = value
        return out

    result = solvers.get_solver(name)(matvec, b)
    assert int(result.status) == solvers.Status.NONFINITE, solvers.Status(int(result.status)).name
    assert not bool(torch.isfinite(result.x).all()), "a failed solve returned a finite x"
    record("solver-nan", classify(lambda: result))


# --------------------------------------------------------------- implicit_root

@fuzz
@given(case=bst.problems(families=("ridge",)), solver=st.sampled_from(("cg", "minres", "gmres", "direct")),
       poison=st.sampled_from(("none", "loss", "data")))
def test_implicit_root_is_right_or_refuses_nan(case, solver, poison):
    problem, data = case.problem, dict(case.data)

    @bilevel.implicit_root(torch.func.grad(problem.inner_objective), solver=solver)
    def fit(theta, d):
        return problem.solve_inner(theta, d, None)

    def run():
        theta = case.outer.clone().requires_grad_(True)
        d = dict(data)
        w = fit(theta, d)
        loss = problem.outer_objective(w, theta, d)
        if poison == "loss":
            loss = loss * torch.tensor(math.nan, dtype=F64)
        loss.backward()
        return theta.grad

    want = case.expected()
    tol = 1e-6 if solver == "direct" else 1e-3  # the default rtol of the named solver
    verdict = classify(run, lambda g: (g, want), rtol=tol, atol=1e-7)
    if poison == "data":
        data["X_val"] = data["X_val"].clone()
        data["X_val"][0, 0] = math.nan
        verdict = classify(run)
    record("implicit_root", verdict, *((Outcome.CLEAR_ERROR,) if poison != "none" else ()))


# ------------------------------------------------------------ under torch.func transforms

ROOT_KINDS = ("spd", "indefinite", "nonsymmetric")
ROOT_SOLVERS = ("cg", "minres", "gmres", "bicgstab", "neumann", "normal_cg", "direct")
CAPS = (1, 2, 5, 20, 100, 500)


def _capped(name: str, maxiter: int) -> solvers.LinearSolver:
    return solvers.Direct() if name == "direct" else type(solvers.get_solver(name))(rtol=1e-12, maxiter=maxiter)


def _within_a_millionth(want: torch.Tensor) -> dict:
    """``classify``'s tolerance for a result off by at most 1e-6 of the reference's largest entry."""
    return {"rtol": 0.0, "atol": 1e-6 * float(want.abs().max()) + 1e-12}


@fuzz
@given(data=st.data())
def test_derivatives_through_transforms_are_right_or_say_so(data):
    """``phi*(theta) = A^{-1} (B theta + c)`` by ``implicit_root`` or ``implicit_fixed_point``, differentiated
    through ``jacrev``, ``jacfwd``, ``vmap(grad)`` or ``jvp`` with any solver and cap: the Jacobian ``A^{-1} B``
    (closed form), or an error, or a warning; never a finite wrong number without a word."""
    kind = data.draw(st.sampled_from(ROOT_KINDS), label="kind")
    n, m = data.draw(st.integers(2, 8), label="n"), data.draw(st.integers(1, 3), label="m")
    condition = data.draw(st.sampled_from((1.0, 1e2, 1e4)), label="condition")
    seed = data.draw(bst.seeds(), label="seed")
    name = data.draw(st.sampled_from(ROOT_SOLVERS), label="solver")
    maxiter = data.draw(st.sampled_from(CAPS), label="maxiter")
    transform = data.draw(st.sampled_from(TRANSFORMS), label="transform")
    on_failure = data.draw(st.sampled_from(("warn", "raise")), label="on_failure")
    fixed_point = data.draw(st.booleans(), label="implicit_fixed_point")
    A = operator_matrix(kind, n, condition, seed)
    g = torch.Generator().manual_seed(seed + 1)
    B, c = torch.randn(n, m, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    theta, direction = torch.randn(m, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64)
    solver = _capped(name, maxiter)
    if fixed_point:  # T(z) = z - (A z - B theta - c): the same root, I - d_z T = A
        decorator = bilevel.implicit_fixed_point(lambda z, t: z - (A @ z - B @ t - c), solver, on_failure=on_failure)
    else:
        decorator = bilevel.implicit_root(lambda p, t: A @ p - B @ t - c, solver, on_failure=on_failure)
    phi_star = decorator(lambda t: torch.linalg.solve(A, B @ t + c))
    want = linear_reference(transform, torch.linalg.solve(A, B), direction)
    verdict = classify(lambda: derivative_through(transform, phi_star, theta, direction), lambda got: (got, want),
                       **_within_a_millionth(want))
    record(f"transform/{transform}", verdict)
    if on_failure == "raise":
        assert verdict.outcome is not Outcome.REPORTED, f"on_failure='raise' only warned: {verdict.detail}"


@fuzz
@given(case=bst.problems(families=("ridge", "quadratic", "contraction", "saddle")), data=st.data())
def test_hypergradients_under_vmap_are_right_or_say_so(case, data):
    """``hypergradient`` vmapped over outer points with any solver and cap: the closed form at every
    point, or an error, or one warning (the policy applied beneath ``vmap``, no ``check_result``)."""
    name = data.draw(st.sampled_from(ROOT_SOLVERS), label="solver")
    maxiter = data.draw(st.sampled_from(CAPS), label="maxiter")
    on_failure = data.draw(st.sampled_from(("warn", "raise")), label="on_failure")
    points = torch.stack([case.outer, 0.5 * case.outer, case.outer + 0.25])
    solver = _capped(name, maxiter)
    want = torch.stack([case.problem.closed_form(p, case.data) for p in points])

    def run():
        return torch.func.vmap(lambda o: bilevel.hypergradient(case.problem, o, case.data, solver=solver,
                                                               on_failure=on_failure).grad)(points)

    verdict = classify(run, lambda got: (got, want), **_within_a_millionth(want))
    record("transform/vmap(hypergradient)", verdict)
    if on_failure == "raise":
        assert verdict.outcome is not Outcome.REPORTED, f"on_failure='raise' only warned: {verdict.detail}"

