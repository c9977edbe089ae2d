"""Gradient descent with a per-problem backtracking (Armijo) step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._base import check_positive, machine_eps
from ._base import FlatProblem, Iterate, LineSearch, Minimizer


@dataclass(frozen=True, kw_only=True)
class Armijo(Minimizer):
    """Steepest descent with a backtracking step chosen per problem.

    At each iteration the first trial step is ``grow`` times the last accepted one
    (``lr`` at the start) and it shrinks until the sufficient-decrease test of
    :class:`~bilevel.solvers.minimize.LineSearch` passes (Armijo, Pacific J. Math.
    1966; Nocedal and Wright, Algorithm 3.1). The objective never increases, so no
    curvature makes it diverge, and the step grows back where the landscape is
    flat. A problem where no trial passes stays put and starts the next iteration
    below its smallest trial; once that step is below ``eps * lr`` it stops with
    ``NO_DECREASE``. One gradient per trial; typically one trial per iteration.

    Args:
        lr: the first step.
        grow: the first trial's factor over the last accepted step (``>= 1``).
        line_search: the trials and the acceptance test; default four trials of
            halving steps.
        rtol, atol, maxiter: see :class:`~bilevel.solvers.minimize.Minimizer`.
    """

    lr: float = 0.1
    grow: float = 2.0
    line_search: LineSearch = field(default_factory=lambda: LineSearch(trials=4))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("lr", self.lr)
        if not self.grow >= 1:
            raise ValueError(f"grow must be >= 1, got {self.grow}")
        if not isinstance(self.line_search, LineSearch):
            raise TypeError(f"line_search must be a LineSearch, got {type(self.line_search).__name__}")

    def iterate(self, problem: FlatProblem, state: Iterate) -> None:
        step = torch.full_like(state.f, self.lr)
        smallest = machine_eps(state.x.dtype) * self.lr
        last_trial = self.line_search.shrink ** (self.line_search.trials - 1)
        for k in range(self.maxiter):
            if state.done(k):
                break
            t0 = self.grow * step
            accepted, x, f, g, t = self.line_search(problem, state, -state.g, t0)
            state.advance(accepted, x, f, g)
            step = torch.where(accepted, t, t0 * last_trial * self.line_search.shrink)
            state.stall(step < smallest)
