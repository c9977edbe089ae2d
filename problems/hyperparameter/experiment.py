"""A tuning run with a progress bar, JSON-lines metrics, atomic checkpoints and exact resume.

Files in the output folder: ``metrics.jsonl`` (one record per outer step),
``checkpoint.pt`` (the loop state, rewritten atomically every
``checkpoint_every`` steps and at the end), ``summary.json`` (the last record,
the selected one and the settings) and ``plot.png``.

With ``select_fraction > 0`` the task holds out that part of the validation set;
the record with the lowest held-out loss (``select_loss``) is the ``selected``
one, the early-stopped answer of the run. Without it the last record is selected.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bilevel.solvers import CG

from .outer import HOAG, HOAGState, StepInfo
from .plot import plot_run
from .tasks import Task

__all__ = ["run_experiment", "selected_record", "RUN_KEYS"]

RUN_KEYS = frozenset({"out", "resume", "steps", "max_time", "checkpoint_every", "progress", "threads", "plot",
                      "data_dir", "download", "device"})
"""Settings that may change between a run and its resumption (all others must match)."""


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _record(task: Task, state: HOAGState, elapsed: float, info: StepInfo | None) -> dict[str, Any]:
    record: dict[str, Any] = {"step": state.iteration, "time": elapsed, "val_loss": state.loss,
                              "step_size": state.step_size}
    if info is not None:
        record.update(accepted=info.accepted, candidate_loss=info.candidate_loss, tol=info.tol,
                      inner_residual=info.inner_residual, solve_iterations=info.solve_iterations)
    record.update(task.metrics(state.outer, state.inner))
    return record


def _save(path: Path, state: HOAGState, elapsed: float, config: dict[str, Any]) -> None:
    _atomic_write(path, lambda tmp: torch.save({"state": state.state_dict(), "elapsed": elapsed,
                                                "config": config}, tmp))


def _resume(ckpt_path: Path, metrics_path: Path, config: dict[str, Any],
            device: torch.device) -> tuple[HOAGState, float, list[dict]]:
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; run once without --resume first")
    ckpt = torch.load(ckpt_path, weights_only=True, map_location=device)
    if ckpt["config"] != config:
        changed = sorted(k for k in set(config) | set(ckpt["config"]) if config.get(k) != ckpt["config"].get(k))
        raise ValueError(f"--resume: settings {changed} differ from the checkpointed run in {ckpt_path.parent}; "
                         "use the same settings, or a new --out folder")
    state = HOAGState.from_state_dict(ckpt["state"])
    records = []
    if metrics_path.exists():
        with open(metrics_path) as fh:
            records = [r for r in map(json.loads, fh) if r["step"] <= state.iteration]
    return state, ckpt["elapsed"], records


def selected_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's answer among ``records``: the lowest ``select_loss`` (the later step on a tie),
    or the last record when the run holds out no selection set."""
    if "select_loss" not in records[-1]:
        return records[-1]
    return min(records, key=lambda r: (r["select_loss"], -r["step"]))


def run_experiment(settings: dict[str, Any], build: Callable[[dict[str, Any]], Task]) -> dict[str, Any]:
    """Run (or resume) HOAG on the task that ``build(settings)`` returns.

    Returns ``{"final": last record, "selected": selected record}``; a record holds the
    step, the elapsed optimization time, the validation loss and the task's metrics.
    """
    from tqdm import tqdm

    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    config = {k: settings[k] for k in sorted(settings) if k not in RUN_KEYS}
    task = build(settings)
    hoag = HOAG(task.problem, task.data, solver=CG(maxiter=settings["cg_maxiter"]), tol0=settings["tol0"],
                tol_decay=settings["tol_decay"], tol_min=settings["tol_min"], first_move=settings["first_move"],
                grow=settings["grow"], on_failure=settings["on_failure"])
    if settings["resume"]:
        state, elapsed, records = _resume(ckpt_path, metrics_path, config, task.data.x_train.device)
    else:
        began = time.perf_counter()
        state = hoag.start(task.outer0)
        elapsed = time.perf_counter() - began
        records = [_record(task, state, elapsed, None)]
        _save(ckpt_path, state, elapsed, config)
    _atomic_write(metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))

    steps, max_time = settings["steps"], settings["max_time"]
    bar = tqdm(total=steps, initial=state.iteration, desc=f"hyperopt {task.name}", disable=not settings["progress"])
    with open(metrics_path, "a") as fh:
        while state.iteration < steps and (max_time is None or elapsed < max_time):
            state, info = hoag.step(state)
            elapsed += info.seconds
            record = _record(task, state, elapsed, info)
            records.append(record)
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            bar.update(1)
            bar.set_postfix(val=f"{state.loss:.4f}", test_acc=f"{record['test_acc']:.4f}")
            if state.iteration % settings["checkpoint_every"] == 0:
                _save(ckpt_path, state, elapsed, config)
    bar.close()
    _save(ckpt_path, state, elapsed, config)
    result = {"final": records[-1], "selected": selected_record(records)}
    summary = {**result, "settings": {k: v for k, v in settings.items() if k != "progress"}}
    _atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    if settings["plot"]:
        plot_run(out / "plot.png", records, task.weights_of(state.outer), task.corrupted,
                 f"{task.name}: {settings.get('dataset', 'mnist')}")
    return result
