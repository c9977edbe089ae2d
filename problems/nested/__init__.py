"""NestedMAML (Killamsetty, Li, Zhao, Chen, Iyer; AAAI 2022): learn a weight per training task.

Task weights ``w`` (outer), meta-parameters ``theta*(w)`` of the ``w``-weighted
iMAML meta-objective (middle), per-task adaptation ``phi_i(theta)`` (inner),
judged on clean validation tasks. See ``docs/nested.md``.
"""

from bilevel.problems.nested.problem import (WEIGHTINGS, NestedData, NestedMAMLProblem, lookahead_weights,
                                             task_weights)
from bilevel.problems.nested.tasks import CorruptedSinusoid, TaskPool
from bilevel.problems.nested.train import METHODS, NestedConfig, auroc, train

__all__ = ["CorruptedSinusoid", "METHODS", "NestedConfig", "NestedData", "NestedMAMLProblem", "TaskPool", "WEIGHTINGS",
           "auroc", "lookahead_weights", "task_weights", "train"]
