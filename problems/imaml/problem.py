"""iMAML as a :class:`bilevel.BilevelProblem`, and its vectorized meta-gradient.

Implicit MAML (Rajeswaran, Finn, Kakade, Levine, NeurIPS 2019). Per task ``i``
with meta-parameters ``theta``::

    phi_i = argmin_phi  L_train_i(phi) + lam/2 ||phi - theta||^2      (inner, from phi = theta)
    g_i   = (I + H_i / lam)^{-1} grad L_test_i(phi_i),  H_i = hess L_train_i(phi_i)

The core's implicit mode solves ``(H_i + lam I) v = grad L_test_i`` with the
chosen linear solver (CG with 5 iterations by default, as in the paper) and
returns ``-(d_theta G)^T v = lam v = g_i``. The same problem gives MAML
(``mode="unrolled"``, reverse mode through the inner steps; with ``lam = 0`` it
is exactly MAML) and first-order MAML (``mode="first_order"``).

:func:`meta_gradient` averages the task meta-gradients of a meta-batch, computed
as one ``torch.func.vmap`` over the tasks or as a loop over them, whichever runs
faster here (measured on its first calls, or chosen by ``over_tasks``).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree as pytree

import bilevel
from bilevel.problems.imaml.models import Params
from bilevel.problems.imaml.tasks import Task
from bilevel.solvers import CG, LinearSolver, Status
from bilevel.solvers.minimize import Armijo, MinimizeResult, Minimizer, get_minimizer

__all__ = ["IMAMLProblem", "MetaGradient", "Adaptation", "meta_gradient", "adapt", "balanced_groups", "cross_entropy",
           "mse", "INNER_OPTIMIZERS", "OVER_TASKS", "PROX_SCHEDULES"]

Forward = Callable[[Params, Tensor], Tensor]
Loss = Callable[[Tensor, Tensor], Tensor]
INNER_OPTIMIZERS = ("gd", "nesterov", "armijo", "lbfgs", "newton_cg")
PROX_SCHEDULES = ("every_step", "last_step")
OVER_TASKS = ("auto", "vmap", "loop")


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred, target)


class IMAMLProblem(bilevel.BilevelProblem):
    """One few-shot task as a bilevel problem; ``data`` is a :class:`Task`.

    Args:
        forward: the network, ``forward(params, x)``.
        loss: ``loss(output, target)``, a scalar (cross-entropy or MSE).
        lam: proximal strength ``lambda`` (paper: 2 on Omniglot; 0 turns the
            unrolled and first-order modes into plain MAML and FOMAML).
        inner_lr, inner_steps: the inner solver: ``inner_steps`` steps of size
            ``inner_lr`` from ``theta`` (paper: 0.1, 16 for 5-way, 25 for 20-way).
        inner_optimizer: ``"gd"`` (the paper's iMAML-GD), ``"nesterov"``
            (Nesterov's accelerated gradient with momentum ``(k - 1) / (k + 2)`` at
            step ``k``), or one of the library's inner solvers
            (:mod:`bilevel.solvers.minimize`), by name or as an instance: ``"armijo"``
            (gradient descent with a per-task backtracking step that starts from
            ``inner_lr``, so the inner objective never increases), ``"lbfgs"``, or
            ``"newton_cg"`` (Hessian-free: iMAML-HF). A named one runs at most
            ``inner_steps`` iterations; an instance keeps its own settings. iMAML needs
            only the inner solution, so any optimizer works in the implicit and
            first-order modes.
        inner_tol: with a library solver, a task whose inner gradient norm is at most
            ``inner_tol`` is solved and stops (``None``: the solver's default relative
            tolerance for ``"lbfgs"``/``"newton_cg"``, all ``inner_steps`` for ``"armijo"``).
        prox_schedule: ``"every_step"`` (default): every step descends
            ``L_train + lam/2 ||phi - theta||^2``, the inner problem of the formula.
            ``"last_step"``: the steps descend ``L_train`` alone and one proximal
            step ``phi <- phi - inner_lr * lam * (phi - theta)`` ends the solve, as
            in the paper's reference code (aravindr93/imaml_dev); ``phi`` then
            adapts further but is only an approximate root of the formula's
            optimality condition, which the implicit meta-gradient still uses.
    """

    residual_tol = None  # a few inner steps give an approximate phi_i by design

    def __init__(self, forward: Forward, loss: Loss, *, lam: float = 2.0, inner_lr: float = 0.1,
                 inner_steps: int = 16, inner_optimizer: str | Minimizer = "gd", prox_schedule: str = "every_step",
                 inner_tol: float | None = None):
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not (inner_optimizer in INNER_OPTIMIZERS or isinstance(inner_optimizer, Minimizer)):
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS} or a bilevel.solvers.minimize "
                             f"instance, got {inner_optimizer!r}")
        if prox_schedule not in PROX_SCHEDULES:
            raise ValueError(f"prox_schedule must be one of {PROX_SCHEDULES}, got {prox_schedule!r}")
        self.forward, self.loss, self.lam = forward, loss, lam
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.inner_optimizer, self.prox_schedule, self.inner_tol = inner_optimizer, prox_schedule, inner_tol

    def support_loss(self, phi: Params, task: Task) -> Tensor:
        return self.loss(self.forward(phi, task.support_x), task.support_y)

    def query_loss(self, phi: Params, task: Task) -> Tensor:
        return self.loss(self.forward(phi, task.query_x), task.query_y)

    def inner_objective(self, phi: Params, theta: Params, task: Task) -> Tensor:
        """``L_train(phi) + lam/2 ||phi - theta||^2``."""
        prox = sum(((p - t) ** 2).sum() for p, t in zip(phi.values(), theta.values()))
        return self.support_loss(phi, task) + 0.5 * self.lam * prox

    def outer_objective(self, phi: Params, theta: Params, task: Task) -> Tensor:
        """``L_test(phi)``."""
        return self.query_loss(phi, task)

    def initial_inner(self, theta: Params, task: Task) -> Params:
        return theta

    def inner_minimizer(self) -> Minimizer | None:
        """The library inner solver of ``inner_optimizer``, or ``None`` for ``"gd"``/``"nesterov"``."""
        if isinstance(self.inner_optimizer, Minimizer):
            return self.inner_optimizer
        if self.inner_optimizer in ("gd", "nesterov"):
            return None
        if self.inner_optimizer == "armijo":
            return Armijo(lr=self.inner_lr, maxiter=self.inner_steps, rtol=0.0, atol=self.inner_tol or 0.0)
        tolerance = {} if self.inner_tol is None else {"rtol": 0.0, "atol": self.inner_tol}
        return dataclasses.replace(get_minimizer(self.inner_optimizer), maxiter=self.inner_steps, **tolerance)

    def inner_solve(self, theta: Params, task: Task, init: Params) -> MinimizeResult | None:
        """The library solver's result on the inner objective (``prox_schedule="every_step"``),
        else ``None``."""
        minimizer = self.inner_minimizer()
        if minimizer is None or self.prox_schedule != "every_step":
            return None
        return minimizer(lambda phi: self.inner_objective(phi, theta, task), init)

    def solve_inner(self, theta: Params, task: Task, init: Params) -> Params:
        """``inner_steps`` of gradient descent (no early exit) or of Nesterov's method, or the
        library inner solver's solution."""
        report = self.inner_solve(theta, task, init)
        if report is not None:
            return report.x
        minimizer = self.inner_minimizer()
        if minimizer is not None:  # prox_schedule="last_step": the support loss alone, then one proximal step
            return self._last_prox_step(minimizer(lambda phi: self.support_loss(phi, task), init).x, theta)
        support_grad = torch.func.grad(self.support_loss)

        def direction(phi: Params) -> Params:
            if self.prox_schedule == "every_step":
                return self.optimality(phi, theta, task)
            return support_grad(phi, task)

        phi, previous = init, init
        for k in range(1, self.inner_steps + 1):
            momentum = (k - 1) / (k + 2) if self.inner_optimizer == "nesterov" else 0.0
            look = {n: phi[n] + momentum * (phi[n] - previous[n]) for n in phi} if momentum else phi
            step = direction(look)
            phi, previous = {n: look[n] - self.inner_lr * step[n] for n in phi}, phi
        return self._last_prox_step(phi, theta) if self.prox_schedule == "last_step" else phi

    def _last_prox_step(self, phi: Params, theta: Params) -> Params:
        """``phi <- phi - inner_lr * lam * (phi - theta)``: the reference code's closing proximal step."""
        keep = 1.0 - self.inner_lr * self.lam
        return {n: theta[n] + keep * (phi[n] - theta[n]) for n in phi}


class MetaGradient(NamedTuple):
    """Meta-batch average of the task meta-gradients, with per-task diagnostics.

    ``query_loss``: ``L_test_i(phi_i)`` per task. ``inner_residual``: ``||G(phi_i)||``,
    the norm of the inner objective's gradient at the adapted parameters (0 at an
    exact inner solution). In the implicit mode only (else ``None``): ``status``
    and ``iterations``, the adjoint solve's :class:`~bilevel.solvers.Status` code
    and iteration count per task, and ``adjoint_residual``, its true relative
    residual ``||b - A v|| / ||b||`` (``A = H + (lam + damping) I``,
    ``b = grad L_test(phi_i)``) recomputed from the returned ``v``, whatever the
    solver's recurrence claimed; and ``indefinite``, True where the solve proves
    ``A`` indefinite: CG met ``p^T A p <= 0``, or ``v^T b + ||v|| ||b - A v|| < 0``,
    which implies ``v^T A v = v^T b - v^T (b - A v) < 0`` (free for any solver,
    MINRES included; a lower bound on the indefinite systems, not a count of all).
    """

    grad: Params
    query_loss: Tensor
    status: Tensor | None
    iterations: Tensor | None
    inner_residual: Tensor | None = None
    adjoint_residual: Tensor | None = None
    indefinite: Tensor | None = None

    def count(self, status: Status) -> Tensor:
        """Number of tasks whose adjoint solve ended with ``status`` (a tensor: no host sync)."""
        if self.status is None:
            return torch.zeros((), dtype=torch.int64)
        return (self.status == int(status)).sum()

    def converged(self, rtol: float) -> Tensor:
        """Number of tasks whose adjoint solve reached ``||b - A v|| <= rtol ||b||`` (a tensor)."""
        if self.adjoint_residual is None:
            return torch.zeros((), dtype=torch.int64)
        return (self.adjoint_residual <= rtol).sum()


def meta_gradient(problem: IMAMLProblem, theta: Params, tasks: Task, *,
                  mode: Literal["implicit", "unrolled", "first_order"] = "implicit",
                  solver: LinearSolver | None = None, chunk_size: int | None = None,
                  over_tasks: Literal["auto", "vmap", "loop"] = "auto") -> MetaGradient:
    """Average meta-gradient over a batch of tasks (leading dimension of ``tasks``).

    ``solver`` defaults to ``CG(maxiter=5)`` in the implicit mode (the paper's 5
    CG steps); a system that is not positive definite stops early with
    ``Status.NEGATIVE_CURVATURE``, counted by :meth:`MetaGradient.count`.
    The adjoint's true relative residual comes with the solve (its right-hand side
    is the hypergradient's ``adjoint_rhs``): no work beyond the solve's.

    ``over_tasks`` says how the tasks are batched; every way returns the same
    meta-gradient up to rounding:

    * ``"vmap"``: one ``torch.func.vmap`` over the tasks (inner solve, linear solve
      and vector-Jacobian products batched together), ``chunk_size`` tasks at a
      time (``torch.func.vmap``'s argument; ``None``: all of them; a smaller chunk
      holds fewer tasks' activations at once). No value is read back to the host.
    * ``"loop"``: one :func:`bilevel.hypergradient` per task, outside every
      transform, so gradients and Hessian-vector products run plain autograd and
      each solve stops on its own. A task whose values are not finite is computed
      again beneath ``vmap``, so NaN comes back exactly as the vmapped way returns it.
    * ``"auto"`` (default): the loop for a single task. On a CPU with more tasks,
      the faster way for this configuration (problem, shapes, mode, solver,
      threads), measured on its first four calls, which alternate the two ways;
      later calls take the one with the better time, as
      ``torch.backends.cudnn.benchmark`` picks kernels. Elsewhere (a GPU), with
      ``chunk_size`` or while ``torch.compile`` traces: vmap. On a CPU, vmap turns
      each convolution into a grouped one, slower than the looped ones for
      full-resolution feature maps, while a small network is bound by the
      per-operation overhead that vmap shares across the tasks
      (``benchmarks/default_path.py`` measures both).
    """
    implicit = mode == "implicit"
    if solver is not None and not implicit:
        raise ValueError(f"solver= applies only to mode='implicit', not mode={mode!r}")
    if over_tasks not in OVER_TASKS:
        raise ValueError(f"over_tasks must be one of {OVER_TASKS}, got {over_tasks!r}")
    if over_tasks == "loop" and chunk_size is not None:
        raise ValueError("chunk_size= applies only to over_tasks='vmap' (or 'auto')")
    if implicit and solver is None:
        solver = CG(maxiter=5)
    kwargs = {"solver": solver} if implicit else {}

    def one(task: Task):
        result = bilevel.hypergradient(problem, theta, task, mode=mode, on_failure="ignore", **kwargs)
        if not implicit:
            return result.grad, result.outer_loss, result.inner_residual
        b, v, residual = result.adjoint_rhs, result.solve.x, result.solve.residual_norm
        relative = residual / torch.clamp(b.norm(), min=torch.finfo(b.dtype).tiny)
        indefinite = ((v * b).sum() + v.norm() * residual < 0) | (result.solve.status == int(Status.NEGATIVE_CURVATURE))
        return (result.grad, result.outer_loss, result.inner_residual, result.solve.status,
                result.solve.iterations, relative, indefinite)

    way, timings = _choose_way(problem, theta, tasks, mode, solver, over_tasks, chunk_size)
    start = time.perf_counter() if timings is not None else 0.0
    if way == "loop":
        out = _loop(one, tasks)
    else:
        out = torch.func.vmap(one, chunk_size=chunk_size)(tasks)
    if timings is not None:
        timings.append(time.perf_counter() - start)
    grad = {k: g.mean(0) for k, g in out[0].items()}
    if implicit:
        return MetaGradient(grad, out[1], out[3], out[4], out[2], out[5], out[6])
    return MetaGradient(grad, out[1], None, None, out[2])


_TRIALS = 2
"""Calls of each way that ``over_tasks="auto"`` times before it settles."""
_TIMINGS: "weakref.WeakKeyDictionary[IMAMLProblem, dict[tuple, dict[str, list[float]]]]" = weakref.WeakKeyDictionary()


def _choose_way(problem: IMAMLProblem, theta: Params, tasks: Task, mode: str, solver: LinearSolver | None,
                over_tasks: str, chunk_size: int | None) -> tuple[str, list[float] | None]:
    """``"vmap"`` or ``"loop"`` for this call, and the list its time goes to while ``"auto"`` measures."""
    if over_tasks != "auto":
        return over_tasks, None
    if chunk_size is not None or tasks.support_x.device.type != "cpu" or torch.compiler.is_compiling():
        return "vmap", None
    if tasks.support_x.shape[0] == 1:
        return "loop", None
    key = (mode, repr(solver), torch.get_num_threads(),
           tuple((name, tuple(t.shape), t.dtype) for name, t in theta.items()),
           tuple((tuple(t.shape), t.dtype) for t in tasks))
    try:
        per_problem = _TIMINGS.setdefault(problem, {})
    except TypeError:  # a problem that cannot be weakly referenced or hashed keeps no timings
        return "vmap", None
    times = per_problem.setdefault(key, {"vmap": [], "loop": []})
    if len(times["loop"]) < _TRIALS:
        way = "vmap" if len(times["vmap"]) <= len(times["loop"]) else "loop"
        return way, times[way]
    return min(times, key=lambda w: min(times[w])), None


def _loop(one: Callable[[Task], tuple], tasks: Task) -> tuple:
    """``one`` applied to each task in turn, outside every transform, its outputs stacked by task."""
    outs = []
    for i in range(tasks.support_x.shape[0]):
        try:
            outs.append(one(tasks.index(i)))
        except bilevel.NonFiniteError:  # the vmapped way returns the NaN instead of raising
            outs.append(pytree.tree_map(lambda t: t[0], torch.func.vmap(one)(tasks.index(slice(i, i + 1)))))
    return pytree.tree_map(lambda *per_task: torch.stack(per_task), *outs)


class Adaptation(NamedTuple):
    """Query loss and output per task, before (at ``theta``) and after adapting (at ``phi_i``)."""

    loss_before: Tensor
    loss_after: Tensor
    output_before: Tensor
    output_after: Tensor


def balanced_groups(forward: Forward, ways: int, shots: int) -> Forward:
    """``forward`` applied to the queries in class-balanced groups of ``shots`` per class.

    A batch-normalized network (:func:`~bilevel.problems.imaml.models.conv4_forward`)
    normalizes with the statistics of the batch it is given. The support set has
    ``shots`` examples of each of the ``ways`` classes, so scoring the queries in
    groups of that composition normalizes them as the adaptation did, instead of
    with the statistics of all queries at once. ``x`` holds ``ways * q`` queries in
    class-major order (the samplers' layout: class 0's ``q`` queries, then class
    1's, ...), with ``q`` a multiple of ``shots``; each group is one forward call.
    """
    def apply(params: Params, x: Tensor) -> Tensor:
        per_class = x.shape[0] // ways
        if per_class * ways != x.shape[0] or per_class % shots:
            raise ValueError(f"{x.shape[0]} queries do not split into groups of {shots} per class of {ways}")
        by_class = x.reshape(ways, per_class // shots, shots, *x.shape[1:])
        outs = [forward(params, by_class[:, g].reshape(ways * shots, *x.shape[1:])) for g in range(per_class // shots)]
        out = torch.stack(outs).reshape(per_class // shots, ways, shots, -1)  # (group, class, shot, output)
        return out.transpose(0, 1).reshape(x.shape[0], -1)

    return apply


@torch.no_grad()
def adapt(problem: IMAMLProblem, theta: Params, tasks: Task, *, chunk_size: int | None = None,
          query_forward: Forward | None = None) -> Adaptation:
    """Adapt ``theta`` to every task of the batch (vmapped inner solve, ``chunk_size`` tasks at a
    time as in :func:`meta_gradient`) and evaluate on the queries, with ``query_forward``
    (default ``problem.forward``; e.g. :func:`balanced_groups`)."""
    forward = query_forward or problem.forward

    def one(task: Task):
        phi = problem.solve_inner(theta, task, theta)
        before, after = forward(theta, task.query_x), forward(phi, task.query_x)
        return problem.loss(before, task.query_y), problem.loss(after, task.query_y), before, after

    return Adaptation(*torch.func.vmap(one, chunk_size=chunk_size)(tasks))
