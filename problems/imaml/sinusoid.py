"""The sinusoid regression tasks of MAML (Finn et al., ICML 2017).

A task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase
``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``; K support points (10 by default)
to adapt on and query points to evaluate. Loss: mean squared error.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bilevel.problems.imaml.tasks import Task

__all__ = ["SinusoidTasks", "AMPLITUDE", "PHASE", "X_RANGE"]

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SinusoidTasks:
    """Sampler of sinusoid tasks with ``shots`` support and ``queries`` query points."""

    def __init__(self, shots: int = 10, queries: int = 10):
        if shots < 1 or queries < 1:
            raise ValueError(f"shots and queries must be >= 1, got {shots} and {queries}")
        self.shots, self.queries = shots, queries

    @staticmethod
    def sample_params(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Amplitudes and phases of ``batch`` tasks."""
        return rng.uniform(*AMPLITUDE, size=batch), rng.uniform(*PHASE, size=batch)

    def make(self, rng: np.random.Generator, amplitude: np.ndarray, phase: np.ndarray,
             device: torch.device | str = "cpu") -> Task:
        """Tasks with the given amplitudes and phases, inputs drawn from ``rng``."""
        batch = len(amplitude)
        x = rng.uniform(*X_RANGE, size=(batch, self.shots + self.queries, 1))
        y = amplitude[:, None, None] * np.sin(x - phase[:, None, None])

        def t(a: np.ndarray) -> Tensor:
            return torch.as_tensor(a, dtype=torch.float32, device=device)

        k = self.shots
        return Task(t(x[:, :k]), t(y[:, :k]), t(x[:, k:]), t(y[:, k:]))

    def sample(self, rng: np.random.Generator, batch: int, device: torch.device | str = "cpu") -> Task:
        """``batch`` tasks: support ``(batch, shots, 1)``, query ``(batch, queries, 1)``."""
        amplitude, phase = self.sample_params(rng, batch)
        return self.make(rng, amplitude, phase, device)
