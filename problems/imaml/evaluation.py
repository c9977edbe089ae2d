"""Evaluation on the 20 official 20-way one-shot runs of Lake et al. (Science 2015).

Each run gives one drawing of each of 20 characters (the support set) and 20
new drawings to classify. The meta-parameters are adapted to the support set
with the problem's inner solver, then the 20 drawings are classified.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from bilevel.problems.imaml.models import Params
from bilevel.problems.imaml.omniglot import load_official_runs
from bilevel.problems.imaml.problem import IMAMLProblem, adapt
from bilevel.problems.imaml.tasks import to_task

__all__ = ["official_runs_accuracy"]


def official_runs_accuracy(problem: IMAMLProblem, theta: Params, data_dir: str | os.PathLike | None = None,
                           device: torch.device | str = "cpu", *, chunk_size: int | None = None) -> dict[str, Any]:
    """Mean accuracy over the 20 runs (with a 95% interval over runs) and each run's accuracy.

    ``theta`` must be a 20-way classifier. Batch normalization uses the statistics
    of the 20 query drawings, as during meta-training. ``chunk_size``: as in
    :func:`~bilevel.problems.imaml.problem.adapt`.
    """
    runs = load_official_runs(data_dir)
    labels = np.arange(20)
    tasks = to_task(np.stack([r.support for r in runs]), np.stack([labels] * len(runs)),
                    np.stack([r.query for r in runs]), np.stack([r.labels for r in runs]), device)
    out = adapt(problem, theta, tasks, chunk_size=chunk_size)
    per_run = (out.output_after.argmax(-1) == tasks.query_y).double().mean(-1).cpu()
    return {"accuracy": float(per_run.mean()),
            "accuracy_ci95": float(1.96 * per_run.std() / math.sqrt(len(per_run))),
            "per_run": [float(a) for a in per_run]}
