"""Few-shot tasks: the :class:`Task` container and the N-way K-shot Omniglot sampler.

Every sampler draws a whole meta-batch at once from a ``numpy.random.Generator``
(so a saved generator state replays the same tasks) and returns a
:class:`Task` whose tensors carry a leading task dimension, ready for
``torch.func.vmap`` over tasks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["Task", "OmniglotTasks", "to_task"]


class Task(NamedTuple):
    """Support (inner, training) and query (outer, test) sets of one or many tasks."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str) -> "Task":
        return Task(*(t.to(device) for t in self))

    def index(self, i: int | slice) -> "Task":
        """Task ``i`` (or a slice of tasks) of a batched task."""
        return Task(*(t[i] for t in self))


def to_task(support: np.ndarray, support_y: np.ndarray, query: np.ndarray, query_y: np.ndarray,
            device: torch.device | str = "cpu") -> Task:
    """uint8 images ``(..., n, 28, 28)`` and int labels to a float :class:`Task` with a channel axis."""
    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device).unsqueeze(-3).float().div_(255)

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(a, dtype=np.int64)).to(device)

    return Task(images(support), labels(support_y), images(query), labels(query_y))


class OmniglotTasks:
    """N-way K-shot classification tasks over a set of Omniglot characters.

    A task picks ``ways`` distinct classes, then ``shots + queries`` distinct
    drawings of each: ``shots`` form the support set, ``queries`` the query set.
    Labels are ``0..ways-1`` in the order the classes were drawn. With
    ``rotations`` every character rotated by 0, 90, 180 or 270 degrees is a class
    of its own (Santoro et al., 2016; MAML), quadrupling the classes.

    Args:
        images: uint8 ``(characters, drawers, 28, 28)``.
        ways, shots, queries: classes per task, support and query drawings per class.
        rotations: add the rotated copies as new classes.
    """

    def __init__(self, images: np.ndarray, ways: int, shots: int, queries: int, *, rotations: bool = False):
        characters, drawers = images.shape[:2]
        classes = characters * (4 if rotations else 1)
        if ways > classes:
            raise ValueError(f"ways={ways} exceeds the {classes} available classes")
        if shots + queries > drawers:
            raise ValueError(f"shots + queries = {shots + queries} exceeds the {drawers} drawings per class")
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries
        self.rotations = rotations
        self.num_classes = classes

    def sample(self, rng: np.random.Generator, batch: int, device: torch.device | str = "cpu") -> Task:
        """``batch`` tasks: support ``(batch, ways*shots, 1, 28, 28)``, query ``(batch, ways*queries, ...)``."""
        n_chars, n_drawers = self.images.shape[:2]
        per_class = self.shots + self.queries
        classes = np.stack([rng.choice(self.num_classes, self.ways, replace=False) for _ in range(batch)])
        drawers = rng.random((batch, self.ways, n_drawers)).argsort(-1)[..., :per_class]
        chars, turns = classes % n_chars, classes // n_chars
        pics = self.images[chars[..., None], drawers]  # (batch, ways, per_class, 28, 28)
        for k in range(1, 4):
            mask = turns == k
            if mask.any():
                pics[mask] = np.rot90(pics[mask], k, axes=(-2, -1))
        labels = np.broadcast_to(np.arange(self.ways)[None, :, None], (batch, self.ways, per_class))
        s, q = slice(0, self.shots), slice(self.shots, per_class)
        flat = (batch, -1, *pics.shape[-2:])
        return to_task(pics[:, :, s].reshape(flat), labels[:, :, s].reshape(batch, -1),
                       pics[:, :, q].reshape(flat), labels[:, :, q].reshape(batch, -1), device)
