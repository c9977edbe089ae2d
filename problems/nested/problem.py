"""NestedMAML's three levels as one :class:`bilevel.BilevelProblem` (Killamsetty et al., AAAI 2022).

Levels, for training tasks ``i = 1..N`` with weights ``w`` and clean validation tasks ``j``::

    phi_i(theta) = argmin_phi L_train_i(phi) + lam/2 ||phi - theta||^2             (iMAML adaptation)
    theta*(w)    = argmin_theta 1/N sum_i w_i L_query_i(phi_i(theta)) + mu/2 ||theta||^2   (middle)
    min_{w >= 0} F(w) = 1/M sum_j L_query_j(phi_j(theta*(w)))                        (outer)

Nonnegativity by parametrization (:func:`task_weights`), the outer variable being
``u``, uniform weights at ``u = 0``: ``w = N softmax(u)`` (``"softmax"``: ``sum w = N``,
so the tasks compete for a fixed total) or ``w = 2 sigmoid(u)`` (``"sigmoid"``: each
weight in ``(0, 2)`` on its own; with half of the tasks at 0 and half at 2 it is the
oracle's weighting).

:class:`NestedMAMLProblem` has ``theta`` as its *inner* variable and ``u`` as
its outer one. Its optimality condition is the middle level's stationarity,

    G(theta, u) = 1/N sum_i w_i(u) m_i(theta) + mu theta,    m_i = (I + H_i/lam)^{-1} grad L_query_i(phi_i)

where ``m_i`` is the implicit meta-gradient of task ``i``: ``torch.func.grad`` of
``L_query_i`` through ``phi_i(theta)``, which :func:`bilevel.implicit_root`
makes differentiable. ``bilevel.hypergradient`` then differentiates ``G`` once
more (vector-Jacobian products through the implicit meta-gradients, i.e.
Hessian-vector products of the meta-objective) and solves

    (d_theta G)^T v = grad_theta F,    dF/du = -(d_u G)^T v,   (d_u G)^T v = d w/d u^T [-(1/N) m_i . v]_i.

:func:`lookahead_weights` is the original's first-order rule instead (in the
style of learning to reweight; Ren et al., ICML 2018), and :func:`influence_weights`
the same per-step rule with the implicit response of the middle level in place of
its one-step look-ahead.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor

import bilevel
from bilevel.problems.imaml import IMAMLProblem, Task
from bilevel.problems.imaml.models import Params
from bilevel.solvers import CG, LinearSolver

__all__ = ["NestedData", "NestedMAMLProblem", "WEIGHTINGS", "influence_weights", "lookahead_weights", "task_weights"]

WEIGHTINGS = ("softmax", "sigmoid")


class NestedData(NamedTuple):
    """The training tasks (batched, some corrupted), the clean validation tasks, and, when ``train`` is a
    meta-batch drawn from a larger pool, the pool positions of its tasks (``None``: ``train`` is the pool)."""

    train: Task
    val: Task
    index: Tensor | None = None


def task_weights(u: Tensor, weighting: str = "softmax") -> Tensor:
    """Nonnegative task weights, all 1 at ``u = 0``: ``N softmax(u)`` (summing to ``N``) or
    ``2 sigmoid(u)`` (each in ``(0, 2)``), by ``weighting``."""
    if weighting == "softmax":
        return len(u) * torch.softmax(u, 0)
    if weighting == "sigmoid":
        return 2 * torch.sigmoid(u)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _clamped_and_normalized(score: Tensor) -> Tensor:
    """``score`` clamped at 0 and scaled to sum ``N``; all ones when no score is positive. A NaN or
    Inf score (a task whose meta-gradient is not finite) raises :class:`~bilevel.NonFiniteError`."""
    bad = ~torch.isfinite(score)
    if bool(bad.any()):
        raise bilevel.NonFiniteError(
            f"NaN or Inf in the task scores of batch positions {bad.nonzero().flatten().tolist()}: those tasks' "
            "meta-gradients (or the validation gradient) are not finite; check their data, or make the "
            "adaptation stable (a larger lam, a smaller inner step)")
    w = score.clamp(min=0)
    total = w.sum()
    return torch.where(total > 0, len(w) * w / total.clamp(min=torch.finfo(w.dtype).tiny), torch.ones_like(w))


def lookahead_weights(task_grads: Params, val_grad: Params) -> Tensor:
    """The first-order look-ahead rule of NestedMAML's released code (learning to reweight).

    A virtual step ``theta' = theta - alpha sum_i eps_i m_i`` taken at ``eps = 0`` gives
    ``d L_val(theta') / d eps_i = -alpha m_i . grad L_val(theta)``; the weights are that
    negated gradient clamped at 0 and normalized, here to sum ``N`` (all ones when no
    task agrees with the validation gradient).
    """
    score = sum((g.flatten(1) * val_grad[k].flatten()).sum(1) for k, g in task_grads.items())
    return _clamped_and_normalized(score)


def influence_weights(problem: "NestedMAMLProblem", theta: Params, data: "NestedData",
                      solver: LinearSolver) -> tuple[Tensor, bilevel.HypergradientResult]:
    """The look-ahead rule with the middle level's implicit response: per-step weights from each task's
    influence on the validation loss (Koh and Liang, ICML 2017), and the hypergradient that gave them.

    At uniform weights ``w = 1``, ``-dF/dw_i = (1/N) m_i . v`` with ``(d_theta G)^T v = grad_theta F``
    (:func:`bilevel.hypergradient`, ``solver`` for the adjoint system, linearized at ``theta``): how much
    the validation loss at the middle level's optimum falls as task ``i`` weighs more. The weights are
    that score clamped at 0 and normalized to sum ``N``, like :func:`lookahead_weights`, whose score is
    the same with ``(d_theta G)^{-1}`` replaced by a step size times the identity. On a meta-batch
    (``data.index``) the batch's tasks are the ``N`` tasks.
    """
    data = data._replace(index=None)
    at_uniform = copy.copy(problem)
    at_uniform.weighting = "sigmoid"  # w = 2 sigmoid(u): w = 1 and dw/du = 1/2 at u = 0
    like = next(iter(theta.values()))
    u = torch.zeros(len(data.train.query_y), dtype=like.dtype, device=like.device)
    hyper = bilevel.hypergradient(at_uniform, u, data, init=theta, solver=solver, on_failure="ignore")
    return _clamped_and_normalized(-2 * hyper.grad), hyper


class NestedMAMLProblem(bilevel.BilevelProblem):
    """The middle level as the inner problem: inner variable ``theta``, outer ``u``, data :class:`NestedData`.

    Args:
        imaml: the per-task adaptation (its ``lam``, inner solver and loss).
        theta0: the meta-parameters' starting point (``initial_inner``).
        mu: the middle level's L2 strength (makes ``d_theta G`` better conditioned).
        adapt_solver: the linear solver of each task's implicit meta-gradient
            (default ``CG(maxiter=5)``, iMAML's 5 CG steps; ``Direct()`` for exact checks).
        weighting: the weights' parametrization, ``"softmax"`` or ``"sigmoid"`` (:func:`task_weights`).
        middle_lr, middle_steps: the default ``solve_inner``, gradient descent on the
            middle objective from ``init`` (0 steps: ``hypergradient`` linearizes at the
            ``init`` it is given, the meta-parameters of an alternating training loop).
    """

    residual_tol = None  # the middle level is solved approximately by design

    def __init__(self, imaml: IMAMLProblem, theta0: Params, *, mu: float = 1e-3,
                 adapt_solver: LinearSolver | None = None, weighting: str = "softmax", middle_lr: float = 0.1,
                 middle_steps: int = 0):
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.imaml, self.theta0, self.mu, self.weighting = imaml, theta0, mu, weighting
        self.adapt_solver = CG(maxiter=5) if adapt_solver is None else adapt_solver
        self.inner_lr, self.inner_steps, self.inner_tol = middle_lr, middle_steps, None

    def adapt(self, theta: Params, task: Task) -> Params:
        """``phi(theta)`` for one task, differentiable in ``theta`` by the implicit function theorem."""
        solve = bilevel.implicit_root(self.imaml.optimality, self.adapt_solver, on_failure="ignore",
                                      residual_tol=None)(lambda th, t: self.imaml.solve_inner(th, t, th))
        return solve(theta, task)

    def adapted_loss(self, theta: Params, task: Task) -> Tensor:
        """``L_query(phi(theta))`` of one task."""
        return self.imaml.query_loss(self.adapt(theta, task), task)

    def task_meta_gradients(self, theta: Params, tasks: Task) -> Params:
        """``m_i(theta)`` of every task of the batch, stacked on a leading axis (vmapped)."""
        return torch.func.vmap(torch.func.grad(self.adapted_loss), in_dims=(None, 0))(theta, tasks)

    def middle_gradient(self, theta: Params, w: Tensor, task_grads: Params) -> Params:
        """``1/N sum_i w_i m_i + mu theta`` from the stacked task meta-gradients ``m_i``; a task of weight
        0 is dropped (its ``m_i`` may be non-finite when its adaptation diverged)."""
        def weighted(m: Tensor) -> Tensor:
            kept = (w != 0).reshape(-1, *([1] * (m.dim() - 1)))
            return torch.tensordot(w, torch.where(kept, m, torch.zeros_like(m)), dims=1)

        return {k: weighted(task_grads[k]) / len(w) + self.mu * theta[k] for k in theta}

    def weighted_meta_gradient(self, theta: Params, w: Tensor, tasks: Task) -> Params:
        """The gradient of the middle objective at ``theta`` with weights ``w``."""
        return self.middle_gradient(theta, w, self.task_meta_gradients(theta, tasks))

    def validation_loss(self, theta: Params, tasks: Task) -> Tensor:
        """Mean query loss after adaptation over a batch of tasks."""
        return torch.func.vmap(self.adapted_loss, in_dims=(None, 0))(theta, tasks).mean()

    def optimality(self, theta: Params, u: Tensor, data: NestedData) -> Params:
        """``G(theta, u)``: the middle level's stationarity condition; on a meta-batch ``B`` of the pool
        (``data.index``), its unbiased estimate ``1/|B| sum_{i in B} w_i(u) m_i + mu theta``."""
        w = task_weights(u, self.weighting)
        return self.weighted_meta_gradient(theta, w if data.index is None else w[data.index], data.train)

    def outer_objective(self, theta: Params, u: Tensor, data: NestedData) -> Tensor:
        """``F``: the clean validation tasks' query loss after adaptation."""
        return self.validation_loss(theta, data.val)

    def initial_inner(self, u: Tensor, data: NestedData) -> Params:
        return self.theta0
