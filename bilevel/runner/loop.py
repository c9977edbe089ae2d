"""The one run loop behind every training command.

A command is a config dataclass (the one source of its defaults) and an
*instance*: the object :attr:`Command.build` makes from a config, which owns the
math, the data and the evaluation and implements :class:`Instance`. :func:`run`
owns everything else, the same way for every command:

- the output folder: its lock (:mod:`.lock`, one run per folder), refusing a
  folder that holds a run unless it is resumed or overwritten;
- the single resume and compatibility check: ``checkpoint.pt`` is read once, the
  run's settings are restored from it and a setting given anew that differs is
  refused unless the command lists it as resumable;
- ``metrics.jsonl``: one record per log step (``log_every``), cut back to the
  checkpoint's step on resume; the progress bar;
- ``checkpoint.pt``: at step 0, every ``checkpoint_every`` steps, at the end, and
  when SIGTERM or SIGINT arrives (:mod:`.stop`): the step under way is finished,
  checkpointed, and the run ends with :class:`~.stop.Preempted` (exit status
  ``128 + signum``) and one line saying how to resume;
- ``max_minutes``: the run stops at the first log step past that wall-clock
  budget, as if it were its last (logged, checkpointed, evaluated);
- under ``torchrun``: every rank steps, rank 0 alone writes and prints, and the
  ranks agree once per step on whether to stop (one all-reduce of the flags);
- the end: :meth:`Instance.evaluate` gives the final results, written to
  ``final.json``; :meth:`Instance.report` gives the closing report's lines;
- with ``tensorboard``, every logged number also goes to TensorBoard
  (``torch.utils.tensorboard``, the ``tensorboard`` extra) under ``<out_dir>/tensorboard``.

Resuming continues bit for bit: the instance's :meth:`~Instance.state_dict` at
any step boundary holds everything its later steps depend on (parameters,
optimizer state, generator states, statistics not yet logged).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch

from bilevel.runner import distributed
from bilevel.runner.checkpoint import file_patterns, load_for_resume
from bilevel.runner.checkpoint import save as save_checkpoint
from bilevel.runner.devices import resolve_device
from bilevel.runner.flags import restore
from bilevel.runner.lock import OutputLock
from bilevel.runner.output import output_patterns, prepare_output, read_records, write_records, write_text_atomic
from bilevel.runner.stop import Preempted, StopSignals

__all__ = ["CHECKPOINT", "FINAL", "METRICS", "LOCATION", "Command", "Instance", "Run", "run", "run_files",
           "saved_config"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
LOCATION = ("out_dir",)
"""Config fields that say where this invocation runs: never saved, never compared."""
ALWAYS_RESUMABLE = ("out_dir", "progress", "threads")
"""Config fields every resumed run may change."""


class Instance(Protocol):
    """What a command implements; :func:`run` drives it.

    Optional attributes, read when present: ``total_steps`` (the run's steps, when they are not
    the config's ``steps``) and ``log_every`` (when not the config's). Optional methods, used
    when present: ``start() -> dict | None`` (the record logged at
    step 0 of a new run), ``replicas() -> list[Tensor]`` (what must be bitwise equal on
    every rank, checked at each checkpoint), ``finish(out, final, records)`` (rank 0, after
    ``final.json``: plots) and ``postfix(record) -> dict`` (the progress bar's figures).
    """

    def step(self, index: int) -> None:
        """Take step ``index`` (counted from 0)."""

    def record(self, step: int, last: bool, seconds: float) -> dict[str, Any] | None:
        """The metrics logged after ``step`` steps (``last``: the run's last step; ``seconds``:
        its training time so far); ``None``: nothing to log at this step."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the later steps depend on: tensors and plain values only (read back with
        ``weights_only=True``)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The final results (``final.json``), given the run's logged ``records`` (empty on
        ranks other than 0)."""

    def report(self, final: dict[str, Any]) -> list[str]:
        """The closing report's lines for ``final``."""


@dataclass(frozen=True)
class Command:
    """A training command: its ``name``, how to ``build`` an instance from a config and a
    :class:`Run`, the config fields a resumed run may change (``resumable``), and the file
    patterns its instance writes besides the loop's (``files``)."""

    name: str
    build: Callable[[Any, "Run"], Instance]
    resumable: frozenset[str] = frozenset()
    files: tuple[str, ...] = ()

    def patterns(self) -> tuple[str, ...]:
        """Glob patterns of every file a run of this command writes in its folder."""
        return run_files(*self.files)


