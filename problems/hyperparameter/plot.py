"""The PNG summary of a run: losses against time, and the learned hyperparameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["plot_run"]


def plot_run(path: Path, records: list[dict[str, Any]], weights: Tensor, corrupted: Tensor | None,
             title: str) -> None:
    """Left: validation and test loss against wall time. Right: for hyper-cleaning the histogram of
    example weights, clean against corrupted; for per-feature L2 the histogram of ``log10 exp(lambda)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    times = [r["time"] for r in records]
    left.plot(times, [r["val_loss"] for r in records], label="validation loss")
    left.plot(times, [r["test_loss"] for r in records], label="test loss")
    left.set_xlabel("wall time (s)")
    left.set_ylabel("mean log loss")
    left.legend()
    left.set_title(title)
    weights = weights.detach().double().cpu()
    if corrupted is not None:
        corrupted = corrupted.cpu()
        bins = torch.linspace(0, 1, 41).tolist()
        right.hist(weights[~corrupted].tolist(), bins=bins, alpha=0.6, label="clean labels")
        right.hist(weights[corrupted].tolist(), bins=bins, alpha=0.6, label="corrupted labels")
        right.set_xlabel("example weight sigmoid(theta_i)")
        right.legend()
    else:
        right.hist(torch.log10(weights).tolist(), bins=40)
        right.set_xlabel("log10 of the per-feature penalty exp(lambda_j)")
    right.set_ylabel("count")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
