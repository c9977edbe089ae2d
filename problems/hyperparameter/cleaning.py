"""Data hyper-cleaning: learn one weight per training example so that a model
trained on noisy labels does well on a small clean validation set.

Franceschi, Donini, Frasconi & Pontil, "Forward and reverse gradient-based
hyperparameter optimization", ICML 2017; the setting of the benchopt bilevel
benchmark. With ``sigma`` the logistic sigmoid, inner problem::

    W*(theta) = argmin_W  1/n sum_i sigma(theta_i) loss(x_i, y_i; W) + reg/2 ||W[:-1]||^2

(softmax regression, bias not penalized), solved by L-BFGS; outer problem
``F(theta) = loss_val(W*(theta))`` on clean validation labels. Corrupted
examples should end with small weights ``sigma(theta_i)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .classifier import ValidatedClassifier
from .linear import example_losses
from .splits import Splits

__all__ = ["HyperCleaning", "corrupt_labels", "separation"]


class HyperCleaning(ValidatedClassifier):
    """``outer``: logits ``theta`` of the example weights, shape ``(n_train,)``; ``inner``: weights
    ``(d + 1, c)``; ``data``: :class:`~bilevel.problems.hyperparameter.splits.Splits` whose
    training labels are the corrupted ones.

    Args:
        reg: L2 strength of the inner problem (keeps it strongly convex).
        inner_tol, max_inner_iter, method: as
            :class:`~bilevel.problems.hyperparameter.classifier.ValidatedClassifier`.
    """

    def __init__(self, *, reg: float = 1e-3, inner_tol: float = 1e-6, max_inner_iter: int = 2000,
                 method: str = "lbfgs"):
        if not reg > 0:
            raise ValueError(f"reg must be > 0 so that the inner problem is strongly convex, got {reg}")
        super().__init__(inner_tol=inner_tol, max_inner_iter=max_inner_iter, method=method)
        self.reg = reg

    def inner_objective(self, inner: Tensor, outer: Tensor, data: Splits) -> Tensor:
        weighted = (torch.sigmoid(outer) * example_losses(inner, data.x_train, data.y_train)).mean()
        return weighted + 0.5 * self.reg * inner[:-1].square().sum()


def corrupt_labels(labels: Tensor, fraction: float, n_classes: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Replace the labels of a random ``fraction`` of the examples by uniformly random classes.

    Returns ``(noisy labels, corrupted)`` where ``corrupted`` marks the labels that
    actually changed (a random class equals the true one with probability ``1/n_classes``).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the corruption fraction must lie in [0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]
    noisy = labels.clone()
    noisy[chosen.to(labels.device)] = torch.randint(n_classes, (chosen.numel(),), generator=generator).to(labels.device)
    return noisy, noisy != labels


def separation(weights: Tensor, corrupted: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """How well example weights single out the corrupted examples.

    ``auc``: probability that a random clean example outweighs a random
    corrupted one (ties count half; the Mann-Whitney statistic). ``precision``
    and ``recall`` of the rule "weight < threshold means corrupted".
    """
    clean_w, bad_w = weights[~corrupted].double(), weights[corrupted].double()
    if clean_w.numel() == 0 or bad_w.numel() == 0:
        raise ValueError("separation needs both clean and corrupted examples")
    ranks = _average_ranks(torch.cat([bad_w, clean_w]))
    clean_rank_sum = ranks[bad_w.numel():].sum()
    n_clean, n_bad = clean_w.numel(), bad_w.numel()
    auc = (clean_rank_sum - n_clean * (n_clean + 1) / 2) / (n_clean * n_bad)
    flagged = weights < threshold
    hits = (flagged & corrupted).sum().item()
    precision = hits / flagged.sum().item() if flagged.any() else 0.0
    return {"auc": float(auc), "precision": precision, "recall": hits / n_bad}


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks, tied values sharing their average rank."""
    sorted_values, order = torch.sort(values)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks
