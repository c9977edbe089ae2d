"""What the long-running commands (``bilevel imaml``, ``hyperopt``, ``fair``) share so that a run
is safe to stop, restart and repeat.

- :func:`count` and :func:`real`: argparse types that refuse a bad number up front, naming the flag
  (``argument --steps: must be a whole number >= 1, got '-5'``).
- :func:`track_given` and :func:`given_flags`: which flags the user actually typed, so that
  ``--resume`` can restore every other setting from the checkpoint (:func:`restore`).
- :func:`add_run_flags`: ``--resume [latest|previous]`` and ``--overwrite``.
- :func:`prepare_output`: an output folder that holds a run is refused unless the run is resumed
  or explicitly overwritten; overwriting deletes only the files the command writes.
- :func:`read_records` / :func:`write_records`: JSON-lines logs that tolerate a last line cut
  short by a kill and are rewritten atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping

from bilevel.checkpoint import RESUME_CHOICES

__all__ = ["count", "real", "track_given", "given_flags", "settings_of", "add_run_flags", "restore",
           "prepare_output", "output_patterns", "run_files", "read_records", "write_records", "write_text_atomic"]

_GIVEN = "_given_flags"  # namespace attribute: dest -> the option string the user typed


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type for a whole number ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number between ``low`` and ``high`` (each bound closed unless
    ``*_open``; ``None`` for no bound)."""
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        wanted = f"{'<' if high_open else '<='} {high:g}"
    else:
        wanted = "finite"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number {wanted}, got {text!r}")
        return value

    return parse


class _Given:
    """Mixin for argparse actions: records that the user gave this flag (and how they spelled it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]
        given = dict(getattr(namespace, _GIVEN, {}))
        given[self.dest] = option_string or self.dest  # type: ignore[attr-defined]
        setattr(namespace, _GIVEN, given)


_TRACKED = {name: type(f"Given{base.__name__}", (_Given, base), {})
            for name, base in (("store", argparse._StoreAction), ("store_true", argparse._StoreTrueAction),
                               ("store_false", argparse._StoreFalseAction))}


def track_given(parser: argparse.ArgumentParser) -> None:
    """Make the ``store``, ``store_true`` and ``store_false`` arguments added to ``parser`` from now
    on record when they appear on the command line (read back with :func:`given_flags`)."""
    for name, action in _TRACKED.items():
        parser.register("action", name, action)
    parser.register("action", None, _TRACKED["store"])


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """The settings given on the command line of a :func:`track_given` parser: dest -> flag typed."""
    return dict(getattr(args, _GIVEN, {}))


def settings_of(args: argparse.Namespace, drop: Iterable[str] = ("func", "command")) -> dict[str, Any]:
    """The parsed settings, without the dispatch entries ``drop`` and the record of given flags."""
    skip = {_GIVEN, *drop}
    return {k: v for k, v in vars(args).items() if k not in skip}


def add_run_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, checkpoint: str) -> None:
    """Add ``--resume [latest|previous]`` and ``--overwrite`` (mutually exclusive) to ``parser``;
    ``checkpoint`` names the checkpoint file(s) in the help."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", nargs="?", const="latest", choices=RESUME_CHOICES, default=None,
                       help=f"continue the run in the output folder from {checkpoint}, with the run's settings "
                            "(flags given here must match them, except the resumable ones); 'previous': from "
                            "the previous checkpoint kept beside it (when the latest one is damaged)")
    group.add_argument("--overwrite", action="store_true",
                       help="delete the files of the run already in the output folder and start over")


def restore(saved: Mapping[str, Any], current: Mapping[str, Any], given: Mapping[str, str],
            resumable: Collection[str], source: str | os.PathLike) -> dict[str, Any]:
    """The settings of a resumed run: the run's ``saved`` ones, with the flags ``given`` on top.

    Only keys of ``current`` are restored. A given flag whose value differs from
    the run's is an error naming it, unless it is ``resumable``.
    """
    conflicts = sorted(k for k in given if k in saved and k not in resumable and saved[k] != current[k])
    if conflicts:
        details = "; ".join(f"{given[k]} {current[k]!r} (the run has {saved[k]!r})" for k in conflicts)
        raise ValueError(f"cannot resume the run in {source} with other settings: {details}. Leave those flags "
                         "out to keep the run's values, or start a new run (--overwrite, or another output folder)")
    kept = {k: v for k, v in saved.items() if k in current and k not in given}
    return {**current, **kept}


def output_patterns(*names: str) -> tuple[str, ...]:
    """Glob patterns of the files ``names`` and of the temporary files that writing them atomically
    (:func:`write_text_atomic`) may leave behind when the run is killed."""
    return tuple(pattern for name in names for pattern in (name, f"{name}.*.tmp"))


def run_files(folder: str | os.PathLike, patterns: Iterable[str]) -> list[Path]:
    """The files in ``folder`` matching ``patterns`` (globs), sorted."""
    folder = Path(folder)
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def prepare_output(folder: str | os.PathLike, patterns: Iterable[str], *, resume: bool,
                   overwrite: bool) -> Path:
    """Create ``folder`` for a run whose files match ``patterns``; returns it as a ``Path``.

    A folder holding such files is refused (``FileExistsError``) unless the run is
    resumed; with ``overwrite`` those files (and only those) are deleted first.
    Temporary files (``*.tmp``) left by a killed write do not make a run; they are
    deleted in every case.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resume the run, or start it over")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    found = run_files(folder, patterns)
    kept = [p for p in found if p.suffix != ".tmp"]
    if kept and not (resume or overwrite):
        names = ", ".join(p.name for p in kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
        raise FileExistsError(f"{folder} already holds a run ({names}): continue it with --resume, start over "
                              "with --overwrite (deletes those files), or choose another output folder")
    for path in found:
        if overwrite or path.suffix == ".tmp":
            path.unlink()
    return folder


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (a flushed temporary file, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_records(path: str | os.PathLike, *, upto: int | None = None, key: str = "step") -> list[dict[str, Any]]:
    """The records of the JSON-lines log ``path`` (none when it is missing).

    A last line without its newline that is not valid JSON (a write cut short by
    a kill) is dropped; with ``upto``, so are the records whose ``key`` exceeds it
    (logged after the checkpoint a run resumes from). A bad line elsewhere is an
    error naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}, is not a JSON record ({err}): the log was altered; "
                             "start the run over with --overwrite") from None
        if upto is None or record.get(key, 0) <= upto:
            records.append(record)
    return records


def write_records(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace the JSON-lines log ``path`` by ``records``, atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
