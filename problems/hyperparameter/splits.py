"""Train / validation / test splits, standardized with training statistics."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .mnist import MNIST

__all__ = ["Splits", "split", "mnist_splits"]


class Splits(NamedTuple):
    """Features ``x_* (n, d)`` (floating) and int64 labels ``y_* (n,)`` of the three parts."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val, self.y_test]).max()) + 1


def _counts(n: int, n_train: int | None, n_val: int | None, n_test: int | None) -> tuple[int, int, int]:
    n_train = n // 2 if n_train is None else n_train
    n_val = (n - n_train) // 2 if n_val is None else n_val
    n_test = n - n_train - n_val if n_test is None else n_test
    if min(n_train, n_val, n_test) < 1 or n_train + n_val + n_test > n:
        raise ValueError(f"cannot split {n} examples into train {n_train}, validation {n_val} and test "
                         f"{n_test}: each part needs at least one example and together at most {n}")
    return n_train, n_val, n_test


def _standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    mean = train.mean(0)
    std = train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (train, *others))


def split(x: Tensor, y: Tensor, *, n_train: int | None = None, n_val: int | None = None,
          n_test: int | None = None, seed: int = 0, standardize: bool = True,
          dtype: torch.dtype = torch.float64) -> Splits:
    """Random disjoint split of a table (default: half train, a quarter each for validation and test).

    With ``standardize`` every column is centred and scaled by the training
    mean and standard deviation (constant columns are only centred).
    """
    n_train, n_val, n_test = _counts(x.shape[0], n_train, n_val, n_test)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:n_train + n_val + n_test]
    x = x.to(dtype)
    parts = (x[tr], x[va], x[te])
    if standardize:
        parts = _standardize(*parts)
    return Splits(parts[0], y[tr], parts[1], y[va], parts[2], y[te])


def mnist_splits(mnist: MNIST, *, n_train: int = 20_000, n_val: int = 5_000, n_test: int = 10_000,
                 seed: int = 0, center: bool = True, dtype: torch.dtype = torch.float64) -> Splits:
    """Disjoint random training and validation sets from MNIST's 60,000 training images, and the
    first ``n_test`` of its 10,000 test images; pixels scaled to [0, 1], flattened to 784 features.

    With ``center`` the mean training image is subtracted from every part. For a linear model
    with an unpenalized bias this changes only the bias of the solution, not the fit or the
    penalty, but it makes the training problem far better conditioned (about half the
    L-BFGS and a third fewer CG iterations on MNIST).
    """
    n_train, n_val, _ = _counts(mnist.train_images.shape[0], n_train, n_val, 1)
    if not 1 <= n_test <= mnist.test_images.shape[0]:
        raise ValueError(f"n_test must be between 1 and {mnist.test_images.shape[0]}, got {n_test}")
    perm = torch.randperm(mnist.train_images.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:n_train], perm[n_train:n_train + n_val]
    pixels = mnist.train_images.reshape(-1, 784).to(dtype) / 255
    test = mnist.test_images[:n_test].reshape(-1, 784).to(dtype) / 255
    train, val = pixels[tr], pixels[va]
    if center:
        mean = train.mean(0)
        train, val, test = train - mean, val - mean, test - mean
    return Splits(train, mnist.train_labels[tr], val, mnist.train_labels[va], test, mnist.test_labels[:n_test])
