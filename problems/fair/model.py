"""The task model: logistic regression on a parameter dict ``{"w": (d,), "b": ()}``.

Its score ``s(x) = w^T x + b`` is the (unnormalized) signed distance to the
decision boundary ``s = 0``, the ``d_w(x)`` of Zafar et al. (AISTATS 2017).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CONSTRAINTS", "CONSTRAINT_SETS", "init_params", "score", "bce", "covariance", "group_gap",
           "fairness_gap", "smooth_abs", "constraint_inputs"]

Params = dict[str, Tensor]

CONSTRAINT_SETS = ("support", "task")
CONSTRAINTS = ("dbc", "dp")


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


def group_gap(values: Tensor, z: Tensor) -> Tensor:
    """``mean_{z=1} v - mean_{z=0} v = covariance(v, z) / (zbar (1 - zbar))`` (signed).

    Zero, not NaN, when one group is absent (the covariance is then exactly zero).
    """
    zbar = z.mean()
    return covariance(values, z) / torch.clamp(zbar * (1 - zbar), min=torch.finfo(values.dtype).tiny)


def fairness_gap(params: Params, x: Tensor, z: Tensor, constraint: str, sharpness: float = 1.0) -> Tensor:
    """The signed group gap a fairness constraint bounds, in parity-gap units.

    ``"dbc"``: Zafar et al.'s decision boundary covariance of the score, as a gap of
    the linearized probability ``1/2 + s/4`` (the first-order expansion of ``sigmoid(s)``
    at the boundary): ``group_gap(s / 4, z)``; linear in ``w``.
    ``"dp"``: PDFM's probability form, the smoothed demographic parity gap
    ``group_gap(sigmoid(k s), z)`` with sharpness ``k`` (``k = 1`` is PDFM's DBC divided by
    ``zbar (1 - zbar)``; ``k -> inf`` tends to the hard parity gap); not convex in ``w``.
    """
    s = score(params, x)
    if constraint == "dbc":
        return group_gap(s / 4, z)
    if constraint == "dp":
        return group_gap(torch.sigmoid(sharpness * s), z)
    raise ValueError(f"unknown constraint {constraint!r}; choose one of {CONSTRAINTS}")


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
