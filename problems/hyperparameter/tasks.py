"""The two command-line tasks, built from their settings (a :class:`~.config.HyperoptConfig` as a dict):
data, problem, start point, metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from bilevel import BilevelProblem
from bilevel.runner.devices import resolve_device

from .cleaning import HyperCleaning, corrupt_labels, separation
from .l2 import PerFeatureL2
from .linear import accuracy, mean_loss
from .mnist import load_mnist
from .splits import Splits, mnist_splits, split
from .tabular import load_tabular

__all__ = ["Task", "l2_task", "cleaning_task"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Task:
    """A problem with its data, the initial outer variable, and the metrics of a state."""

    name: str
    problem: BilevelProblem
    data: Splits
    outer0: Tensor
    metrics: Callable[[Tensor, Tensor], dict[str, float]]
    weights_of: Callable[[Tensor], Tensor]
    corrupted: Tensor | None = None


def _splits(settings: dict[str, Any]) -> Splits:
    """The data splits, on ``settings["device"]`` (default: cuda when available, else cpu)."""
    device = resolve_device(settings.get("device"))  # checked before any data is read
    return Splits(*(part.to(device) for part in _cpu_splits(settings)))


def _cpu_splits(settings: dict[str, Any]) -> Splits:
    dtype = DTYPES[settings["dtype"]]
    sizes = {"n_train": settings["n_train"], "n_val": settings["n_val"], "n_test": settings["n_test"]}
    if settings.get("dataset", "mnist") == "mnist":
        mnist = load_mnist(settings["data_dir"], download=settings["download"])
        return mnist_splits(mnist, **{k: v for k, v in sizes.items() if v is not None}, seed=settings["seed"],
                            dtype=dtype)
    table = load_tabular(settings["dataset"], settings["data_dir"])
    return split(table.x, table.y, **sizes, seed=settings["seed"], dtype=dtype)


def _hold_out(data: Splits, fraction: float, seed: int) -> tuple[Splits, tuple[Tensor, Tensor] | None]:
    """Set aside a random ``fraction`` of the validation set for choosing the step to keep.

    With many hyperparameters the outer loop can fit the validation set itself; a
    held-out part that the hypergradient never sees tells when that starts (early
    stopping), using no data beyond the training and validation sets.
    """
    if not fraction:
        return data, None
    if not 0 < fraction < 1:
        raise ValueError(f"select_fraction must be in [0, 1), got {fraction}")
    n = data.x_val.shape[0]
    n_select = round(fraction * n)
    if not 0 < n_select < n:
        raise ValueError(f"select_fraction={fraction} leaves {n_select} of the {n} validation examples for "
                         "selection; choose a fraction that keeps both parts non-empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(data.x_val.device)
    keep, held = order[n_select:], order[:n_select]
    return data._replace(x_val=data.x_val[keep], y_val=data.y_val[keep]), (data.x_val[held], data.y_val[held])


def _test_metrics(data: Splits, inner: Tensor, select: tuple[Tensor, Tensor] | None) -> dict[str, float]:
    out = {"test_loss": float(mean_loss(inner, data.x_test, data.y_test)),
           "test_acc": float(accuracy(inner, data.x_test, data.y_test))}
    if select is not None:
        out["select_loss"] = float(mean_loss(inner, *select))
    return out


def l2_task(settings: dict[str, Any]) -> Task:
    """Per-feature L2 on ``settings["dataset"]``, starting from ``exp(lambda_j) = init_penalty``."""
    data, select = _hold_out(_splits(settings), settings.get("select_fraction", 0.0), settings["seed"])
    problem = PerFeatureL2(max_inner_iter=settings["inner_steps"])
    outer0 = torch.full((data.x_train.shape[1],), math.log(settings["init_penalty"]), dtype=data.x_train.dtype,
                        device=data.x_train.device)
    return Task("l2", problem, data, outer0, lambda outer, inner: _test_metrics(data, inner, select), torch.exp)


def cleaning_task(settings: dict[str, Any]) -> Task:
    """Hyper-cleaning of MNIST with a fraction ``settings["corrupt"]`` of random training labels."""
    clean, select = _hold_out(_splits(settings), settings.get("select_fraction", 0.0), settings["seed"])
    noisy, corrupted = corrupt_labels(clean.y_train, settings["corrupt"], clean.n_classes, seed=settings["seed"])
    data = clean._replace(y_train=noisy)
    problem = HyperCleaning(reg=settings["reg"], max_inner_iter=settings["inner_steps"])
    outer0 = torch.zeros(data.x_train.shape[0], dtype=data.x_train.dtype, device=data.x_train.device)

    def metrics(outer: Tensor, inner: Tensor) -> dict[str, float]:
        return {**_test_metrics(data, inner, select), **separation(torch.sigmoid(outer), corrupted)}

    return Task("cleaning", problem, data, outer0, metrics, torch.sigmoid, corrupted)
