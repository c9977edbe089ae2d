"""Fair meta-learning as a bilevel problem whose inner problem is a saddle point.

Per task (support set ``x, y, z``), a fairness constraint bounds a signed group
gap ``g(w)`` in parity-gap units (:func:`~bilevel.problems.fair.model.fairness_gap`):

- ``constraint="dbc"``: the decision boundary covariance of Zafar et al. (AISTATS 2017)
  on the score ``s_w(x) = w^T x + b``, as the group gap of ``1/2 + s/4``
  (``g = cov(s, z) / (4 zbar (1 - zbar))``); linear in ``w``, so the constraint is convex;
- ``constraint="dp"``: PDFM's probability form (Zhao et al., ICDM 2020), the smoothed
  demographic parity gap ``g = mean_{z=1} sigmoid(k s) - mean_{z=0} sigmoid(k s)``
  (sharpness ``k``); not convex.

With the smoothed absolute value ``D(w) = sqrt(g^2 + delta^2) - delta``, the inner
problem is the saddle point of

    L(w, rho) = BCE(w) + lam (D(w) - c) + prox/2 ||w - theta||^2
                - mu/2 (lam - lambda0)^2 + eps log(lam),      lam = exp(rho),

minimized over ``w`` and maximized over ``rho``. ``L`` is strictly concave in
``lam > 0`` (the dual prox and the log barrier, which keeps the multiplier
positive). For ``dbc`` it is strongly convex in ``w`` (the prox term), so the
saddle point is unique and smooth in ``(theta, lambda0)``. For ``dp`` the term
``lam D`` can bend ``L`` down along ``w``; the saddle point is then a local one,
and the implicit function theorem needs the Hessian of ``P(w) = max_rho L(w, rho)``
(the Schur complement below) positive definite there: a large enough ``prox``
keeps it so, and :meth:`FairMetaProblem.curvature` measures it at run time.
For fixed ``w`` the best multiplier solves ``mu lam^2 - (mu lambda0 + h) lam - eps = 0``
(``h = D(w) - c``): a smooth version of PDFM's projected dual step
``max(0, lambda0 + h / mu)`` that tends to it as ``eps -> 0``.

The root ``G = (grad_w L, grad_rho L) = 0`` has the symmetric indefinite
Jacobian ``[[H_ww, H_wr], [H_rw, H_rr]]`` with ``H_rr < 0``: the adjoint system
of the implicit hypergradient needs MINRES (or GMRES); CG meets negative
curvature. The meta-parameters are the primal prox centre ``theta`` and the
dual prox centre ``lambda0`` (PDFM's primal and dual initializations); the
outer loss is the query BCE plus, optionally,
``outer_fair_weight * max(0, D_query - c)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel import BilevelProblem
from bilevel.policy import host_checks_deferred
from bilevel.pytree import ravel, tree_map, tree_norm

from .model import CONSTRAINT_SETS, CONSTRAINTS, Params, bce, constraint_inputs, fairness_gap, smooth_abs
from .optim import damped_newton

__all__ = ["FairMetaProblem", "IndefiniteWarning", "Inner", "Outer"]

Inner = dict[str, Any]  # {"model": Params, "rho": Tensor}
Outer = dict[str, Any]  # {"theta": Params, "lambda0": Tensor}


class IndefiniteWarning(UserWarning):
    """A task's saddle-point system is indefinite in ``w`` (:meth:`FairMetaProblem.curvature` ``<= 0``)."""


def _sq_dist(a: Params, b: Params) -> Tensor:
    return sum(((a[k] - b[k]) ** 2).sum() for k in a)


