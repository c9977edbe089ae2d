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

from .classifier import ValidatedClassifier
from .linear import mean_loss
from .splits import Splits

__all__ = ["PerFeatureL2"]


class PerFeatureL2(ValidatedClassifier):
    """``outer``: log-penalties ``lambda`` of shape ``(d,)``; ``inner``: weights ``(d + 1, c)``;
    ``data``: a :class:`~bilevel.problems.hyperparameter.splits.Splits` (train and validation parts used).
    Options as :class:`~bilevel.problems.hyperparameter.classifier.ValidatedClassifier`.
    """

    def inner_objective(self, inner: Tensor, outer: Tensor, data: Splits) -> Tensor:
        penalty = 0.5 * (torch.exp(outer).unsqueeze(-1) * inner[:-1].square()).sum()
        return mean_loss(inner, data.x_train, data.y_train) + penalty
