"""Fair meta-learning: a fairness-constrained saddle point per task, differentiated implicitly.

See ``docs/fair.md``. Public pieces: :class:`FairMetaProblem` (the primal-dual
inner problem), the baselines (:class:`ProxLogisticProblem` = iMAML,
:class:`GradientStepProblem` = MAML, :class:`PDFMProblem`), the task loaders in
:mod:`.data`, the metrics in :mod:`.metrics` and the harness in :mod:`.train`.
"""

from .baselines import GradientStepProblem, PDFMProblem, ProxLogisticProblem
from .data import DATASETS, Task, load_tasks, sample_episodes, split_tasks, evaluation_episodes
from .problem import FairMetaProblem

__all__ = ["DATASETS", "FairMetaProblem", "GradientStepProblem", "PDFMProblem", "ProxLogisticProblem", "Task",
           "load_tasks", "sample_episodes", "split_tasks", "evaluation_episodes"]
