"""A tuning run with a progress bar, JSON-lines metrics, atomic checkpoints and exact resume.

Files in the output folder: ``metrics.jsonl`` (one record per outer step),
``checkpoint.pt`` (the settings, the loop state and the records so far, written
at step 0, every ``checkpoint_every`` steps and at the end by
:func:`bilevel.checkpoint.save`: atomic, with a digest checked on load, the
previous one kept as ``checkpoint.prev.pt``), ``summary.json`` (the last
record, the selected one and the settings) and ``plot.png``. A folder that
holds a run is refused unless ``resume`` continues it or ``overwrite`` deletes
its files; a resumed run rewrites ``metrics.jsonl`` from the checkpoint's
records and goes on exactly as if it had not stopped.

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

from bilevel.checkpoint import file_patterns, load_for_resume
from bilevel.checkpoint import save as save_checkpoint
from bilevel.runs import output_patterns, prepare_output, write_records, write_text_atomic
from bilevel.solvers import CG

from .outer import HOAG, HOAGState, StepInfo
from .plot import plot_run
from .tasks import Task

__all__ = ["run_experiment", "selected_record", "saved_settings", "RUN_KEYS", "RUN_FILES", "CHECKPOINT"]

RUN_KEYS = frozenset({"out", "resume", "overwrite", "steps", "max_time", "checkpoint_every", "progress", "threads",
                      "plot", "data_dir", "download", "device"})
"""Settings that may change between a run and its resumption (all others must match)."""
CHECKPOINT = "checkpoint.pt"
RUN_FILES = (*file_patterns(CHECKPOINT), *output_patterns("metrics.jsonl", "summary.json", "plot.png"))
"""The files a run writes in its folder (globs): what ``overwrite`` deletes."""
_LOCATION = ("out", "resume", "overwrite")  # how this invocation finds its run: never saved


def _record(task: Task, state: HOAGState, elapsed: float, info: StepInfo | None) -> dict[str, Any]:
    record: dict[str, Any] = {"step": state.iteration, "time": elapsed, "val_loss": state.loss,
                              "step_size": state.step_size}
    if info is not None:
        record.update(accepted=info.accepted, candidate_loss=info.candidate_loss, tol=info.tol,
                      inner_residual=info.inner_residual, solve_iterations=info.solve_iterations)
    record.update(task.metrics(state.outer, state.inner))
    return record


def _config(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint."""
    return {k: settings[k] for k in sorted(settings) if k not in RUN_KEYS}


def _save(path: Path, state: HOAGState, elapsed: float, settings: dict[str, Any], records: list[dict]) -> None:
    save_checkpoint({"state": state.state_dict(), "elapsed": elapsed, "records": records,
                     "settings": {k: v for k, v in settings.items() if k not in _LOCATION}}, path)


def saved_settings(out: str | os.PathLike, resume: bool | str = True) -> dict[str, Any]:
    """The settings of the run in ``out`` (``resume="previous"``: from the previous checkpoint)."""
    return load_for_resume(Path(out) / CHECKPOINT, resume, map_location="cpu")["settings"]


def _resume(ckpt_path: Path, settings: dict[str, Any], device: Any) -> tuple[HOAGState, float, list[dict]]:
    ckpt = load_for_resume(ckpt_path, settings["resume"], map_location=device)
    config, saved = _config(settings), _config(ckpt["settings"])
    if saved != config:
        changed = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
        raise ValueError(f"--resume: settings {changed} differ from the checkpointed run in {ckpt_path.parent}; "
                         "use the same settings, or a new --out folder")
    return HOAGState.from_state_dict(ckpt["state"]), ckpt["elapsed"], ckpt["records"]


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

    out = prepare_output(settings["out"], RUN_FILES, resume=bool(settings["resume"]),
                         overwrite=settings.get("overwrite", False))
    ckpt_path, metrics_path = out / CHECKPOINT, out / "metrics.jsonl"
    task = build(settings)
    hoag = HOAG(task.problem, task.data, solver=CG(maxiter=settings["cg_maxiter"]), tol0=settings["tol0"],
                tol_decay=settings["tol_decay"], tol_min=settings["tol_min"], first_move=settings["first_move"],
                grow=settings["grow"], on_failure=settings["on_failure"])
    if settings["resume"]:
        state, elapsed, records = _resume(ckpt_path, settings, task.data.x_train.device)
    else:
        began = time.perf_counter()
        state = hoag.start(task.outer0)
        elapsed = time.perf_counter() - began
        records = [_record(task, state, elapsed, None)]
        _save(ckpt_path, state, elapsed, settings, records)
    write_records(metrics_path, records)

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
                _save(ckpt_path, state, elapsed, settings, records)
    bar.close()
    if state.iteration % settings["checkpoint_every"]:  # the last step is not checkpointed yet
        _save(ckpt_path, state, elapsed, settings, records)
    result = {"final": records[-1], "selected": selected_record(records)}
    summary = {**result, "settings": {k: v for k, v in settings.items() if k != "progress"}}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if settings["plot"]:
        plot_run(out / "plot.png", records, task.weights_of(state.outer), task.corrupted,
                 f"{task.name}: {settings.get('dataset', 'mnist')}")
    return result
