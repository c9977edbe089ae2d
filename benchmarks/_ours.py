"""The iMAML meta-gradient through the public :mod:`bilevel` API.

``ImamlProblem`` is the proximal inner problem of :mod:`_tasks` as a
:class:`bilevel.BilevelProblem`; :func:`make` returns the meta-gradient in one of
these forms: ``"implicit"`` (``torch.func.vmap`` over tasks, CG with exactly
``cg_steps`` iterations from zero), ``"implicit-graph"`` (the same, replayed as
one CUDA graph by :class:`bilevel.CUDAGraphed`), ``"implicit-compiled"`` (the same,
compiled whole by ``torch.compile``: K inner steps, CG and the vector-Jacobian
products in one graph; the first call compiles, in a time that grows with K),
``"implicit-compiled-steps"`` (compiled in two pieces whose compile time does not
grow with K: ``chunk`` vmapped inner steps, called ``K / chunk`` times, then the
implicit hypergradient at the K-th iterate), ``"implicit-loop"`` (one task at a
time), ``"implicit-compiled-loop"`` (one task at a time, each call compiled by
``torch.compile``; one compilation serves every task), ``"implicit-compiled-pieces"``
(one inner step, one operator application and the outer gradients compiled apart, the
library's CG eager between them) and ``"unrolled"`` (vmapped reverse mode through the
``K`` steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

import bilevel
from bilevel.solvers import CG

from _tasks import SPECS, proximal, task_loss


class ImamlProblem(bilevel.BilevelProblem):
    """``phi* = argmin L_train(phi) + lam/2 ||phi - theta||^2``, ``F = L_test(phi*)``."""

    residual_tol = None  # K gradient steps do not reach a root, by design

    def __init__(self, problem: str, steps: int):
        self.problem = problem
        self.lam = SPECS[problem].lam
        self.inner_lr = SPECS[problem].alpha
        self.inner_steps = steps

    def inner_objective(self, inner, outer, data) -> Tensor:
        xs, ys, _, _ = data
        return task_loss(self.problem, inner, xs, ys) + proximal(inner, outer, self.lam)

    def outer_objective(self, inner, outer, data) -> Tensor:
        _, _, xq, yq = data
        return task_loss(self.problem, inner, xq, yq)

    def initial_inner(self, outer, data):
        return outer

    def solve_inner(self, outer, data, init):
        """Exactly ``inner_steps`` gradient steps (iMAML's inner optimizer), no early exit."""
        inner = init
        for _ in range(self.inner_steps):
            inner = self.inner_update(inner, outer, data)
        return inner


def make(mode: str, problem: str, theta: tuple[Tensor, ...], data: tuple[Tensor, ...],
         steps: int, cg_steps: int, chunk: int = 1):
    """A zero-argument callable returning the mean meta-gradient over the tasks in ``data``
    (``chunk``: inner steps per compiled call of ``"implicit-compiled-steps"``, a divisor of
    ``steps``)."""
    prob = ImamlProblem(problem, steps)
    solver = CG(rtol=0.0, maxiter=cg_steps)

    def one_task(outer, task):
        if mode == "unrolled":
            return bilevel.hypergradient(prob, outer, task, mode="unrolled")
        return bilevel.hypergradient(prob, outer, task, solver=solver, on_failure="ignore")

    if mode in ("implicit", "unrolled", "implicit-graph", "implicit-compiled"):
        batched = torch.func.vmap(one_task, in_dims=(None, 0))
        if mode == "implicit-graph":
            batched = bilevel.CUDAGraphed(batched)
        elif mode == "implicit-compiled":
            batched = torch.compile(batched, fullgraph=True)

        def call():
            result = bilevel.check_result(batched(theta, data), on_failure="ignore", residual_tol=None)
            call.solve = result.solve
            return tuple(g.mean(0) for g in result.grad)

        return call
    if mode == "implicit-compiled-steps":
        if steps % chunk:
            raise ValueError(f"chunk={chunk} does not divide the {steps} inner steps")

        def inner_steps(phi, task):
            for _ in range(chunk):
                phi = prob.inner_update(phi, theta, task)
            return phi

        step = torch.compile(torch.func.vmap(inner_steps), fullgraph=True)
        at_iterate = ImamlProblem(problem, 0)  # its solve_inner returns the given start

        def adjoint_one(phi, task):
            return bilevel.hypergradient(at_iterate, theta, task, init=phi, solver=solver, on_failure="ignore")

        adjoint = torch.compile(torch.func.vmap(adjoint_one), fullgraph=True)
        start = tuple(t.expand(data[0].shape[0], *t.shape).clone() for t in theta)

        def call():
            phi = start
            for _ in range(steps // chunk):
                phi = step(phi, data)
            result = bilevel.check_result(adjoint(phi, data), on_failure="ignore", residual_tol=None)
            call.solve = result.solve
            return tuple(g.mean(0) for g in result.grad)

        return call
    if mode == "implicit-compiled-pieces":
        return _compiled_pieces(prob, theta, data, steps, solver)
    if mode in ("implicit-loop", "implicit-compiled-loop"):
        tasks = data[0].shape[0]
        per_task = torch.compile(one_task, fullgraph=True) if mode == "implicit-compiled-loop" else one_task

        def call():
            total, solves = None, []
            for i in range(tasks):
                result = per_task(theta, tuple(d[i] for d in data))
                solves.append(result.solve)
                total = result.grad if total is None else tuple(a + b for a, b in zip(total, result.grad))
            call.solves = solves
            return tuple(g / tasks for g in total)

        return call
    raise ValueError(f"unknown mode {mode!r} for ours: implicit, implicit-graph, implicit-compiled, "
                     "implicit-compiled-steps, implicit-loop, implicit-compiled-loop or unrolled")


def _compiled_pieces(prob: ImamlProblem, theta: tuple[Tensor, ...], data: tuple[Tensor, ...], steps: int,
                     solver: CG):
    """The implicit meta-gradient from three compiled pieces whose graphs depend neither on K nor on
    the CG iterations: one vmapped inner step (called K times), one vmapped application of the
    adjoint operator with its cross term (``torch.func.vjp`` of the optimality condition, called
    once per CG iteration and once at the solution) and the vmapped outer gradients; the library's
    CG runs eagerly on the compiled operator. Assembled from the public solver and ``torch.func``,
    not through ``bilevel.hypergradient``, which has no hook for a compiled operator."""
    sizes, shapes = [t.numel() for t in theta], [t.shape for t in theta]

    def flat(tree) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tree])

    def unflat(v: Tensor) -> tuple[Tensor, ...]:
        return tuple(c.view(shape) for c, shape in zip(v.split(sizes), shapes))

    def step(phi, task):
        return prob.inner_update(phi, theta, task)

    def apply(phi, task, v):  # ((d_phi G)^T v, (d_theta G)^T v)
        _, vjp_fn = torch.func.vjp(lambda p, t: prob.optimality(p, t, task), phi, theta)
        to_phi, to_theta = vjp_fn(unflat(v))
        return flat(to_phi), to_theta

    def outer_grads(phi, task):
        return torch.func.grad(prob.outer_objective, argnums=(0, 1))(phi, theta, task)

    compiled = {name: torch.compile(torch.func.vmap(fn, in_dims=dims), fullgraph=True)
                for name, fn, dims in (("step", step, (0, 0)), ("apply", apply, (0, 0, 0)),
                                       ("outer", outer_grads, (0, 0)))}
    tasks = data[0].shape[0]
    start = tuple(t.expand(tasks, *t.shape).clone() for t in theta)

    def flat_batched(tree) -> Tensor:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tree], dim=1)

    def call():
        phi = start
        for _ in range(steps):
            phi = compiled["step"](phi, data)
        d_phi, d_theta = compiled["outer"](phi, data)
        result = solver(lambda v: compiled["apply"](phi, data, v)[0], flat_batched(d_phi))
        _, cross = compiled["apply"](phi, data, result.x)
        call.solve = result
        return tuple((direct - indirect).mean(0) for direct, indirect in zip(d_theta, cross))

    return call


