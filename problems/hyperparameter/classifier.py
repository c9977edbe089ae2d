"""What the hyperparameter problems share: a linear classifier trained to tolerance, scored on validation data."""

from __future__ import annotations

from torch import Tensor

from bilevel import BilevelProblem

from .linear import init_weights, mean_loss, minimize
from .splits import Splits

__all__ = ["ValidatedClassifier"]


class ValidatedClassifier(BilevelProblem):
    """Inner: logistic / softmax regression weights ``(d + 1, c)`` minimizing the subclass's
    :meth:`inner_objective` by L-BFGS (or Newton) to ``||grad|| <= inner_tol``, from zero.
    Outer: the mean validation loss ``loss_val(W*)``.

    Args:
        inner_tol: gradient-norm tolerance of the inner solve (and the residual tolerance).
        max_inner_iter: iteration cap of the inner solver.
        method: inner solver, ``"lbfgs"`` or ``"newton"`` (to round-off; for small models).
    """

    def __init__(self, *, inner_tol: float = 1e-6, max_inner_iter: int = 2000, method: str = "lbfgs"):
        self.inner_tol = inner_tol
        self.residual_tol = inner_tol
        self.max_inner_iter = max_inner_iter
        self.method = method

    def outer_objective(self, inner: Tensor, outer: Tensor, data: Splits) -> Tensor:
        return mean_loss(inner, data.x_val, data.y_val)

    def initial_inner(self, outer: Tensor, data: Splits) -> Tensor:
        return init_weights(data.x_train.shape[1], data.n_classes, data.x_train.dtype, data.x_train.device)

    def solve_inner(self, outer: Tensor, data: Splits, init: Tensor) -> Tensor:
        weights, _, _ = minimize(lambda w: self.inner_objective(w, outer, data), init,
                                 tol=self.inner_tol, max_iter=self.max_inner_iter, method=self.method)
        return weights
