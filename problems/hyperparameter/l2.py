"""Per-feature L2 regularization of logistic / softmax regression, tuned on validation data.

Inner problem (one hyperparameter ``lambda_j`` per feature, on a log scale so
that it stays positive)::

    W*(lambda) = argmin_W  1/n sum_i loss(x_i, y_i; W) + 1/2 sum_j exp(lambda_j) ||W_j||^2

(the bias row is not penalized), solved by L-BFGS (or Newton's method) to ``||grad|| <=
inner_tol``. Outer problem: the mean validation loss ``F(lambda) =
loss_val(W*(lambda))``. The inner Hessian is positive definite, so the adjoint
system of the implicit hypergradient is solved by conjugate gradients
(Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel import BilevelProblem

from .linear import init_weights, mean_loss, minimize
from .splits import Splits

__all__ = ["PerFeatureL2"]


class PerFeatureL2(BilevelProblem):
    """``outer``: log-penalties ``lambda`` of shape ``(d,)``; ``inner``: weights ``(d + 1, c)``;
    ``data``: a :class:`~bilevel.problems.hyperparameter.splits.Splits` (train and validation parts used).

    Args:
        inner_tol: gradient-norm tolerance of the inner solve (and the residual tolerance).
        max_inner_iter: iteration cap of the inner solver.
        method: inner solver, ``"lbfgs"`` or ``"newton"`` (to round-off; for small models).
    """

    def __init__(self, *, inner_tol: float = 1e-6, max_inner_iter: int = 2000,
                 method: str = "lbfgs"):
        self.inner_tol = inner_tol
        self.residual_tol = inner_tol
        self.max_inner_iter = max_inner_iter
        self.method = method

    def inner_objective(self, inner: Tensor, outer: Tensor, data: Splits) -> Tensor:
        penalty = 0.5 * (torch.exp(outer).unsqueeze(-1) * inner[:-1].square()).sum()
        return mean_loss(inner, data.x_train, data.y_train) + penalty

    def outer_objective(self, inner: Tensor, outer: Tensor, data: Splits) -> Tensor:
        return mean_loss(inner, data.x_val, data.y_val)

    def initial_inner(self, outer: Tensor, data: Splits) -> Tensor:
        return init_weights(data.x_train.shape[1], data.n_classes, data.x_train.dtype)

    def solve_inner(self, outer: Tensor, data: Splits, init: Tensor) -> Tensor:
        weights, _, _ = minimize(lambda w: self.inner_objective(w, outer, data), init,
                                 tol=self.inner_tol, max_iter=self.max_inner_iter, method=self.method)
        return weights
