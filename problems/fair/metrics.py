"""Per-task accuracy and fairness metrics, and their averages with confidence intervals.

For predictions ``yhat = 1[s(x) > 0]`` on a query set:

- accuracy: ``mean(yhat == y)``;
- DBC: ``|mean_i (z_i - mean z) p_i|`` with ``p = sigmoid(s)``, PDFM's evaluation measure;
- demographic parity gap: ``|P(yhat = 1 | z = 0) - P(yhat = 1 | z = 1)|``
  (PDFM's "discrimination"); NaN when a group is absent;
- consistency (Zemel et al., ICML 2013): ``1 - mean_i mean_{j in kNN(i)} |yhat_i - yhat_j|``
  over the ``k`` nearest other query points in feature space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["METRICS", "accuracy", "dbc", "parity_gap", "consistency", "task_metrics", "mean_ci"]

METRICS = ("accuracy", "dbc", "parity_gap", "consistency")


def accuracy(s: Tensor, y: Tensor) -> Tensor:
    return ((s > 0).to(y.dtype) == y).to(s.dtype).mean(-1)


def dbc(s: Tensor, z: Tensor) -> Tensor:
    p = torch.sigmoid(s)
    return ((z - z.mean(-1, keepdim=True)) * p).mean(-1).abs()


def parity_gap(s: Tensor, z: Tensor) -> Tensor:
    yhat = (s > 0).to(s.dtype)
    rate1 = (yhat * z).sum(-1) / z.sum(-1)
    rate0 = (yhat * (1 - z)).sum(-1) / (1 - z).sum(-1)
    return (rate0 - rate1).abs()


def consistency(s: Tensor, x: Tensor, k: int = 3) -> Tensor:
    yhat = (s > 0).to(s.dtype)
    dist = torch.cdist(x, x)
    dist = dist + torch.diag_embed(torch.full_like(dist[..., 0], math.inf))  # exclude self
    idx = dist.topk(k, dim=-1, largest=False).indices
    neighbours = torch.gather(yhat.unsqueeze(-2).expand(*idx.shape[:-1], yhat.shape[-1]), -1, idx)
    return 1 - (yhat.unsqueeze(-1) - neighbours).abs().mean((-1, -2))


def task_metrics(s: Tensor, x: Tensor, y: Tensor, z: Tensor, k: int = 3) -> dict[str, Tensor]:
    """All metrics for scores ``s`` (…, n) on query ``x`` (…, n, d), ``y``, ``z`` (…, n)."""
    return {"accuracy": accuracy(s, y), "dbc": dbc(s, z), "parity_gap": parity_gap(s, z),
            "consistency": consistency(s, x, k)}


def mean_ci(values: Tensor) -> dict[str, float]:
    """Mean and the half-width of its normal 95% confidence interval ``1.96 sd / sqrt(n)`` (NaNs dropped)."""
    v = values[~torch.isnan(values)].double()
    n = v.numel()
    if n == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0}
    half = 1.96 * float(v.std()) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": float(v.mean()), "ci95": half, "n": n}