def cost_floor(problem: str, theta, data, steps: int, cg_steps: int):
    """The pieces of one meta-gradient as separate vmapped calls: ``(inner grad, hvp, query grad)``.

    The floor is ``K t_grad + cg_steps t_hvp + t_query``; the Hessian-vector product is a
    call of a linearization built once (``torch.func.vjp`` of the inner gradient), as the
    core does.
    """
    prob = ImamlProblem(problem, steps)
    vm = torch.func.vmap
    inner_grad = vm(torch.func.grad(prob.inner_objective), in_dims=(0, None, 0))
    query_grad = vm(torch.func.grad(prob.outer_objective), in_dims=(0, None, 0))
    tasks = data[0].shape[0]
    phi = tuple(t.expand(tasks, *t.shape).clone() for t in theta)
    _, vjp_fn = torch.func.vjp(lambda p: inner_grad(p, theta, data), phi)
    v = tuple(torch.ones_like(p) for p in phi)
    return (lambda: inner_grad(phi, theta, data), lambda: vjp_fn(v), lambda: query_grad(phi, theta, data))


def solve_statuses(call) -> dict[str, int]:
    """How many tasks' adjoint solves ended in each status at the last ``call()``."""
    from bilevel.solvers import Status

    if getattr(call, "solve", None) is not None:
        codes = call.solve.status.reshape(-1).tolist()
    elif getattr(call, "solves", None):
        codes = [int(s.status) for s in call.solves]
    else:
        return {}
    counts: dict[str, int] = {}
    for code in codes:
        counts[Status(code).name] = counts.get(Status(code).name, 0) + 1
    return counts
