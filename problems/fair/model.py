"""The task model: logistic regression on a parameter dict ``{"w": (d,), "b": ()}``.

Its score ``s(x) = w^T x + b`` is the (unnormalized) signed distance to the
decision boundary ``s = 0``, the ``d_w(x)`` of Zafar et al. (AISTATS 2017).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CONSTRAINT_SETS", "init_params", "score", "bce", "covariance", "smooth_abs", "constraint_inputs"]

Params = dict[str, Tensor]

CONSTRAINT_SETS = ("support", "task")


def init_params(dim: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Params:
    """All-zero weights and bias (the prediction 1/2 everywhere)."""
    return {"w": torch.zeros(dim, dtype=dtype, device=device), "b": torch.zeros((), dtype=dtype, device=device)}


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


def constraint_inputs(data: dict[str, Tensor], constraint_set: str) -> tuple[Tensor, Tensor]:
    """The inputs ``(x, z)`` on which a task's fairness constraint is evaluated.

    ``"support"``: the labelled support rows only. ``"task"``: the support rows and the
    query rows' inputs (transductive: the constraint needs ``x`` and ``z``, never ``y``,
    so every unlabelled input of the task can enter it; the query labels stay unseen).
    """
    if constraint_set == "support":
        return data["xs"], data["zs"]
    if constraint_set == "task":
        return torch.cat([data["xs"], data["xq"]], -2), torch.cat([data["zs"], data["zq"]], -1)
    raise ValueError(f"unknown constraint_set {constraint_set!r}; choose one of {CONSTRAINT_SETS}")
