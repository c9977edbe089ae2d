"""Baselines in the same harness: unconstrained iMAML and MAML, and PDFM.

Every problem takes the outer dict ``{"theta": params, "lambda0": tensor}`` of
:class:`~bilevel.problems.fair.problem.FairMetaProblem`, so one training loop
serves all methods; the unconstrained ones ignore ``lambda0``.

- :class:`ProxLogisticProblem`: iMAML (Rajeswaran et al., NeurIPS 2019), the
  minimizer of ``BCE + prox/2 ||w - theta||^2``, differentiated implicitly (CG).
- :class:`GradientStepProblem`: MAML (Finn et al., ICML 2017), ``inner_steps``
  gradient steps on the support BCE from ``theta``, differentiated by unrolling.
- :class:`PDFMProblem`: PDFM (Zhao et al., ICDM 2020) as published: from
  ``(theta, lambda0)``, ``pd_updates`` rounds of ``inner_steps`` gradient steps
  on ``BCE + lam (|DBC_p| - c)``, each round followed by the projected dual
  step ``lam <- max(0, lam + dual_lr (|DBC_p(w_bar)| - c))`` at the running
  average ``w_bar`` of the rounds' iterates; ``DBC_p`` is the covariance of the
  predicted *probability* with ``z``, as in PDFM's code. The meta-gradient is
  first order (``mode="first_order"``), and ``lambda0`` follows the projected
  meta dual ascent of :func:`pdfm_dual_step`, not a gradient. The bound ``c`` is
  given in parity-gap units, like ours: since ``DBC_p = zbar (1 - zbar) x`` the soft
  gap ``mean_{z=1} p - mean_{z=0} p``, PDFM's bound on ``|DBC_p|`` is ``c zbar (1 - zbar)``
  (:func:`dbc_bound`, with ``zbar`` of the rows the constraint is evaluated on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel import BilevelProblem
from bilevel.policy import host_checks_deferred
from bilevel.pytree import tree_map, tree_norm

from .model import CONSTRAINT_SETS, Params, bce, constraint_inputs, covariance, score
from .optim import accelerated_descent
from .problem import Outer, _sq_dist

__all__ = ["ProxLogisticProblem", "GradientStepProblem", "PDFMProblem", "pdfm_dual_step", "probability_dbc",
           "dbc_bound"]


def probability_dbc(model: Params, x: Tensor, z: Tensor) -> Tensor:
    """PDFM's fairness measure ``|mean_i (z_i - mean z) sigmoid(s(x_i))|``."""
    return covariance(torch.sigmoid(score(model, x)), z).abs()


def dbc_bound(c: float, z: Tensor) -> Tensor:
    """PDFM's bound on ``|DBC_p|`` equivalent to a soft parity gap ``c``: ``c zbar (1 - zbar)``."""
    zbar = z.mean(-1)
    return c * zbar * (1 - zbar)


