"""Where the real data sets are read from: one rule for every command, the examples and the tests.

The data directory is, in this order:

1. the ``--data-dir`` flag (the ``data_dir`` argument of the loaders);
2. the environment variable ``BILEVEL_DATA_DIR``;
3. the nearest ``shared/data`` folder in the current directory or one of its
   parents (``../shared/data`` beside a checkout, found from the checkout, its
   ``examples/`` or its ``docs/``);
4. ``~/.cache/bilevel/data``.

Each data set lives in a subfolder named after it (``mnist/``, ``omniglot/``,
``pdfm/``, ``adult/``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_DIR_ENV", "SHARED_DATA", "resolve_data_dir"]

DATA_DIR_ENV = "BILEVEL_DATA_DIR"
"""The environment variable naming the data directory when no flag is given."""
SHARED_DATA = Path("shared") / "data"
"""The folder looked for in the current directory and its parents."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None, *, start: str | os.PathLike | None = None) -> Path:
    """The data directory by the module's rule: ``data_dir``, ``$BILEVEL_DATA_DIR``, the nearest
    ``shared/data`` in ``start`` (default: the current directory) or above, ``~/.cache/bilevel/data``.

    The path is returned whether or not it exists; the loaders name a missing file with the fix.
    """
    if data_dir is not None and str(data_dir):
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / SHARED_DATA).is_dir():
            return folder / SHARED_DATA
    return Path.home() / ".cache" / "bilevel" / "data"