@dataclass(frozen=True)
class Run:
    """How this run is carried out, handed to :attr:`Command.build`: its folder, whether it
    resumes or overwrites, the progress bar, the process context, the device."""

    out: Path
    resume: bool | str
    overwrite: bool
    progress: bool
    ctx: distributed.Context
    device: torch.device


def run_files(*extra: str) -> tuple[str, ...]:
    """Glob patterns of the loop's files (checkpoints, metrics, final results) and ``extra``."""
    return (*file_patterns(CHECKPOINT), *output_patterns(METRICS, FINAL), *output_patterns(*extra))


def saved_config(out_dir: str | Path, resume: bool | str = True) -> dict[str, Any]:
    """The settings saved in the checkpoint of the run in ``out_dir``."""
    return load_for_resume(Path(out_dir) / CHECKPOINT, resume, map_location="cpu")["config"]


def _fields(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in LOCATION}


def _restored(config: Any, saved: Mapping[str, Any], given: Mapping[str, str] | None, resumable: Iterable[str],
              out: Path) -> Any:
    """``config`` with the run's ``saved`` settings for every field not ``given``; a given field that
    differs from the run's is an error unless resumable. ``given=None`` (a call from Python): every
    field counts as given."""
    current = _fields(config)
    if given is None:
        given = {k: k for k in current}
    settings = restore(saved, current, {k: v for k, v in given.items() if k in current},
                       {*resumable, *ALWAYS_RESUMABLE}, out)
    return dataclasses.replace(config, **settings)


def _agree(ctx: distributed.Context, flags: list[bool]) -> list[bool]:
    """Each flag true on any rank, the same answer on every rank (one all-reduce)."""
    if not ctx.distributed:
        return flags
    total = ctx.sum(torch.tensor([float(f) for f in flags], dtype=torch.float64, device=ctx.device))
    return [bool(v > 0) for v in total.tolist()]


def run(command: Command, config: Any, *, out_dir: str | Path | None = None, resume: bool | str = False,
        overwrite: bool = False, progress: bool | None = None, given: Mapping[str, str] | None = None,
        ctx: distributed.Context | None = None, report: bool = True, tensorboard: bool = False) -> dict[str, Any]:
    """Run (or resume) ``command`` with ``config`` in ``out_dir``; returns the final results.

    ``out_dir`` and ``progress`` default to the config's fields of those names.
    ``resume``: ``True``/``"latest"`` continues from the folder's checkpoint,
    ``"previous"`` from the previous one kept beside it; the run's saved settings
    replace ``config``'s except the fields in ``given`` (field -> the flag typed, for
    the error message; ``None``: every field is given, so every field must match
    unless resumable). A folder holding a run is refused unless resumed or
    ``overwrite``. ``report``: print the closing report (rank 0). ``tensorboard``: write
    the logged numbers for TensorBoard too (rank 0, ``<out_dir>/tensorboard``).

    Raises :class:`~bilevel.runner.stop.Preempted` after checkpointing when SIGTERM or
    SIGINT arrives, and :class:`~bilevel.runner.lock.FolderLocked` when another run
    holds the folder.
    """
    out = Path(out_dir if out_dir is not None else config.out_dir)
    device = resolve_device(getattr(config, "device", None))
    ctx = ctx or distributed.init(device)
    lock = OutputLock(out) if ctx.is_main else None
    stop = StopSignals()  # from here on a signal stops the run at the next step boundary, checkpointed
    try:
        stop.__enter__()
        if lock is not None:
            lock.acquire()
            prepare_output(out, command.patterns(), resume=bool(resume), overwrite=overwrite)
        ctx.barrier()
        payload = None
        if resume:
            payload = load_for_resume(out / CHECKPOINT, resume, map_location="cpu")
            config = _restored(config, payload["config"], given, command.resumable, out)
        progress = getattr(config, "progress", True) if progress is None else progress
        place = Run(out, resume, overwrite, progress, ctx, ctx.device if ctx.distributed else device)
        board = _board(out) if tensorboard and ctx.is_main else None
        try:
            return _loop(command, config, place, payload, report, stop, board)
        finally:
            if board is not None:
                board.close()
    finally:
        stop.__exit__(None, None, None)
        if lock is not None:
            lock.release()


