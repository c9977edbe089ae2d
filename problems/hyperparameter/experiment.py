"""A HOAG tuning run as the run loop's instance (:mod:`bilevel.runner.loop`).

The loop writes ``metrics.jsonl`` (one record per outer step, the start at step
0), ``checkpoint.pt`` and ``final.json`` (the last record, the selected one and
the settings); the instance adds ``plot.png``.

With ``select_fraction > 0`` the task holds out that part of the validation set;
the record with the lowest held-out loss (``select_loss``) is the ``selected``
one, the early-stopped answer of the run. Without it the last record is selected.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from bilevel.runner import Command, Run
from bilevel.solvers import SOLVERS

from .config import RESUMABLE, HyperoptConfig
from .outer import HOAG, HOAGState, StepInfo
from .plot import plot_run
from .tasks import Task, cleaning_task, l2_task

__all__ = ["COMMANDS", "HyperoptRun", "selected_record"]


def _record(task: Task, state: HOAGState, elapsed: float, info: StepInfo | None) -> dict[str, Any]:
    record: dict[str, Any] = {"step": state.iteration, "time": elapsed, "val_loss": state.loss,
                              "step_size": state.step_size}
    if info is not None:
        record.update(accepted=info.accepted, candidate_loss=info.candidate_loss, tol=info.tol,
                      inner_residual=info.inner_residual, solve_iterations=info.solve_iterations)
    record.update(task.metrics(state.outer, state.inner))
    return record


def selected_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's answer among ``records``: the lowest ``select_loss`` (the later step on a tie),
    or the last record when the run holds out no selection set."""
    if "select_loss" not in records[-1]:
        return records[-1]
    return min(records, key=lambda r: (r["select_loss"], -r["step"]))


class HyperoptRun:
    """HOAG on the task of a :class:`~.config.HyperoptConfig` (``l2`` or ``cleaning``)."""

    def __init__(self, config: HyperoptConfig, run: Run) -> None:
        self.config = config
        build = l2_task if config.task == "l2" else cleaning_task
        self.task = build({**dataclasses.asdict(config), "device": str(run.device)})
        solver = SOLVERS[config.solver]
        options = {"maxiter": config.solver_maxiter} if "maxiter" in {f.name for f in dataclasses.fields(solver)} else {}
        self.hoag = HOAG(self.task.problem, self.task.data, solver=solver(**options), tol0=config.tol0,
                         tol_decay=config.tol_decay, tol_min=config.tol_min, first_move=config.first_move,
                         grow=config.grow, on_failure=config.on_failure, rtol=config.solver_rtol)
        self.elapsed = 0.0  # optimization seconds: the start and the outer steps
        self.info: StepInfo | None = None

    def start(self) -> dict[str, Any]:
        began = time.perf_counter()
        self.state = self.hoag.start(self.task.outer0)
        self.elapsed = time.perf_counter() - began
        return _record(self.task, self.state, self.elapsed, None)

    def step(self, index: int) -> None:
        self.state, self.info = self.hoag.step(self.state)
        self.elapsed += self.info.seconds

    def record(self, step: int, last: bool, seconds: float) -> dict[str, Any]:
        return _record(self.task, self.state, self.elapsed, self.info)

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"val": f"{record['val_loss']:.4f}", "test_acc": f"{record['test_acc']:.4f}"}

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.state_dict(), "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.task.data.x_train.device
        moved = torch.utils._pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v,
                                             state["state"])
        self.state, self.elapsed = HOAGState.from_state_dict(moved), state["elapsed"]

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        if not records:  # a rank other than 0 under torchrun: it writes nothing
            return {}
        return {"final": records[-1], "selected": selected_record(records)}

    def finish(self, out: Path, final: dict[str, Any], records: list[dict[str, Any]]) -> None:
        if self.config.plot:
            plot_run(out / "plot.png", records, self.task.weights_of(self.state.outer), self.task.corrupted,
                     f"{self.task.name}: {self.config.dataset}")

    def report(self, final: dict[str, Any]) -> list[str]:
        c, last, chosen = self.config, final["final"], final["selected"]
        what = (f"per-feature L2 on {c.dataset}" if c.task == "l2"
                else f"hyper-cleaning of MNIST ({c.corrupt:g} of the labels random)")
        lines = [f"hyperopt {c.task}: {what}, {last['step']} outer steps of HOAG, {last['time']:.1f} s",
                 f"  last step:     validation loss {last['val_loss']:.4f}, test loss {last['test_loss']:.4f}, "
                 f"test accuracy {100 * last['test_acc']:.2f}%"]
        if "select_loss" in chosen:
            lines.append(f"  selected step {chosen['step']} (lowest held-out loss {chosen['select_loss']:.4f}): "
                         f"test accuracy {100 * chosen['test_acc']:.2f}%")
        if "inner_residual" in last:
            lines.append(f"  last solves: inner residual {last['inner_residual']:.2e} at tolerance {last['tol']:.1e}, "
                         f"adjoint {c.solver} {last['solve_iterations']} iterations (at most {c.solver_maxiter})")
        return lines


COMMANDS = {task: Command(f"hyperopt {task}", HyperoptRun, RESUMABLE, files=("plot.png",)) for task in ("l2", "cleaning")}
"""``bilevel hyperopt l2`` and ``bilevel hyperopt cleaning`` for the run loop."""
