"""Nesterov's accelerated gradient method for the strongly convex inner problems."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from bilevel.pytree import PyTree, tree_map

__all__ = ["accelerated_descent"]


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
