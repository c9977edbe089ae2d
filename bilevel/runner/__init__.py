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
- :mod:`.lock`: one run per output folder;
- :mod:`.output`: the output folder's files (refusing a folder that holds a run,
  JSON-lines logs that survive a kill, atomic writes);
- :mod:`.checkpoint`: checkpoint files with a digest, written atomically, the
  previous one kept;
- :mod:`.distributed`: sharding a meta-batch over ``torchrun`` processes;
- :mod:`.devices` and :mod:`.datadir`: the ``--device`` and ``--data-dir`` rules.

The older names ``bilevel.checkpoint``, ``bilevel.distributed``, ``bilevel.devices``,
``bilevel.datadir`` and ``bilevel.runs`` still import, for one release.
"""

from bilevel.runner.lock import FolderLocked, OutputLock
from bilevel.runner.loop import CHECKPOINT, FINAL, METRICS, Command, Instance, Run, run, saved_config
from bilevel.runner.stop import Preempted, StopSignals

__all__ = ["CHECKPOINT", "FINAL", "METRICS", "Command", "FolderLocked", "Instance", "OutputLock", "Preempted", "Run",
           "StopSignals", "run", "saved_config"]
