"""NestedMAML (Killamsetty, Li, Zhao, Chen, Iyer; AAAI 2022): learn a weight per training task.

Task weights ``w`` (outer), meta-parameters ``theta*(w)`` of the ``w``-weighted
iMAML meta-objective (middle), per-task adaptation ``phi_i(theta)`` (inner),
judged on clean validation tasks. See ``docs/nested.md``.
"""

from bilevel.problems.nested.problem import (WEIGHTINGS, NestedData, NestedMAMLProblem, influence_weights,
                                             lookahead_weights, task_weights)
from bilevel.problems.nested.tasks import CorruptedOmniglot, CorruptedSinusoid, TaskPool
from bilevel.problems.nested.train import DATASETS, METHODS, NestedConfig, auroc, train

__all__ = ["CorruptedOmniglot", "CorruptedSinusoid", "DATASETS", "METHODS", "NestedConfig", "NestedData",
           "NestedMAMLProblem", "TaskPool", "WEIGHTINGS", "auroc", "influence_weights", "lookahead_weights",
           "task_weights", "train"]
