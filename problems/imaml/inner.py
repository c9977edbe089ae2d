"""A safeguarded inner solver: gradient descent with a per-task Armijo backtracking step.

iMAML's meta-gradient ``(I + H/lam)^{-1} grad L_test(phi)`` assumes that ``phi``
minimizes the proximal inner objective

    F(phi) = L_train(phi) + lam/2 ||phi - theta||^2,

where ``H + lam I`` is positive semidefinite. Gradient descent with a fixed step
``eta`` diverges on tasks whose curvature exceeds ``2/eta`` (large-amplitude
sinusoids) and crawls along flat directions, so the formula is then applied
away from its assumptions. :func:`armijo_descent` picks each task's step by
backtracking (Armijo, Pacific J. Math. 1966; Nocedal and Wright, *Numerical
Optimization*, Algorithm 3.1): at step ``k``, with ``g = grad F(phi)``,

    t_j = grow * t_{k-1} * shrink^j,   j = 0 .. trials - 1
    phi <- phi - t_j g   for the largest t_j with  F(phi - t_j g) <= F(phi) - c t_j ||g||^2

and ``phi`` stays put when no trial step passes (the next step then starts
below the smallest one tried). So ``F`` never increases: no divergence, whatever
the curvature, and the step grows back (``grow``) where the landscape is flat.
A task whose ``||g||`` is at most ``tol`` is solved and stops moving.

Everything is tensor arithmetic with ``torch.where`` selections: no value is
read back to the host, so the solver runs unchanged under ``torch.func.vmap``
over tasks (each task gets its own step) and inside a CUDA graph. The trial
steps are evaluated one after the other (a nested ``vmap`` over them trips
some losses' batching rules). Cost per step: one gradient and ``trials`` forward evaluations of ``F``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bilevel.problems.imaml.models import Params

__all__ = ["armijo_descent"]


def armijo_descent(objective: Callable[[Params], Tensor], phi: Params, steps: int, step0: float, *,
                   tol: float | None = None, trials: int = 4, grow: float = 2.0, shrink: float = 0.5,
                   c: float = 1e-4) -> Params:
    """``steps`` of gradient descent on ``objective`` from ``phi`` with per-task Armijo steps.

    Args:
        objective: ``F(phi)``, a scalar.
        phi: the starting point (a dict of tensors).
        steps: iterations (no early exit: a solved task stops moving instead).
        step0: the first trial step is ``grow * step0``.
        tol: a point with ``||grad F|| <= tol`` is left unchanged (``None``: never).
        trials: trial steps per iteration, each ``shrink`` times the previous.
        grow: how much larger than the last accepted step the first trial is.
        shrink: backtracking factor, in (0, 1).
        c: Armijo's sufficient-decrease constant, in (0, 1).
    """
    if not (0 < shrink < 1 and 0 < c < 1 and grow >= 1 and trials >= 1 and step0 > 0):
        raise ValueError(f"need 0 < shrink < 1, 0 < c < 1, grow >= 1, trials >= 1 and step0 > 0; got "
                         f"shrink={shrink}, c={c}, grow={grow}, trials={trials}, step0={step0}")
    value_and_grad = torch.func.grad_and_value(objective)
    ref = next(iter(phi.values()))
    powers = shrink ** torch.arange(trials, dtype=ref.dtype, device=ref.device)
    step = torch.full((), step0, dtype=ref.dtype, device=ref.device)

    for _ in range(steps):
        g, f = value_and_grad(phi)
        g2 = sum((v * v).sum() for v in g.values())
        candidates = grow * step * powers

        values = torch.stack([objective({n: phi[n] - candidates[j] * g[n] for n in phi}) for j in range(trials)])
        decrease = values <= f - c * candidates * g2  # False where the trial value is NaN
        first = decrease & (torch.cumsum(decrease.long(), 0) == 1)  # the largest step that passes
        accepted = decrease.any()
        moving = accepted if tol is None else accepted & (g2 > tol * tol)
        chosen = (first * candidates).sum()
        step = torch.where(accepted, chosen, candidates[-1] * shrink)
        taken = torch.where(moving, chosen, torch.zeros_like(chosen))
        phi = {n: phi[n] - taken * g[n] for n in phi}
    return phi
