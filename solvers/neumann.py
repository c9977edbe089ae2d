"""Truncated Neumann series (Richardson iteration), with a step size chosen per system."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec, Preconditioner
from ._result import SolveResult, Status

GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))
"""Spacing of the fixed start vector ``cos(j * GOLDEN_ANGLE)`` of the power iteration: deterministic
(no random generator is drawn from) and without structure that an operator would share."""


def step_size(op: MatVec, precond: Preconditioner, r0: Tensor, iterations: int) -> Tensor:
    """A step ``alpha`` per system for the Richardson iteration on ``K = M A``, from power iterations.

    ``iterations`` power iterations ``v <- K v / ||K v||`` from ``r0 / ||r0|| + 2 u / ||u||`` (``u`` a
    fixed vector, so that a right-hand side lying in a few eigenvectors still reaches the top of the
    spectrum, and weighted so that the two never cancel); at the last iterate ``v`` (``||v|| = 1``)::

        alpha = <v, K v> / ||K v||^2

    For symmetric positive definite ``K`` this is ``sum w l / sum w l^2`` over the eigenvalues ``l``
    weighted by ``v``'s components ``w``: at least ``1 / lambda_max`` and close to it once the power
    iteration has found the top of the spectrum, so ``I - alpha K`` contracts (it needs
    ``alpha < 2 / lambda_max``) at any scale of ``A``. For a complex dominant pair ``mu`` it is
    ``Re mu / |mu|^2``, the step that makes ``|1 - alpha mu| < 1``. A direction of negative
    curvature (``<v, K v> <= 0``) gets ``1 / ||K v||``, and a zero or non-finite estimate ``1``: no
    step contracts there, and the series reports ``DIVERGED`` or ``MAX_ITERATIONS``.

    Cost: ``iterations`` applications of the operator (and of ``M``) for all systems at once, and no
    host synchronization (vmap- and capture-safe).
    """
    n = r0.shape[-1]
    u = torch.cos(torch.arange(n, dtype=r0.dtype, device=r0.device) * GOLDEN_ANGLE)
    tiny = torch.finfo(r0.dtype).tiny
    v = r0 / B.vec(B.norm(r0).clamp(min=tiny)) + 2.0 * u / B.norm(u)  # ||v|| >= 1
    v = torch.where(torch.isfinite(v), v, u)  # a non-finite r0 is reported by the series itself
    Kv = v
    for _ in range(iterations):
        v = Kv / B.vec(B.norm(Kv).clamp(min=tiny))
        Kv = precond(op(v))
    curvature, size = B.dot(v, Kv), B.dot(Kv, Kv)
    alpha = torch.where(curvature > 0, curvature / size.clamp(min=tiny), 1.0 / size.clamp(min=tiny).sqrt())
    return torch.where(torch.isfinite(alpha) & (alpha > 0) & (size > 0), alpha, torch.ones_like(alpha))


@dataclass(frozen=True, kw_only=True)
class Neumann(B.IterativeSolver):
    """Neumann series ``A^{-1} b = alpha sum_k (I - alpha A)^k b``.

    The series converges when the spectral radius of ``I - alpha A`` is below 1
    (for SPD ``A``: ``0 < alpha < 2 / lambda_max``). Its partial sums are the
    Richardson iteration ``x += alpha r; r = (I - alpha A) r``, whose residual
    ``r_k = (I - alpha A)^k r_0`` is each new term divided by ``alpha``: one
    matvec per term and no inner products, which makes it the cheapest (and
    slowest, error ``~ rho^k``) choice, popular for truncated implicit
    differentiation (Lorraine et al., 2020). With ``M`` the terms are
    ``(I - alpha M A)^k``.

    Without ``alpha``, each system gets its own step from ``power_iterations``
    power iterations on ``M A`` (:func:`step_size`): about ``1 / lambda_max``, so
    the series converges on a symmetric positive definite system of any scale, at
    the rate ``1 - lambda_min / lambda_max`` per term. That costs
    ``power_iterations`` matvecs (default 10) once per solve, for all systems
    together, on top of one matvec per term; the reported ``iterations`` count the
    terms only. An explicit ``alpha`` is used as given, for every system.

    A system whose residual grows past ``divergence_factor`` times its initial
    norm (or to Inf) stops with ``Status.DIVERGED``: the step is too large for its
    operator (give a smaller ``alpha``), or no step contracts (an indefinite
    operator: use MINRES or GMRES).

    Args:
        alpha: step size, ``None`` (default) to choose one per system; give it
            so that ``alpha * lambda_max(A) < 2``.
        rtol, atol: stop a system once ``||b - A x|| <= max(rtol ||b||, atol)``;
            set both to 0 for a fixed number of terms.
        maxiter: number of terms (matvecs) at most; ``None`` means 100.
        M: preconditioner applied to each residual.
        ridge: solve ``(A + ridge I) x = b`` instead.
        history: record the residual norm after every iteration.
        divergence_factor: growth of ``||r||`` over ``||r_0||`` declared divergence.
        power_iterations: matvecs spent choosing ``alpha`` when it is not given.
    """

    alpha: float | None = None
    divergence_factor: float = 1e3
    power_iterations: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is not None:
            B.check_positive("alpha", self.alpha)
        B.check_positive("divergence_factor", self.divergence_factor)
        B.check_count("power_iterations", self.power_iterations, allow_none=False)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> SolveResult:
        op, precond, s, maxiter = self.start(matvec, b, x0, default_maxiter=lambda n: 100)
        x, r, rnorm, status, its = s.x, s.r, s.rnorm, s.status, s.iterations
        if self.alpha is None:
            alpha = B.vec(step_size(op, precond, r, self.power_iterations))
        else:
            alpha = self.alpha
        limit = self.divergence_factor * rnorm
        history = [rnorm] if self.history else None

        for k in range(1, maxiter + 1):
            if B.all_finished(status == B.RUNNING, k - 1):
                break
            active = status == B.RUNNING
            term = alpha * precond(r)
            x_new = x + term
            r_new = r - op(term)
            rnorm_new = B.norm(r_new)
            grew = (rnorm_new > limit) | torch.isinf(rnorm_new)
            status = B.mark(status, active & grew, Status.DIVERGED)
            bad = torch.isnan(rnorm_new)
            status = B.mark(status, active & ~grew & bad, Status.NONFINITE)
            step = active & ~grew & ~bad
            x = B.select(step, x_new, x)
            r = B.select(step, r_new, r)
            rnorm = B.select(step, rnorm_new, rnorm)
            its = its + step.long()
            status = B.mark(status, step & (rnorm <= s.tol), Status.CONVERGED)
            if history is not None:
                history.append(rnorm)

        return B.finish(op, b, x, status, its, history, maxiter, s.tol)
