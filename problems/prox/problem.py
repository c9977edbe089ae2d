"""Image restoration with a learned regularizer, differentiated three ways through the public API.

Inner problem, for observations ``y = k * x_true + noise`` (``k`` a circular blur)::

    x*(theta) = argmin_x  E(x) = 1/2 ||K x - y||^2 + sum_j exp(theta_j) sum_pixels huber_eps(d_j * x)

with ``d_j`` a bank of finite-difference filters, fixed or learned (a field of
experts; Roth & Black, IJCV 2009). Outer loss: the mean squared error of
``x*(theta)`` against ``x_true`` on training images. The same ``x*`` is

(a) the root of ``grad E`` (symmetric positive definite Hessian: CG, MINRES), by
    :class:`ProxRestoration` through :func:`bilevel.hypergradient` or
    ``torch.func.grad(E)`` through :func:`bilevel.implicit_root`;
(b) the fixed point of proximal gradient ``x = prox_{tau g}(x - tau grad R(x))``
    with ``g = 1/2 ||K x - y||^2`` (its prox is a Fourier-diagonal solve) and
    ``R`` the regularizer, whose Jacobian ``P (I - tau H_R)`` is a product of two
    symmetric matrices that do not commute (GMRES, BiCGSTAB; :meth:`pg_solution`);
(c) the fixed point of ADMM on ``(x, z, u)`` with the split ``z_j = d_j * x``
    (Boyd et al., Found. Trends Mach. Learn. 2011; :meth:`admm_solution`).

The unrolled baseline differentiates through the proximal-gradient steps
(``mode="unrolled"``, :meth:`ProxRestoration.inner_update`), as nabla-Prox
(Lai et al., SIGGRAPH 2023) unrolls its solvers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

import bilevel
from bilevel import BilevelProblem
from bilevel.policy import OnFailure
from bilevel.solvers import LinearSolver

from .operators import analysis, convolve, huber, huber_grad, huber_prox, synthesis, transfer

__all__ = ["FORWARD", "ProxRestoration", "Theta"]

Theta = dict[str, Tensor]
"""Outer parameters: ``log_weights (J,)``, and ``filters (J, k, k)`` when the bank is learned."""
FORWARD = ("admm", "pg")
"""Forward solvers of the inner problem."""


class ProxRestoration(BilevelProblem):
    """The restoration problem; ``data = (clean, observed)``, images ``(B, H, W)``.

    Args:
        blur: the blur kernel ``(k, k)`` (``[[1.]]``: denoising).
        bank: the fixed filter bank ``(J, k, k)``, used unless ``theta`` holds ``filters``.
        eps: Huber's smoothing width.
        penalty: ADMM's penalty ``beta`` relative to the regularizer's curvature, ``beta = penalty mean(w) / eps``
            (the scaled dual ``u`` converges to ``w huber'(d * x) / beta``).
        step: proximal-gradient step as a fraction of ``1 / L``, ``L = sum_j w_j max|d_j^|^2 / eps``.
        forward: the forward solver of :meth:`solve_inner`, ``"admm"`` or ``"pg"``.
        tol: forward solvers stop once ``||T(s) - s|| <= tol ||T(s)||``; 0 runs all ``max_iter``.
        max_iter: iteration cap of the forward solvers; ``inner_steps`` of ``mode="unrolled"``.
    """

    inner_tol = None

    def __init__(self, blur: Tensor, bank: Tensor, *, eps: float = 0.05, penalty: float = 0.1, step: float = 1.0,
                 forward: str = "admm", tol: float = 1e-8, max_iter: int = 3000):
        if forward not in FORWARD:
            raise ValueError(f"forward solver must be one of {FORWARD}, got {forward!r}")
        self.blur, self.bank = blur, bank
        self.eps, self.penalty, self.step = eps, penalty, step
        self.forward, self.tol, self.inner_steps = forward, tol, max_iter

    # -- operators -------------------------------------------------------------------------------------------
    def operators(self, theta: Theta, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(k^, d^, w)``: the blur's and the bank's transfer functions and the weights ``exp(theta)``."""
        filters = theta.get("filters", self.bank)
        return transfer(self.blur, shape), transfer(filters, shape), theta["log_weights"].exp()

    def energy(self, x: Tensor, theta: Theta, y: Tensor) -> Tensor:
        """``E(x) = 1/2 ||K x - y||^2 + sum_j w_j sum huber(d_j * x)``, summed over the batch."""
        k, d, w = self.operators(theta, x.shape[-2:])
        data = 0.5 * (convolve(x, k) - y).pow(2).sum()
        return data + (w[:, None, None] * huber(analysis(x, d), self.eps)).sum()

    # -- (a) the smooth objective's optimality ---------------------------------------------------------------
    def inner_objective(self, inner: Tensor, outer: Theta, data: tuple[Tensor, Tensor]) -> Tensor:
        return self.energy(inner, outer, data[1])

    def outer_objective(self, inner: Tensor, outer: Theta, data: tuple[Tensor, Tensor]) -> Tensor:
        """Mean squared error against the clean images."""
        return (inner - data[0]).pow(2).mean()

    def initial_inner(self, outer: Theta, data: tuple[Tensor, Tensor]) -> Tensor:
        return data[1].clone()

    def inner_update(self, inner: Tensor, outer: Theta, data: tuple[Tensor, Tensor]) -> Tensor:
        """One proximal-gradient step: what ``mode="unrolled"`` differentiates through."""
        return self.pg_step(inner, outer, data[1])

    def solve_inner(self, outer: Theta, data: tuple[Tensor, Tensor], init: Tensor) -> Tensor:
        y = data[1]
        if self.forward == "pg":
            return self.run_pg(outer, y, init)[0]
        return self.run_admm(outer, y, self.admm_start(init, outer))[0]["x"]

    # -- (b) proximal gradient -------------------------------------------------------------------------------
    def _pg(self, x: Tensor, y: Tensor, k: Tensor, d: Tensor, w: Tensor) -> Tensor:
        tau = self.step * self.eps / (w * d.abs().pow(2).flatten(1).amax(1)).sum()
        v = x - tau * synthesis(w[:, None, None] * huber_grad(analysis(x, d), self.eps), d)
        coefficients = (torch.fft.rfft2(v) + tau * k.conj() * torch.fft.rfft2(y)) / (1 + tau * k.abs().pow(2))
        return torch.fft.irfft2(coefficients, s=x.shape[-2:])

    def pg_step(self, x: Tensor, theta: Theta, y: Tensor) -> Tensor:
        """``T(x) = prox_{tau g}(x - tau grad R(x))``, ``prox_{tau g}(v) = (I + tau K^T K)^{-1} (v + tau K^T y)``."""
        return self._pg(x, y, *self.operators(theta, x.shape[-2:]))

    def run_pg(self, theta: Theta, y: Tensor, x: Tensor) -> tuple[Tensor, int]:
        """Proximal gradient from ``x``; returns the iterate and the iterations run."""
        ops = self.operators(theta, y.shape[-2:])
        return iterate(lambda s: self._pg(s, y, *ops), x, self.tol, self.inner_steps)

    def pg_solution(self, solver: LinearSolver | str = "gmres", on_failure: OnFailure = "warn"
                    ) -> Callable[[Theta, Tensor], Tensor]:
        """``(theta, y) -> x*``, differentiable by :func:`bilevel.implicit_fixed_point`; the forward
        iterations of the last call are kept in ``.forward_iterations``, the adjoint solve in ``.last_solve``."""

        @bilevel.implicit_fixed_point(self.pg_step, solver, on_failure=on_failure)
        def solve(theta: Theta, y: Tensor) -> Tensor:
            x, solve.forward_iterations = self.run_pg(theta, y, y.clone())
            return x

        return solve

    # -- (c) ADMM --------------------------------------------------------------------------------------------
    def _admm(self, s: dict[str, Tensor], y: Tensor, k: Tensor, d: Tensor, w: Tensor) -> dict[str, Tensor]:
        beta = self.penalty * w.mean() / self.eps
        rhs = k.conj() * torch.fft.rfft2(y) + beta * (torch.fft.rfft2(s["z"] - s["u"]) * d.conj()).sum(-3)
        x = torch.fft.irfft2(rhs / (k.abs().pow(2) + beta * d.abs().pow(2).sum(0)), s=y.shape[-2:])
        v = analysis(x, d) + s["u"]
        z = huber_prox(v, w[:, None, None] / beta, self.eps)
        return {"x": x, "z": z, "u": v - z}

    def admm_step(self, state: dict[str, Tensor], theta: Theta, y: Tensor) -> dict[str, Tensor]:
        """One scaled-form ADMM iteration for ``min g(x) + sum_j w_j huber(z_j)`` s.t. ``z_j = d_j * x``.

        The updates::

            x = (K^T K + beta D^T D)^{-1} (K^T y + beta D^T (z - u))
            z = prox_{(w / beta) huber}(D x + u),   u = u + D x - z
        """
        return self._admm(state, y, *self.operators(theta, y.shape[-2:]))

    def admm_start(self, x: Tensor, theta: Theta) -> dict[str, Tensor]:
        """The ADMM state ``(x, D x, 0)`` of an image ``x``."""
        z = analysis(x, self.operators(theta, x.shape[-2:])[1])
        return {"x": x, "z": z, "u": torch.zeros_like(z)}

    def run_admm(self, theta: Theta, y: Tensor, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """ADMM from ``state``; returns the state and the iterations run."""
        ops = self.operators(theta, y.shape[-2:])
        return iterate(lambda s: self._admm(s, y, *ops), state, self.tol, self.inner_steps)

    def admm_solution(self, solver: LinearSolver | str = "gmres", on_failure: OnFailure = "warn"
                      ) -> Callable[[Theta, Tensor], dict[str, Tensor]]:
        """``(theta, y) -> {x, z, u}``, differentiable by :func:`bilevel.implicit_fixed_point`; the forward
        iterations of the last call are kept in ``.forward_iterations``, the adjoint solve in ``.last_solve``."""

        @bilevel.implicit_fixed_point(self.admm_step, solver, on_failure=on_failure)
        def solve(theta: Theta, y: Tensor) -> dict[str, Tensor]:
            state, solve.forward_iterations = self.run_admm(theta, y, self.admm_start(y.clone(), theta))
            return state

        return solve


def _norm(s: Any) -> Tensor:
    leaves = s.values() if isinstance(s, dict) else (s,)
    return torch.sqrt(sum(t.pow(2).sum() for t in leaves))


def iterate(step: Callable[[Any], Any], state: Any, tol: float, max_iter: int) -> tuple[Any, int]:
    """``state = step(state)`` until ``||change|| <= tol ||state||`` (``tol > 0``) or ``max_iter`` steps."""
    for k in range(1, max_iter + 1):
        new = step(state)
        if tol > 0:
            change = _norm({key: new[key] - state[key] for key in new} if isinstance(new, dict) else new - state)
            if float(change) <= tol * float(_norm(new)):
                return new, k
        state = new
    return state, max_iter
