"""A run's output folder and its files, safe to stop, restart and repeat.

- :func:`prepare_output`: an output folder that holds a run is refused unless the run is resumed
  or explicitly overwritten; overwriting deletes only the files the command writes.
- :func:`read_records` / :func:`write_records`: JSON-lines logs that tolerate a last line cut
  short by a kill and are rewritten atomically; :func:`write_text_atomic` for any text file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["prepare_output", "output_patterns", "run_files", "read_records", "write_records", "write_text_atomic"]


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
