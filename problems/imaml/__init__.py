"""iMAML: few-shot learning by implicit meta-gradients (Rajeswaran et al., NeurIPS 2019).

Omniglot classification and sinusoid regression; MAML and first-order MAML
through the same problem by a mode switch. See ``docs/imaml.md``.
"""

from bilevel.problems.imaml.models import conv4_forward, conv4_init, mlp_forward, mlp_init
from bilevel.problems.imaml.omniglot import Omniglot, OmniglotError, load_official_runs, load_omniglot
from bilevel.problems.imaml.problem import (Adaptation, IMAMLProblem, MetaGradient, adapt, cross_entropy, meta_gradient,
                                           mse)
from bilevel.problems.imaml.sinusoid import SinusoidTasks
from bilevel.problems.imaml.tasks import OmniglotTasks, Task

__all__ = [
    "Adaptation", "IMAMLProblem", "MetaGradient", "Omniglot", "OmniglotError", "OmniglotTasks", "SinusoidTasks",
    "Task", "adapt", "conv4_forward", "conv4_init", "cross_entropy", "load_official_runs", "load_omniglot",
    "meta_gradient", "mlp_forward", "mlp_init", "mse",
]
