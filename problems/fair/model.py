"""The task model: logistic regression on a parameter dict ``{"w": (d,), "b": ()}``.

Its score ``s(x) = w^T x + b`` is the (unnormalized) signed distance to the
decision boundary ``s = 0``, the ``d_w(x)`` of Zafar et al. (AISTATS 2017).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["init_params", "score", "bce", "covariance", "smooth_abs"]

Params = dict[str, Tensor]


def init_params(dim: int, dtype: torch.dtype = torch.float64) -> Params:
    """All-zero weights and bias (the prediction 1/2 everywhere)."""
    return {"w": torch.zeros(dim, dtype=dtype), "b": torch.zeros((), dtype=dtype)}


def score(params: Params, x: Tensor) -> Tensor:
    """``s(x) = x w + b``, shape ``x.shape[:-1]``."""
    return x @ params["w"] + params["b"]


def bce(params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Mean binary cross-entropy of ``sigmoid(s(x))`` against ``y``, ``mean(softplus(s) - y s)``."""
    s = score(params, x)
    return (torch.nn.functional.softplus(s) - y * s).mean()


def covariance(values: Tensor, z: Tensor) -> Tensor:
    """Decision boundary covariance ``mean_i (z_i - mean z) v_i`` (unsigned: no absolute value)."""
    return ((z - z.mean()) * values).mean()


def smooth_abs(u: Tensor, delta: float) -> Tensor:
    """``sqrt(u^2 + delta^2) - delta``: smooth, convex, within ``delta`` of ``|u|``, zero at zero."""
    return torch.sqrt(u * u + delta * delta) - delta
