"""Limited-memory BFGS with a backtracking line search."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._base import check_count, dot, machine_eps, norm, vec
from ._base import FlatProblem, Iterate, LineSearch, Minimizer


@dataclass(frozen=True, kw_only=True)
class LBFGS(Minimizer):
    """L-BFGS (Liu and Nocedal, Math. Program. 1989; Nocedal and Wright, Algorithm 7.4).

    The direction is ``d = -H_k g``, where ``H_k`` is the BFGS inverse-Hessian
    estimate built from the last ``history_size`` pairs ``s = x_{k+1} - x_k``,
    ``y = g_{k+1} - g_k`` by the two-loop recursion, scaled by
    ``gamma = s^T y / y^T y`` of the newest pair. A pair enters the memory only with
    positive curvature, ``s^T y > sqrt(eps) ||s|| ||y||``, so ``H_k`` stays positive
    definite on non-convex objectives too. The step is backtracked from 1
    (:class:`~bilevel.solvers.minimize.LineSearch`). Without a pair in memory (the
    start, or after a failed search, which clears it) the direction is ``-g`` and
    the first trial is twice the last accepted step (``min(1, 1 / ||g||)`` at the
    start); a problem whose steepest-descent search also fails stops with
    ``NO_DECREASE``. Superlinear in practice; one gradient per trial, ``4 m n``
    flops for the recursion. Every problem keeps its own memory and steps.

    Args:
        history_size: pairs kept (``m``).
        line_search: the trials and the acceptance test.
        rtol, atol, maxiter: see :class:`~bilevel.solvers.minimize.Minimizer`.
    """

    history_size: int = 10
    line_search: LineSearch = field(default_factory=LineSearch)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("history_size", self.history_size, allow_none=False)
        if not isinstance(self.line_search, LineSearch):
            raise TypeError(f"line_search must be a LineSearch, got {type(self.line_search).__name__}")

    def iterate(self, problem: FlatProblem, state: Iterate) -> None:
        m = self.history_size
        S: list = [None] * m
        Y: list = [None] * m
        rho: list = [None] * m
        valid = [torch.zeros_like(state.active) for _ in range(m)]
        gamma = torch.ones_like(state.f)
        step = 0.5 * torch.clamp(1 / norm(state.g), max=1.0)
        curvature = machine_eps(state.x.dtype) ** 0.5
        for k in range(self.maxiter):
            if state.done(k):
                break
            order = [(k - 1 - i) % m for i in range(m)]  # newest first
            q = -state.g
            alphas = {}
            for i in order:
                if S[i] is None:
                    continue
                alphas[i] = torch.where(valid[i], rho[i] * dot(S[i], q), 0.0)
                q = q - vec(alphas[i]) * Y[i]
            r = vec(gamma) * q
            for i in reversed(order):
                if S[i] is None:
                    continue
                beta = torch.where(valid[i], rho[i] * dot(Y[i], r), 0.0)
                r = r + vec(alphas[i] - beta) * S[i]
            remembered = torch.stack(valid).any(0)
            t0 = torch.where(remembered, torch.ones_like(step), 2 * step)

            accepted, x, f, g, t = self.line_search(problem, state, r, t0)
            s, y = x - state.x, g - state.g
            previous_active = state.active
            state.advance(accepted, x, f, g)
            step = torch.where(accepted & ~remembered, t, step)

            sy = dot(s, y)
            keep = accepted & (sy > curvature * norm(s) * norm(y))
            slot = k % m
            S[slot], Y[slot] = s, y
            rho[slot] = torch.where(keep, 1 / torch.where(keep, sy, torch.ones_like(sy)), 0.0)
            gamma = torch.where(keep, sy / torch.where(keep, dot(y, y), torch.ones_like(sy)), gamma)
            failed = previous_active & ~accepted
            state.stall(failed & ~remembered)
            valid = [v & ~failed for v in valid]
            valid[slot] = keep
