"""Checkpoint files that survive a kill at any moment and say so when they are damaged.

A checkpoint is one file: the header line ``BILEVEL-CHECKPOINT 1``, the SHA-256
of the body (64 hex digits and a newline), then the body, the payload as
:func:`torch.save` writes it. :func:`load` checks the header and the digest
before it unpickles anything, and unpickles with ``weights_only=True``, so a
payload holds tensors and plain Python values only (dicts, lists, tuples, str,
int, float, bool, None).

:func:`save` writes a temporary file in the same folder, flushes it to disk
(``fsync``) and moves it into place with ``os.replace``: a process killed at
any point leaves either the old checkpoint or the new one, never a mix. Before
the new file replaces the old one, the old one, if intact, is kept beside it as
``<name>.prev<suffix>`` (``checkpoint.prev.pt``), so a checkpoint damaged later
on disk still leaves a good one to go back to.

A damaged file (empty, truncated, altered, or not a checkpoint at all) raises
:class:`~bilevel.errors.CheckpointError`, whose message names the file, what
is wrong and the way out: resume from the kept previous checkpoint with
``--resume previous`` (``resume="previous"`` in the training functions) when
that one is intact, else start over with ``--overwrite``. Resuming never
falls back to the previous checkpoint on its own: going back loses the steps
after it, and a damaged file may mean a failing disk, so the user decides.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bilevel.errors import CheckpointError

__all__ = ["MAGIC", "RESUME_CHOICES", "save", "load", "load_for_resume", "previous_path", "file_patterns"]

MAGIC = b"BILEVEL-CHECKPOINT 1\n"
_DIGEST_LEN = 64
RESUME_CHOICES = ("latest", "previous")
"""What ``--resume`` continues from: the latest checkpoint, or the previous one kept beside it."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where the previous checkpoint of ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def file_patterns(name: str) -> tuple[str, ...]:
    """Glob patterns of every file that saving checkpoint ``name`` may leave in its folder."""
    prev = previous_path(name).name
    return name, prev, f"{name}.*.tmp", f"{prev}.*.tmp"


def _read_body(path: Path) -> bytes:
    """The verified body of checkpoint ``path``; raises :class:`CheckpointError` naming the damage."""
    data = path.read_bytes()
    header = len(MAGIC) + _DIGEST_LEN + 1
    if not data:
        problem = "is empty (0 bytes)"
    elif not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            problem = f"is truncated ({len(data)} bytes, inside its header)"
        elif data.startswith(b"PK"):
            problem = ("has no digest header: it was written by torch.save directly, or by a bilevel from "
                       "before checkpoints carried a digest")
        else:
            problem = "is not a bilevel checkpoint (it does not start with the checkpoint header)"
    elif len(data) < header:
        problem = f"is truncated ({len(data)} bytes, inside its header)"
    else:
        recorded = data[len(MAGIC):header - 1].decode("ascii", "replace")
        body = data[header:]
        actual = hashlib.sha256(body).hexdigest()
        if actual == recorded:
            return body
        problem = (f"is damaged: the SHA-256 of its {len(body)}-byte body is {actual[:12]}..., its header "
                   f"records {recorded[:12]}... (the file was truncated or altered after it was written)")
    raise CheckpointError(f"checkpoint {path} {problem}")


def _intact(path: Path) -> bool:
    try:
        _read_body(path)
    except (CheckpointError, OSError):
        return False
    return True


def _keep_previous(path: Path) -> None:
    """Keep the intact checkpoint at ``path`` as its previous one (a damaged one is not kept)."""
    prev = previous_path(path)
    if not path.is_file() or (prev.is_file() and os.path.samefile(path, prev)) or not _intact(path):
        return  # nothing to keep, already kept (a save killed before its rename), or damaged
    staged = prev.with_name(f"{prev.name}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)  # no copy: the old file's bytes stay where they are
    except OSError:
        shutil.copyfile(path, staged)
    os.replace(staged, prev)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(payload: Any, path: str | os.PathLike) -> None:
    """Write ``payload`` to checkpoint ``path`` atomically, with its digest, keeping the previous one.

    ``payload`` must hold tensors and plain Python values only (it is loaded with
    ``weights_only=True``). Leftover temporary files of earlier, killed saves of
    the same checkpoint are removed.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    for pattern in file_patterns(path.name)[2:]:
        for stale in path.parent.glob(pattern):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n")
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        _keep_previous(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_folder(path.parent)


def load(path: str | os.PathLike, *, map_location: Any = None) -> Any:
    """The payload of checkpoint ``path``, verified against its digest and read with ``weights_only=True``.

    Raises ``FileNotFoundError`` when there is no such file and
    :class:`~bilevel.errors.CheckpointError` when it is damaged; the message says
    whether the previous checkpoint kept beside it is intact and how to use it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        body = _read_body(path)
        try:
            return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
        except Exception as err:  # the digest matched, so the writer stored something weights_only refuses
            raise CheckpointError(f"checkpoint {path} is intact but cannot be read ({err})") from err
    except CheckpointError as err:
        raise CheckpointError(f"{err}. {_way_out(path)}") from None


def _way_out(path: Path) -> str:
    if path.stem.endswith(".prev"):  # this is the kept previous checkpoint
        return ("There is no older one to go back to: continue from the latest checkpoint with --resume if "
                "it is intact, or start over with --overwrite")
    prev = previous_path(path)
    if prev.is_file() and _intact(prev):
        return (f"The previous checkpoint {prev} is intact: continue from it with --resume previous, "
                f"or start over with --overwrite")
    kept = "is damaged too" if prev.is_file() else "was never written"
    return f"No previous checkpoint to go back to ({prev} {kept}): start over with --overwrite"


def load_for_resume(path: str | os.PathLike, resume: bool | str = True, *, map_location: Any = None) -> Any:
    """The payload to resume from: checkpoint ``path``, or with ``resume="previous"`` the one kept beside it.

    ``resume`` is ``True`` or ``"latest"`` for the latest checkpoint. A missing
    checkpoint raises ``FileNotFoundError`` saying to start without ``--resume``.
    """
    if resume not in (True, *RESUME_CHOICES):
        raise ValueError(f"resume must be True or one of {RESUME_CHOICES}, got {resume!r}")
    path = Path(path)
    target = previous_path(path) if resume == "previous" else path
    if not target.is_file():
        if resume == "previous":
            raise FileNotFoundError(f"no previous checkpoint at {target} (it is kept once a second checkpoint "
                                    f"is written): continue from {path.name} with --resume, or start over "
                                    "with --overwrite")
        raise FileNotFoundError(f"no checkpoint at {target} to resume from: run once without --resume first")
    return load(target, map_location=map_location)
