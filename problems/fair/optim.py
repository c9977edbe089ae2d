"""Solvers for the strongly convex inner problems: Nesterov's accelerated gradient method and damped Newton."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bilevel.pytree import PyTree, tree_map

__all__ = ["accelerated_descent", "damped_newton"]


def accelerated_descent(grad_and_smoothness: Callable[[PyTree], tuple[PyTree, Tensor]], x0: PyTree,
                        strong_convexity: float, steps: int,
                        converged: Callable[[PyTree], bool] | None = None) -> PyTree:
    """Minimize an ``m``-strongly convex, ``L``-smooth function (Nesterov, 1983)::

        y = x_k + beta (x_k - x_{k-1}),  x_{k+1} = y - grad f(y) / L,
        beta = (sqrt(L) - sqrt(m)) / (sqrt(L) + sqrt(m)),

    which contracts the error by ``1 - sqrt(m / L)`` per step.

    Args:
        grad_and_smoothness: ``y -> (grad f(y), L)``; ``L`` (a tensor) may be a local bound.
        x0: starting point (a pytree of tensors).
        strong_convexity: ``m > 0``.
        steps: iteration cap.
        converged: optional host-side test, consulted every 10 steps (leave it ``None``
            under ``torch.func.vmap``).
    """
    x_prev, x = x0, x0
    _, smooth = grad_and_smoothness(x0)
    for k in range(1, steps + 1):
        ratio = torch.sqrt(strong_convexity / smooth)
        beta = (1 - ratio) / (1 + ratio)
        y = tree_map(lambda a, b: a + beta * (a - b), x, x_prev)
        grad, smooth = grad_and_smoothness(y)
        x_prev, x = x, tree_map(lambda p, g: p - g / smooth, y, grad)
        if converged is not None and k % 10 == 0 and converged(x):
            break
    return x


def damped_newton(value: Callable[[Tensor], Tensor], grad_and_hessian: Callable[[Tensor], tuple[Tensor, Tensor]],
                  x0: Tensor, steps: int, converged: Callable[[Tensor], bool] | None = None,
                  backtracks: int = 10, armijo: float = 1e-4) -> Tensor:
    """Minimize a smooth strongly convex ``f`` over a vector by damped Newton steps
    (Boyd & Vandenberghe, Convex Optimization, Sec. 9.5)::

        d = H(x)^{-1} grad f(x),   x <- x - t d,

    with ``t`` the largest of ``1, 1/2, ..., 2^{1-backtracks}`` that satisfies Armijo's
    condition ``f(x - t d) <= f(x) - armijo t grad f(x)^T d`` (the smallest if none
    does). All candidate steps are evaluated at once and chosen by a mask, so the
    iteration has no data-dependent host branch and runs under ``torch.func.vmap``.
    Convergence is quadratic near the minimizer, whatever the conditioning of ``H``.

    Args:
        value: ``x -> f(x)``, a scalar.
        grad_and_hessian: ``x -> (grad f(x), H(x))``, ``H`` symmetric positive definite.
        x0: starting vector.
        steps: iteration cap.
        converged: optional host-side test after each step (leave it ``None`` under vmap).
    """
    lengths = 0.5 ** torch.arange(backtracks, dtype=x0.dtype, device=x0.device)
    x = x0
    for _ in range(steps):
        grad, hessian = grad_and_hessian(x)
        direction = torch.linalg.solve(hessian, grad)
        candidates = x - lengths[:, None] * direction
        values = torch.func.vmap(value)(candidates)
        accepted = values <= value(x) - armijo * lengths * (grad * direction).sum()
        first = torch.where(accepted.any(), accepted.to(torch.int64).argmax(), backtracks - 1)
        pick = torch.nn.functional.one_hot(first, backtracks).to(x.dtype)
        x = pick @ candidates
        if converged is not None and converged(x):
            break
    return x
