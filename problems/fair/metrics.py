"""Per-task accuracy and fairness metrics, and their averages with confidence intervals.

For predictions ``yhat = 1[s(x) > 0]`` on a query set, ``p = sigmoid(s)``:

- accuracy: ``mean(yhat == y)``;
- hard parity gap: ``|P(yhat = 1 | z = 1) - P(yhat = 1 | z = 0)|``, the demographic parity
  gap; NaN when a group is absent from the query (counted by :func:`mean_ci`, never dropped
  silently);
- soft gap: ``|mean_{z=1} p - mean_{z=0} p|``, the "discrimination" PDFM (Zhao et al., ICDM
  2020) reports; it equals ``DBC / (zbar (1 - zbar))``;
- DBC: ``|mean_i (z_i - mean z) p_i|``, PDFM's decision boundary covariance of the probability;
- null gap: the expected hard gap after ``z`` is permuted within the query set, with the same
  predictions: what a classifier whose predictions are independent of ``z`` shows on a query of
  this size and group balance (the noise floor of the hard gap); excess gap: hard gap minus it;
- consistency (Zemel et al., ICML 2013): ``1 - mean_i mean_{j in kNN(i)} |yhat_i - yhat_j|``
  over the ``k`` nearest other points in feature space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["METRICS", "accuracy", "dbc", "parity_gap", "soft_gap", "null_gap", "consistency", "task_metrics",
           "mean_ci", "t_quantile"]

METRICS = ("accuracy", "parity_gap", "soft_gap", "dbc", "null_gap", "excess_gap", "consistency")


def accuracy(s: Tensor, y: Tensor) -> Tensor:
    return ((s > 0).to(y.dtype) == y).to(s.dtype).mean(-1)


def dbc(s: Tensor, z: Tensor) -> Tensor:
    p = torch.sigmoid(s)
    return ((z - z.mean(-1, keepdim=True)) * p).mean(-1).abs()


def _group_difference(v: Tensor, z: Tensor) -> Tensor:
    """``|mean_{z=1} v - mean_{z=0} v|`` over the last dimension; NaN when a group is absent."""
    return ((v * z).sum(-1) / z.sum(-1) - (v * (1 - z)).sum(-1) / (1 - z).sum(-1)).abs()


def parity_gap(s: Tensor, z: Tensor) -> Tensor:
    return _group_difference((s > 0).to(s.dtype), z)


def soft_gap(s: Tensor, z: Tensor) -> Tensor:
    return _group_difference(torch.sigmoid(s), z)


def null_gap(s: Tensor, z: Tensor, generator: torch.Generator, permutations: int = 50) -> Tensor:
    """Mean hard parity gap over ``permutations`` random permutations of ``z`` along the last dimension."""
    noise = torch.rand((permutations, *z.shape), generator=generator, dtype=torch.float64).to(z.device)
    permuted = torch.gather(z.expand(permutations, *z.shape), -1, noise.argsort(-1))
    return parity_gap(s.expand(permutations, *s.shape), permuted).mean(0)


def consistency(s: Tensor, x: Tensor, k: int = 3) -> Tensor:
    yhat = (s > 0).to(s.dtype)
    dist = torch.cdist(x, x)
    dist = dist + torch.diag_embed(torch.full_like(dist[..., 0], math.inf))  # exclude self
    idx = dist.topk(k, dim=-1, largest=False).indices
    neighbours = torch.gather(yhat.unsqueeze(-2).expand(*idx.shape[:-1], yhat.shape[-1]), -1, idx)
    return 1 - (yhat.unsqueeze(-1) - neighbours).abs().mean((-1, -2))


def task_metrics(s: Tensor, x: Tensor, y: Tensor, z: Tensor, generator: torch.Generator, k: int = 3,
                 consistency_rows: int = 1000) -> dict[str, Tensor]:
    """All metrics for scores ``s`` (…, n) on query ``x`` (…, n, d), ``y``, ``z`` (…, n).

    Consistency is computed on the first ``consistency_rows`` query rows (the query is in
    random order), to bound the ``n^2`` neighbour search on large tasks.
    """
    gap, null = parity_gap(s, z), null_gap(s, z, generator)
    m = consistency_rows
    return {"accuracy": accuracy(s, y), "parity_gap": gap, "soft_gap": soft_gap(s, z), "dbc": dbc(s, z),
            "null_gap": null, "excess_gap": gap - null, "consistency": consistency(s[..., :m], x[..., :m, :], k)}


def t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (for a two-sided 95% interval)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def mean_ci(values: Tensor, student: bool = False) -> dict[str, float]:
    """Mean and the half-width of its 95% interval, ``q sd / sqrt(n)`` over the finite values.

    ``q = 1.96`` (normal) or, with ``student``, Student's t quantile with ``n - 1`` degrees of
    freedom (for a few independent units, e.g. (seed, split) means). NaN values are left
    out of the mean and counted in ``"nan"``, so that dropped episodes are always reported.
    """
    values = values.double().flatten()
    finite = values[~torch.isnan(values)]
    n, dropped = finite.numel(), int(torch.isnan(values).sum())
    if n == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0, "nan": dropped}
    q = (t_quantile(n - 1) if student else 1.96) if n > 1 else math.nan
    half = q * float(finite.std()) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": float(finite.mean()), "ci95": half, "n": n, "nan": dropped}
