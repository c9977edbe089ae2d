"""Stopping a run cleanly when it is asked to: SIGTERM (a scheduler's notice before SIGKILL) and
SIGINT (Ctrl-C).

:class:`StopSignals` replaces the handlers of both signals for the life of a run.
The first signal only records itself: the run loop finishes the step under way,
writes a checkpoint of it and ends with :class:`Preempted`, whose exit status is
the shell's convention for a process ended by that signal, ``128 + signum``
(130 for SIGINT, 143 for SIGTERM). A second SIGINT ends the process at once
(``os._exit(130)``): checkpoints are written atomically, so the one on disk is
intact whenever that happens. If the step under way has not ended ``grace``
seconds after the first signal (a step longer than a scheduler's notice), the
step is abandoned (``KeyboardInterrupt`` in the main thread) and the run ends
with the checkpoint already on disk.

Handlers can be installed only from the main thread; elsewhere (a run started in
a worker thread) :class:`StopSignals` does nothing and the default handlers stay.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["GRACE_SECONDS", "Preempted", "StopSignals", "exit_status"]

GRACE_SECONDS = 20.0
"""How long the step under way may take after the first signal before it is abandoned."""
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The conventional exit status of a process ended by signal ``signum``: ``128 + signum``."""
    return 128 + int(signum)


class Preempted(Exception):
    """A run stopped by a signal after checkpointing; ``str()`` says how to resume it.

    ``signum``: the signal; ``step``: the step the checkpoint holds; ``status``: the exit status
    a command ends with (``128 + signum``).
    """

    def __init__(self, signum: int, step: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.step = int(signum), step

    @property
    def status(self) -> int:
        return exit_status(self.signum)


class StopSignals:
    """Catch SIGTERM and SIGINT for a run (a context manager); :attr:`signum` is the first caught
    (``None`` while none is), :meth:`requested` whether one was."""

    def __init__(self, grace: float = GRACE_SECONDS) -> None:
        self.grace = grace
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._in_step = False
        self._timer: threading.Timer | None = None

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: now
                sys.stderr.write("\nstopped at once (second interrupt); the last checkpoint on disk is intact\n")
                sys.stderr.flush()
                os._exit(exit_status(signum))
            return
        self.signum = signum
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: stopping after the current step (Ctrl-C again to stop at once)\n")
        sys.stderr.flush()
        if self.grace is not None:
            self._timer = threading.Timer(self.grace, self._abandon)
            self._timer.daemon = True
            self._timer.start()

    def _abandon(self) -> None:
        if self._in_step:
            _thread.interrupt_main()

    def step_begins(self) -> None:
        self._in_step = True

    def step_ends(self) -> None:
        self._in_step = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
