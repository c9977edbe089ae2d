"""Reading data files so that a damaged one is named, with the fix, instead of a raw
``zlib.error``, ``BadZipFile`` or ``could not convert string to float`` traceback.

A flipped byte in a zip or gzip file surfaces, depending on where it falls, as
any of :data:`ARCHIVE_ERRORS` (a bad CRC or header, a broken deflate stream, a
length that runs past the end, a "compression method" or "encrypted" flag that
was not set by the writer); in a csv file, as a value that does not parse or a
row of the wrong length (:func:`parsing`).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["ARCHIVE_ERRORS", "DataFileError", "read_zip_member", "parsing"]

ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError)
"""What reading a damaged zip or gzip file raises."""


class DataFileError(OSError):
    """A data file that is damaged or not the expected one; the message names it and the fix."""


def read_zip_member(path: str | os.PathLike, member: str) -> bytes:
    """The bytes of ``member`` in the zip archive ``path``.

    Raises :class:`DataFileError` naming the file when the archive is damaged or
    lacks ``member``.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)
    except FileNotFoundError:
        raise
    except KeyError:
        problem = f"does not hold {member}: it is not the expected archive"
    except ARCHIVE_ERRORS as err:
        problem = f"is damaged ({type(err).__name__}: {err})"
    raise DataFileError(f"{path} {problem}; delete it and copy or download it again")


@contextmanager
def parsing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a parse error (a bad value, a short row, a missing column) raised while reading ``path``
    into a :class:`DataFileError` naming it."""
    try:
        yield
    except (ValueError, IndexError, KeyError) as err:
        raise DataFileError(f"{path} could not be parsed ({type(err).__name__}: {err}): it is damaged or not "
                            "the expected file; copy or download it again") from err