class FairMetaProblem(BilevelProblem):
    """Fairness-constrained few-shot adaptation: a saddle point per task.

    Args:
        c: fairness bound on the smoothed ``|g|``, in parity-gap units for both constraints.
        prox: primal prox strength (iMAML's ``lambda``), the strong convexity in ``w``
            (for ``dp``, it must outweigh the constraint's negative curvature).
        mu: dual prox strength, the strong concavity in ``lam``.
        delta: smoothing width of ``|g|``.
        constraint: ``"dbc"`` (score covariance, convex) or ``"dp"`` (PDFM's probability form).
        sharpness: ``k`` of the ``dp`` constraint, ``sigmoid(k s)`` (1: PDFM's).
        barrier: ``eps``, weight of the log barrier keeping ``lam > 0``.
        outer_fair_weight: weight of the query constraint violation in the outer loss.
        constraint_set: ``"support"`` evaluates ``D`` on the support rows; ``"task"`` on the
            support rows and the query inputs (transductive, labels unused; see
            :func:`~bilevel.problems.fair.model.constraint_inputs`).
        inner_steps, inner_tol: Newton step cap and tolerance on ``||G||`` of :meth:`solve_inner`.
    """

    residual_tol = 1e-4

    def __init__(self, c: float = 0.1, *, prox: float = 1.0, mu: float = 1.0, delta: float = 0.01,
                 barrier: float = 1e-3, outer_fair_weight: float = 0.0, constraint_set: str = "support",
                 constraint: str = "dbc", sharpness: float = 1.0, inner_steps: int = 30, inner_tol: float = 1e-10):
        if constraint not in CONSTRAINTS:
            raise ValueError(f"unknown constraint {constraint!r}; choose one of {CONSTRAINTS}")
        for name, value in (("prox", prox), ("mu", mu), ("delta", delta), ("barrier", barrier),
                            ("sharpness", sharpness)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 for a unique, smooth saddle point; got {value}")
        if inner_steps < 1:
            raise ValueError(f"inner_steps (the Newton step cap, --newton-steps) must be >= 1, got {inner_steps}")
        if c < 0 or outer_fair_weight < 0:
            raise ValueError(f"c and outer_fair_weight must be >= 0, got {c} and {outer_fair_weight}")
        if constraint_set not in CONSTRAINT_SETS:
            raise ValueError(f"unknown constraint_set {constraint_set!r}; choose one of {CONSTRAINT_SETS}")
        self.constraint_set, self.constraint, self.sharpness = constraint_set, constraint, sharpness
        self.c, self.prox, self.mu, self.delta, self.barrier = c, prox, mu, delta, barrier
        self.outer_fair_weight = outer_fair_weight
        self.inner_steps, self.inner_tol = inner_steps, inner_tol

    # ------------------------------------------------------------------ math
    def violation(self, model: Params, x: Tensor, z: Tensor) -> Tensor:
        """``h = D(w) - c``: positive when the task's smoothed gap ``|g|`` exceeds the bound."""
        return smooth_abs(fairness_gap(model, x, z, self.constraint, self.sharpness), self.delta) - self.c

    def lagrangian(self, inner: Inner, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        """``L(w, rho)``: the BCE on the support set, ``D`` on the constraint set (module docstring)."""
        model, rho = inner["model"], inner["rho"]
        lam = torch.exp(rho)
        return (bce(model, data["xs"], data["ys"])
                + lam * self.violation(model, *constraint_inputs(data, self.constraint_set))
                + 0.5 * self.prox * _sq_dist(model, outer["theta"])
                - 0.5 * self.mu * (lam - outer["lambda0"]) ** 2
                + self.barrier * rho)

    def optimality(self, inner: Inner, outer: Outer, data: dict[str, Tensor]) -> Inner:
        """``G = (grad_w L, grad_rho L)``, zero exactly at the saddle point."""
        return torch.func.grad(self.lagrangian)(inner, outer, data)

    def best_rho(self, model: Params, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        """``argmax_rho L(w, rho)`` in closed form: the positive root of
        ``mu lam^2 - q lam - eps = 0``, ``q = mu lambda0 + h``, computed without cancellation."""
        q = self.mu * outer["lambda0"] + self.violation(model, *constraint_inputs(data, self.constraint_set))
        root = torch.sqrt(q * q + 4 * self.mu * self.barrier)
        lam = torch.where(q >= 0, (q + root) / (2 * self.mu), 2 * self.barrier / (root - q))
        return torch.log(lam)

    # -------------------------------------------------------- problem hooks
    def initial_inner(self, outer: Outer, data: dict[str, Tensor]) -> Inner:
        model = tree_map(torch.clone, outer["theta"])
        return {"model": model, "rho": self.best_rho(model, outer, data)}

    def _flat(self, outer: Outer, data: dict[str, Tensor], model: Params):
        """``(w_flat, P's value, (grad P, Hessian of P), unravel)`` helpers on the flat primal vector."""
        start, unravel = ravel(model)
        n = start.numel()

        def lagrangian(v: Tensor) -> Tensor:
            return self.lagrangian({"model": unravel(v[:n]), "rho": v[n]}, outer, data)

        def with_best_dual(flat: Tensor) -> Tensor:
            return torch.cat([flat, self.best_rho(unravel(flat), outer, data).reshape(1)])

        def grad_and_hessian(flat: Tensor) -> tuple[Tensor, Tensor]:
            v = with_best_dual(flat)
            h = torch.func.hessian(lagrangian)(v)
            schur = h[:n, :n] - torch.outer(h[:n, n], h[n, :n]) / h[n, n]
            return torch.func.grad(lagrangian)(v)[:n], schur

        return start, (lambda f: lagrangian(with_best_dual(f))), grad_and_hessian, unravel

    def curvature(self, inner: Inner, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        """Smallest eigenvalue of ``P``'s Hessian ``H_ww - H_wr H_rr^{-1} H_rw`` at ``inner``.

        Positive exactly when the saddle-point Jacobian has the inertia of a strict local
        saddle (one negative eigenvalue, the dual's): then the implicit meta-gradient is
        that of a local minimizer in ``w``. Always ``>= prox`` for ``dbc``; for ``dp`` a value
        ``<= 0`` means an indefinite system, which the harness counts and reports.
        """
        flat, _, grad_and_hessian, _ = self._flat(outer, data, inner["model"])
        return torch.linalg.eigvalsh(grad_and_hessian(flat)[1])[0]

    def solve_inner(self, outer: Outer, data: dict[str, Tensor], init: Inner) -> Inner:
        """Damped Newton on ``P(w) = max_rho L(w, rho)``, the dual at its closed-form best response.

        By Danskin's theorem ``grad P(w) = grad_w L(w, rho*(w))``, and its Hessian is the Schur
        complement ``H_ww - H_wr H_rr^{-1} H_rw`` of the Lagrangian's Hessian at ``(w, rho*(w))``
        (``H_rr = -mu lam^2 - eps < 0`` there). For ``dbc``, ``P`` is strongly convex (modulus
        ``prox``) and Newton's method is insensitive to the curvature ``|a|^2 / delta`` that the
        constraint adds along ``a``, so the solve reaches ``||G||`` to round-off in a few steps.
        For ``dp`` the Hessian may be indefinite away from the solution; its eigenvalues are
        replaced by their absolute values (at least ``prox * 1e-3``), a descent direction
        (Nocedal & Wright, Numerical Optimization, Sec. 3.4), unchanged wherever it is positive
        definite, so convergence stays quadratic near a strict local minimizer.
        ``rho = rho*(w)`` makes the dual half of ``G`` vanish. Stops once ``||G|| <= inner_tol``
        (outside vmap).
        """
        start, value, grad_and_hessian, unravel = self._flat(outer, data, init["model"])
        if self.constraint == "dp":
            exact = grad_and_hessian

            def grad_and_hessian(flat: Tensor) -> tuple[Tensor, Tensor]:
                grad, hessian = exact(flat)
                eig, vec = torch.linalg.eigh(hessian)
                return grad, (vec * torch.clamp(eig.abs(), min=1e-3 * self.prox)) @ vec.T

        def converged(flat: Tensor) -> bool:
            model = unravel(flat)
            inner = {"model": model, "rho": self.best_rho(model, outer, data)}
            return float(tree_norm(self.optimality(inner, outer, data))) <= self.inner_tol

        check = None if host_checks_deferred(outer, data) else converged
        flat = damped_newton(value, grad_and_hessian, start, self.inner_steps, check)
        model = unravel(flat)
        return {"model": model, "rho": self.best_rho(model, outer, data)}

    def outer_objective(self, inner: Inner, outer: Outer, data: dict[str, Tensor]) -> Tensor:
        model = inner["model"]
        loss = bce(model, data["xq"], data["yq"])
        if self.outer_fair_weight:
            loss = loss + self.outer_fair_weight * torch.relu(self.violation(model, data["xq"], data["zq"]))
        return loss