class ProxLogisticProblem(BilevelProblem):
    """iMAML: ``w* = argmin BCE_support(w) + prox/2 ||w - theta||^2``; SPD Hessian, CG."""

    residual_tol = 1e-4

    def __init__(self, prox: float = 1.0, inner_steps: int = 300, inner_tol: float = 1e-6):
        if not prox > 0:
            raise ValueError(f"prox must be > 0 (strong convexity of the inner problem), got {prox}")
        self.prox, self.inner_steps, self.inner_tol = prox, inner_steps, inner_tol

    def inner_objective(self, inner: Params, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        return bce(inner, data["xs"], data["ys"]) + 0.5 * self.prox * _sq_dist(inner, outer["theta"])

    def initial_inner(self, outer: Outer, data: dict[str, Tensor]) -> Params:
        return tree_map(torch.clone, outer["theta"])

    def solve_inner(self, outer: Outer, data: dict[str, Tensor], init: Params) -> Params:
        """Nesterov's method with the smoothness bound ``sigma_max([x, 1])^2 / (4 n) + prox``."""
        x = data["xs"]
        sigma = torch.linalg.matrix_norm(torch.cat([x, torch.ones_like(x[..., :1])], -1), ord=2)
        smooth = sigma ** 2 / (4 * x.shape[0]) + self.prox

        def grad_and_scale(model: Params):
            return self.optimality(model, outer, data), smooth

        def converged(model: Params) -> bool:
            return float(tree_norm(self.optimality(model, outer, data))) <= self.inner_tol

        check = None if host_checks_deferred(outer, data) else converged
        return accelerated_descent(grad_and_scale, init, self.prox, self.inner_steps, check)

    def outer_objective(self, inner: Params, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        return bce(inner, data["xq"], data["yq"])


class GradientStepProblem(BilevelProblem):
    """MAML: ``inner_steps`` steps of ``w <- w - inner_lr grad BCE_support(w)`` from ``theta``."""

    residual_tol = None  # a few steps, not a root
    inner_tol = 0.0

    def __init__(self, inner_lr: float = 0.1, inner_steps: int = 5):
        self.inner_lr, self.inner_steps = inner_lr, inner_steps

    def inner_objective(self, inner: Params, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        return bce(inner, data["xs"], data["ys"])

    def initial_inner(self, outer: Outer, data: dict[str, Tensor]) -> Params:
        return tree_map(torch.clone, outer["theta"])

    def outer_objective(self, inner: Params, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        return bce(inner, data["xq"], data["yq"])


class PDFMProblem(BilevelProblem):
    """PDFM's primal-dual task adaptation (see the module docstring).

    Args:
        c: fairness bound in parity-gap units (on ``|DBC_p| / (zbar (1 - zbar))``).
        inner_lr, inner_steps: primal gradient steps per round.
        dual_lr: step of the per-task dual ascent.
        pd_updates: number of primal-dual rounds.
        constraint_set: where ``DBC_p`` is evaluated during adaptation, ``"support"`` (as
            published) or ``"task"`` (support rows and query inputs, transductive).
    """

    residual_tol = None  # a fixed number of primal-dual steps, not a root

    def __init__(self, c: float = 0.05, *, inner_lr: float = 0.1, inner_steps: int = 1, dual_lr: float = 0.5,
                 pd_updates: int = 10, constraint_set: str = "support"):
        if constraint_set not in CONSTRAINT_SETS:
            raise ValueError(f"unknown constraint_set {constraint_set!r}; choose one of {CONSTRAINT_SETS}")
        self.constraint_set = constraint_set
        self.c, self.inner_lr, self.inner_steps = c, inner_lr, inner_steps
        self.dual_lr, self.pd_updates = dual_lr, pd_updates

    def penalized(self, model: Params, lam: Tensor, data: dict[str, Tensor]) -> Tensor:
        """PDFM's primal objective ``BCE + lam (|DBC_p| - c zbar (1 - zbar))``: BCE on the support set,
        ``DBC_p`` on the constraint set."""
        x, z = constraint_inputs(data, self.constraint_set)
        return bce(model, data["xs"], data["ys"]) + lam * (probability_dbc(model, x, z) - dbc_bound(self.c, z))

    def inner_objective(self, inner: Params, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        return self.penalized(inner, outer["lambda0"], data)

    def initial_inner(self, outer: Outer, data: dict[str, Tensor]) -> Params:
        return tree_map(torch.clone, outer["theta"])

    def solve_inner(self, outer: Outer, data: dict[str, Tensor], init: Params) -> Params:
        model, lam = init, outer["lambda0"]
        average = tree_map(torch.zeros_like, init)
        for round_ in range(1, self.pd_updates + 1):
            for _ in range(self.inner_steps):
                grad = torch.func.grad(self.penalized)(model, lam, data)
                model = tree_map(lambda p, g: p - self.inner_lr * g, model, grad)
            average = tree_map(lambda a, p: a + (p - a) / round_, average, model)
            x, z = constraint_inputs(data, self.constraint_set)
            gap = probability_dbc(average, x, z) - dbc_bound(self.c, z)
            lam = torch.relu(lam + self.dual_lr * gap)
        return model

    def outer_objective(self, inner: Params, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        return bce(inner, data["xq"], data["yq"])


def pdfm_dual_step(lambda0: Tensor, query_dbc: Tensor, bound: Tensor | float, meta_dual_lr: float) -> Tensor:
    """PDFM's meta dual update ``lambda0 <- max(0, lambda0 + meta_dual_lr sum_tasks (|DBC_p| - bound))``
    (``bound``: per task, :func:`dbc_bound` of the query rows)."""
    return torch.relu(lambda0 + meta_dual_lr * (query_dbc - bound).sum())