def _board(out: Path) -> Any:
    """A TensorBoard writer in ``<out>/tensorboard``, or ``ImportError`` saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(f"--tensorboard needs the tensorboard package ({err}): pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _scalars(record: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    """The numbers of a metrics record as TensorBoard tags (``eval/loss_after``), nested dicts included."""
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, Mapping):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", float(value)


def _loop(command: Command, config: Any, place: Run, payload: dict | None, report: bool,
          stop: StopSignals, board: Any = None) -> dict[str, Any]:
    out, ctx = place.out, place.ctx
    instance = command.build(config, place)
    steps = getattr(instance, "total_steps", None) or config.steps
    log_every = getattr(instance, "log_every", None) or getattr(config, "log_every", 1) or 1
    checkpoint_every = getattr(config, "checkpoint_every", None) or steps
    metrics = out / METRICS

    def save(step: int, seconds: float) -> None:
        replicas = getattr(instance, "replicas", None)
        if replicas is not None:
            ctx.check_replicas(replicas())
        if ctx.is_main:
            save_checkpoint({"command": command.name, "config": _fields(config), "step": step, "seconds": seconds,
                             "state": instance.state_dict()}, out / CHECKPOINT)
        ctx.barrier()

    if payload is not None:
        instance.load_state_dict(payload["state"])
        step, elapsed = payload["step"], payload["seconds"]
        records = read_records(metrics, upto=step) if ctx.is_main else []
    else:
        step, elapsed = 0, 0.0
        start = getattr(instance, "start", None)
        first = start() if start is not None else None
        records = [{"step": 0, **first}] if first else []
        save(0, elapsed)
    if ctx.is_main:
        write_records(metrics, records)
    ctx.barrier()

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=min(step, steps), desc=command.name, disable=not (place.progress and ctx.is_main))
    max_minutes = getattr(config, "max_minutes", None)
    began = time.perf_counter()
    deadline = began + 60 * max_minutes if max_minutes else math.inf
    postfix = getattr(instance, "postfix", None)
    try:
        if _agree(ctx, [stop.requested()])[0]:  # a signal while the run was being set up
            _preempted(stop, command, step, out, ctx)
        while step < steps:
            stop.step_begins()
            try:
                instance.step(step)
            finally:
                stop.step_ends()
            step += 1
            bar.update(1)
            seconds = elapsed + time.perf_counter() - began
            at_log = step % log_every == 0
            signalled, late = _agree(ctx, [stop.requested(), ctx.is_main and at_log
                                           and time.perf_counter() >= deadline])
            last = step == steps or late
            entries = instance.record(step, last, seconds) if at_log or last else None
            if entries is not None:
                record = {"step": step, **entries}
                if ctx.is_main:
                    records.append(record)
                    with open(metrics, "a") as log:
                        log.write(json.dumps(record) + "\n")
                    if board is not None:
                        for tag, value in _scalars(record):
                            board.add_scalar(tag, value, step)
                if postfix is not None:
                    bar.set_postfix(postfix(record))
            if signalled or last or step % checkpoint_every == 0:
                save(step, elapsed + time.perf_counter() - began)
            if signalled:
                _preempted(stop, command, step, out, ctx)
            if last:
                break
        bar.close()
        stop.step_begins()  # a signal during the final evaluation abandons it: resuming evaluates again
        try:
            final = instance.evaluate(records)
            if "config" not in final:
                final = {**final, "config": _fields(config)}
        finally:
            stop.step_ends()
    except KeyboardInterrupt:
        if not stop.requested():
            raise
        _preempted(stop, command, None, out, ctx)
    if ctx.is_main:
        write_text_atomic(out / FINAL, json.dumps(final, indent=2) + "\n")
        finish = getattr(instance, "finish", None)
        if finish is not None:
            finish(out, final, records)
        if report:
            files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.endswith(".tmp")
                           and p.name != "run.lock")
            print("\n".join([*instance.report(final), f"files in {out}: {', '.join(files)}"]))
    ctx.barrier()
    return final


def _preempted(stop: StopSignals, command: Command, step: int | None, out: Path, ctx: distributed.Context) -> None:
    """End the run after a signal: ``step`` was just checkpointed (``None``: the step under way was
    abandoned; the checkpoint on disk stands)."""
    import signal

    name = signal.Signals(stop.signum).name
    held = f"step {step}" if step is not None else "its last checkpoint (the step under way was abandoned)"
    message = (f"{name}: the run in {out} stopped at {held}; continue it with: bilevel {command.name} "
               f"--out-dir {out} --resume")
    raise Preempted(stop.signum, -1 if step is None else step, message)
