"""Linear classifiers (logistic / softmax regression) and their exact training by L-BFGS.

The weights are one tensor ``W`` of shape ``(d + 1, c)``: rows ``0..d-1`` multiply
the features, the last row is the bias. Two classes use one logit (``c = 1``,
logistic loss); more classes use ``c`` logits (softmax cross-entropy).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["init_weights", "logits", "example_losses", "mean_loss", "accuracy", "minimize_lbfgs",
           "minimize_newton", "minimize"]


def init_weights(n_features: int, n_classes: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> Tensor:
    """Zero weights of shape ``(n_features + 1, 1 if n_classes == 2 else n_classes)``."""
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    return torch.zeros(n_features + 1, 1 if n_classes == 2 else n_classes, dtype=dtype, device=device)


def logits(weights: Tensor, x: Tensor) -> Tensor:
    """``x W[:-1] + W[-1]``, shape ``(n, c)``."""
    return x @ weights[:-1] + weights[-1]


def example_losses(weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Per-example negative log-likelihood, shape ``(n,)``."""
    z = logits(weights, x)
    if z.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(z[:, 0], y.to(z.dtype), reduction="none")
    return F.cross_entropy(z, y, reduction="none")


def mean_loss(weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean negative log-likelihood (the log loss of scikit-learn's ``log_loss``)."""
    return example_losses(weights, x, y).mean()


def accuracy(weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
    z = logits(weights, x)
    pred = (z[:, 0] > 0).long() if z.shape[-1] == 1 else z.argmax(-1)
    return (pred == y).to(z.dtype).mean()


def minimize_lbfgs(objective: Callable[[Tensor], Tensor], init: Tensor, *, tol: float, max_iter: int = 1000,
                   history_size: int = 20, check_every: int = 5) -> tuple[Tensor, float, int]:
    """Minimize a smooth ``objective`` from ``init`` by L-BFGS (strong Wolfe line search)
    until ``||grad|| <= tol`` or ``max_iter`` iterations.

    Returns ``(minimizer, final gradient norm, iterations)``. Runs with gradients
    enabled even inside ``torch.no_grad()``; the result is detached.
    """
    weights = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=check_every, history_size=history_size,
                                  tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = objective(weights)
        value.backward()
        return value

    with torch.enable_grad():
        def grad_norm() -> float:
            (g,) = torch.autograd.grad(objective(weights), weights)
            return float(g.norm())

        norm, done = grad_norm(), 0
        while norm > tol and done < max_iter:
            optimizer.step(closure)
            done = optimizer.state[weights]["n_iter"]
            previous, norm = norm, grad_norm()
            if norm == previous:  # the line search can no longer move (round-off floor)
                break
    return weights.detach(), norm, done


def minimize_newton(objective: Callable[[Tensor], Tensor], init: Tensor, *, tol: float,
                    max_iter: int = 100) -> tuple[Tensor, float, int]:
    """Minimize a smooth strongly convex ``objective`` by Newton's method with a backtracking
    (Armijo) line search, until ``||grad|| <= tol`` or ``max_iter`` iterations.

    The Hessian is materialized (``torch.func.hessian``), so this is for small
    weight tensors; it converges quadratically, to round-off. Where the Hessian is singular
    (directions the objective does not depend on, such as a constant added to every class's
    bias), the Newton step is the least-squares one. Returns
    ``(minimizer, final gradient norm, iterations)``.
    """
    shape = init.shape

    def flat_objective(v: Tensor) -> Tensor:
        return objective(v.reshape(shape))

    grad_fn = torch.func.grad_and_value(flat_objective)
    hess_fn = torch.func.hessian(flat_objective)
    x = init.detach().reshape(-1).clone()
    g, value = grad_fn(x)
    iterations = 0
    while float(g.norm()) > tol and iterations < max_iter:
        hess = hess_fn(x)
        step, info = torch.linalg.solve_ex(hess, g)
        if int(info) != 0:  # singular along directions the objective ignores (softmax's shared bias)
            step = torch.linalg.lstsq(hess, g.unsqueeze(-1)).solution.squeeze(-1)
        direction = -step
        slope = float(g @ direction)
        if not slope < 0:  # not a descent direction: fall back to the gradient
            direction, slope = -g, -float(g @ g)
        t = 1.0
        while True:
            g_new, value_new = grad_fn(x + t * direction)
            sufficient = float(value_new) <= float(value) + 1e-4 * t * slope
            # near the minimum the decrease drowns in round-off of the value; the gradient still shows it
            if sufficient or float(g_new.norm()) <= 0.5 * float(g.norm()) or t < 1e-10:
                break
            t *= 0.5
        if not sufficient and float(g_new.norm()) >= float(g.norm()):  # no progress: round-off floor
            break
        x, g, value = x + t * direction, g_new, value_new
        iterations += 1
    return x.reshape(shape).detach(), float(g.norm()), iterations


def minimize(objective: Callable[[Tensor], Tensor], init: Tensor, *, tol: float, max_iter: int,
             method: str = "lbfgs") -> tuple[Tensor, float, int]:
    """Minimize by ``"lbfgs"`` (:func:`minimize_lbfgs`, the default: cheap iterations, reaches
    ``||grad||`` of about 1e-9 in float64) or ``"newton"`` (:func:`minimize_newton`: converges to
    round-off, but each Hessian costs one Hessian-vector product per weight)."""
    if method == "newton":
        return minimize_newton(objective, init, tol=tol, max_iter=max_iter)
    if method == "lbfgs":
        return minimize_lbfgs(objective, init, tol=tol, max_iter=max_iter)
    raise ValueError(f"method must be 'lbfgs' or 'newton', got {method!r}")
