"""The run machinery of the training commands, apart from the math in :mod:`bilevel`.

A training command (``bilevel imaml``, ``hyperopt``, ``fair``, ``prox``,
``nested``) is a config dataclass, which holds its defaults, and an instance
that owns its math, its data and its evaluation. Everything between the command
line and that instance lives here, once:

- :mod:`.loop`: the one run loop (:func:`run`) and the protocol an instance
  implements (:class:`Instance`): output folder, resume and its single
  compatibility check, metrics, progress bar, checkpoints, ``--max-minutes``,
  rank-0 writing under ``torchrun``, ``final.json`` and the closing report;
- :mod:`.flags`: the flags every training command shares, with their defaults
  read from its config, and the deprecated older spellings;
- :mod:`.stop`: SIGTERM and SIGINT end a run after a checkpoint of its last step;
- :mod:`.lock`: one run per output folder.
"""

from bilevel.runner.lock import FolderLocked, OutputLock
from bilevel.runner.loop import CHECKPOINT, FINAL, METRICS, Command, Instance, Run, run, saved_config
from bilevel.runner.stop import Preempted, StopSignals

__all__ = ["CHECKPOINT", "FINAL", "METRICS", "Command", "FolderLocked", "Instance", "OutputLock", "Preempted", "Run",
           "StopSignals", "run", "saved_config"]
