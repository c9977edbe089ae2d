"""Task pools (sinusoid, Omniglot) in which a known fraction of the training tasks is corrupted.

NestedMAML (Killamsetty, Li, Zhao, Chen, Iyer; AAAI 2022) meta-trains on a
*fixed* pool of ``N`` training tasks, some of them harmful, and learns one
weight per task from a few clean validation tasks. :class:`CorruptedSinusoid`
draws such a pool from MAML's sinusoid family (``y = A sin(x - phase)``,
:class:`~bilevel.problems.imaml.SinusoidTasks`) and corrupts the first
``round(corrupt * N)`` of its tasks (the order carries no information: the
weights of all tasks start equal and the learners never see the mask).

Two corruptions (``corruption=``):

- ``"flip"`` (the default): the query targets are negated, ``-A sin(x - phase)``,
  while the support set stays clean; the regression counterpart of flipped
  labels. The task's meta-gradient rewards an initialization whose adaptation
  moves *away* from what the support points show, which is directly harmful to
  the clean tasks: on the documented setting it raises MAML's test MSE about
  fourfold over the oracle's (docs/nested.md).
- ``"noise"``: ``A sin(x - phase) + sigma * eps`` with ``eps ~ N(0, 1)`` drawn
  independently for every support and query point (``sigma = 3``, about the
  typical amplitude): a sinusoid with bad sensors. Its harm is mild (measured
  in docs/nested.md), and a shifted amplitude or phase range is not harmful at
  all: the 1-40-40-1 network meta-learns it like the clean range.

Both corruptions draw the same random numbers, so pools of one seed hold the same
sinusoids whichever is chosen. Validation and test tasks are always clean.

:class:`CorruptedOmniglot` draws N-way K-shot Omniglot tasks
(:class:`~bilevel.problems.imaml.OmniglotTasks`) and *flips the labels* of a
corrupted task's queries: every query label ``y`` becomes ``(y + s) mod N`` for a
shift ``s`` in ``1..N-1`` drawn per task, so each query is labelled as another
class of the same task, consistently, and the query set contradicts the support
set (the classification form of ``"flip"`` above).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bilevel.problems.imaml import OmniglotTasks, SinusoidTasks, Task

__all__ = ["CORRUPTIONS", "CorruptedOmniglot", "CorruptedSinusoid", "TaskPool"]

CORRUPTIONS = ("noise", "flip")


class TaskPool(NamedTuple):
    """A fixed pool of tasks (batched :class:`~bilevel.problems.imaml.Task`) and which are corrupted."""

    tasks: Task
    corrupted: Tensor  # bool, (N,)

    def clean(self) -> "TaskPool":
        """The pool without its corrupted tasks (the oracle's training set)."""
        keep = ~self.corrupted
        return TaskPool(Task(*(t[keep] for t in self.tasks)), self.corrupted[keep])


def _corrupted_count(size: int, corrupt: float) -> int:
    if not 0.0 <= corrupt <= 1.0:
        raise ValueError(f"corrupt must be in [0, 1], got {corrupt}")
    return int(round(corrupt * size))


class CorruptedSinusoid:
    """Sinusoid pools with ``shots`` support and ``queries`` query points per task.

    Args:
        shots, queries: points per task (K = 10 support points in the paper's setting).
        sigma: standard deviation of the noise added to a corrupted task's targets (``"noise"``).
        corruption: ``"flip"`` (the query targets negated, the support set clean) or
            ``"noise"`` (``sigma`` noise on every support and query target).
    """

    def __init__(self, shots: int = 10, queries: int = 10, sigma: float = 3.0, corruption: str = "flip"):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
        self.sampler = SinusoidTasks(shots, queries)
        self.sigma, self.corruption = sigma, corruption

    def pool(self, rng: np.random.Generator, size: int, corrupt: float = 0.0,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TaskPool:
        """``size`` tasks, the first ``round(corrupt * size)`` of them corrupted."""
        n_bad = _corrupted_count(size, corrupt)
        tasks = self.sampler.sample(rng, size)
        noise = rng.standard_normal((n_bad, self.sampler.shots + self.sampler.queries, 1))
        k = self.sampler.shots
        support_y, query_y = tasks.support_y.clone(), tasks.query_y.clone()
        if self.corruption == "noise":
            support_y[:n_bad] += torch.as_tensor(self.sigma * noise[:, :k], dtype=support_y.dtype)
            query_y[:n_bad] += torch.as_tensor(self.sigma * noise[:, k:], dtype=query_y.dtype)
        else:
            query_y[:n_bad] = -query_y[:n_bad]
        tasks = Task(tasks.support_x, support_y, tasks.query_x, query_y)
        corrupted = torch.arange(size) < n_bad
        return TaskPool(Task(*(t.to(device=device, dtype=dtype) for t in tasks)), corrupted.to(device))


class CorruptedOmniglot:
    """Omniglot pools of ``ways``-way ``shots``-shot tasks with ``queries`` queries per class, whose
    corrupted tasks have their query labels flipped (shifted by ``1..ways-1`` classes, per task).

    Args:
        images: uint8 ``(characters, drawers, 28, 28)``, the characters to draw tasks from.
        ways, shots, queries: classes per task, support and query drawings per class.
        rotations: the rotated characters are classes of their own (as in meta-training).
    """

    def __init__(self, images: np.ndarray, ways: int, shots: int, queries: int, *, rotations: bool = True):
        if ways < 2:
            raise ValueError(f"flipping labels needs ways >= 2 classes, got {ways}")
        self.sampler = OmniglotTasks(images, ways, shots, queries, rotations=rotations)

    def pool(self, rng: np.random.Generator, size: int, corrupt: float = 0.0,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TaskPool:
        """``size`` tasks, the first ``round(corrupt * size)`` of them with flipped query labels."""
        n_bad = _corrupted_count(size, corrupt)
        tasks = self.sampler.sample(rng, size)
        shift = torch.as_tensor(rng.integers(1, self.sampler.ways, n_bad), dtype=tasks.query_y.dtype)
        query_y = tasks.query_y.clone()
        query_y[:n_bad] = (query_y[:n_bad] + shift[:, None]) % self.sampler.ways
        tasks = Task(tasks.support_x.to(dtype), tasks.support_y, tasks.query_x.to(dtype), query_y)
        corrupted = torch.arange(size) < n_bad
        return TaskPool(tasks.to(device), corrupted.to(device))
