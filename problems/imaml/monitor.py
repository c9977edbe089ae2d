"""Health checks of a meta-training run: failing adjoint solves, loss spikes, divergence.

:class:`Monitor` looks at every logged window of meta-steps (the values are read
back to the host only then, so there is no extra synchronization per step) and
says, as a :class:`TrainingWarning` and in the window's ``warnings`` entry of
``metrics.jsonl``:

- **most adjoint solves failed** (fewer than half reached the tolerance on the
  true residual), with the counts by status and what to change. Rate-limited:
  the first failing window warns, then only the 2nd, 4th, 8th, ... failing
  window, each saying how many have failed so far;
- **the query loss spiked**: a step whose mean query loss exceeds ``spike_factor``
  times the running median, the median of the logged query losses of the previous
  ``history`` windows (at least ``MIN_HISTORY`` of them), naming the step and both
  values; "diverging" when most steps of the window are above it. At most one
  warning per window;
- **NaN or Inf** in the query loss raises :class:`FloatingPointError` naming the
  first bad step and the fixes.

:func:`summarize` folds the logged windows of ``metrics.jsonl`` into the run's
solver outcomes (counts by status, fraction converged, mean iterations, inner
residuals), which ``final.json`` keeps and the command prints. The monitor's
state is a function of the logged windows, so a resumed run rebuilds it with
:meth:`Monitor.replay` and warns exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from typing import Any, Iterable

__all__ = ["Monitor", "TrainingWarning", "summarize", "MIN_HISTORY"]

MIN_HISTORY = 5
"""Logged windows needed before a spike can be called."""


class TrainingWarning(UserWarning):
    """A meta-training run is unhealthy: failing adjoint solves, loss spikes."""


class Monitor:
    """Checks each logged window of a run (see the module docstring).

    Args:
        spike_factor: a step's loss above ``spike_factor`` times the running median is a spike.
        history: logged windows in the running median.
    """

    def __init__(self, spike_factor: float = 10.0, history: int = 20):
        if not spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor}")
        self.spike_factor = spike_factor
        self.losses: deque[float] = deque(maxlen=history)
        self.failing_windows = 0

    def check(self, first_step: int, losses: list[float], record: dict[str, Any]) -> list[str]:
        """Warnings for the window of steps ``first_step, first_step + 1, ...`` with these mean
        query ``losses`` and logged ``record`` (its ``query_loss``, the window's mean, and
        ``solve_status``/``adjoint_converged``).

        Issues each as a :class:`TrainingWarning` and returns them.
        """
        for i, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the meta-training query loss became {loss} at step {first_step + i}: lower --meta-lr, "
                    f"use --inner-optimizer armijo (a step that cannot diverge) or lower --inner-lr, "
                    f"or add --damping")
        found = [self._solves(record), self._spikes(first_step, losses)]
        self.losses.append(record["query_loss"])
        messages = [m for m in found if m]
        for message in messages:
            warnings.warn(message, TrainingWarning, stacklevel=2)
        return messages

    def replay(self, records: Iterable[dict[str, Any]]) -> None:
        """Rebuild the state from the windows already logged (a resumed run), without warning."""
        for record in records:
            self._solves(record)
            self.losses.append(record["query_loss"])

    def _solves(self, record: dict[str, Any]) -> str | None:
        counts = record.get("solve_status")
        if not counts:
            return None
        total, converged = sum(counts.values()), record["adjoint_converged"]
        if 2 * converged >= total:
            return None
        self.failing_windows += 1
        if self.failing_windows & (self.failing_windows - 1):  # warn at 1, 2, 4, 8, ... failing windows
            return None
        failed = ", ".join(f"{name} {n}" for name, n in counts.items() if n and name != "converged")
        return (f"step {record['step']}: {total - converged} of {total} adjoint solves missed the tolerance "
                f"in the last window ({failed}; {self.failing_windows} such window(s) so far): the implicit "
                f"meta-gradient is approximate. Raise --solver-maxiter, add --damping, use --solver minres for "
                f"indefinite systems, or solve the inner problem (--inner-optimizer newton_cg or lbfgs with a smooth "
                f"--activation silu)")

    def _spikes(self, first_step: int, losses: list[float]) -> str | None:
        message = None
        if len(self.losses) >= MIN_HISTORY:
            median = statistics.median(self.losses)
            above = [(loss, first_step + i) for i, loss in enumerate(losses) if loss > self.spike_factor * median]
            if above:
                worst, step = max(above)
                kind = "is diverging" if 2 * len(above) > len(losses) else "spiked"
                message = (f"step {step}: the query loss {kind}: {worst:.4g} against a running median of "
                           f"{median:.4g} ({len(above)} of {len(losses)} steps of the window above "
                           f"{self.spike_factor:g}x the median); lower --meta-lr or --inner-lr, or use "
                           f"--inner-optimizer armijo")
        return message


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The solver outcomes of a run from its ``metrics.jsonl`` records.

    ``adjoint``: counts by status, ``converged`` (true relative residual within the
    solver's ``rtol``), its fraction, the mean iterations per solve, and the
    systems proven ``indefinite`` (implicit mode only). ``inner``: the mean inner
    residual ``||G(phi)||`` over the logged windows. ``warnings``: how many health
    warnings the run logged.
    """
    counts: dict[str, int] = {}
    converged = total = indefinite = 0
    iterations = inner = 0.0
    windows = warned = 0
    for record in records:
        warned += len(record.get("warnings", []))
        if "inner_residual" in record:
            inner += record["inner_residual"]
            windows += 1
        if "solve_status" not in record:
            continue
        n = sum(record["solve_status"].values())
        for name, c in record["solve_status"].items():
            counts[name] = counts.get(name, 0) + c
        converged += record["adjoint_converged"]
        indefinite += record.get("adjoint_indefinite", 0)
        iterations += record["solve_iterations"] * n
        total += n
    out: dict[str, Any] = {"warnings": warned}
    if windows:
        out["inner"] = {"mean_residual": inner / windows}
    if total:
        out["adjoint"] = {"solves": total, "status": counts, "converged": converged,
                          "converged_fraction": converged / total, "mean_iterations": iterations / total,
                          "indefinite": indefinite}
    return out
