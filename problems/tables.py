"""The rows of the real tabular data sets that more than one instance reads: UCI Adult, UCI Bank
Marketing and ProPublica's COMPAS, read from the data directory in one place.

Each instance chooses its columns, filters and encoding from these rows
(:mod:`bilevel.problems.hyperparameter.tabular` one-hot encodes them for the
per-feature L2 problem, :mod:`bilevel.problems.fair.data` groups them into
fairness tasks). A missing file is named with the fix; a damaged zip is named by
:func:`~bilevel.problems.datafiles.read_zip_member`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from bilevel.problems.datafiles import read_zip_member

__all__ = ["ADULT_COLUMNS", "adult_rows", "bank_table", "compas_table", "require"]

ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week",
                 "native-country", "income"]
"""The columns of ``adult.data`` and ``adult.test`` (the files have no header)."""


def require(path: Path, name: str) -> Path:
    """``path``, or ``FileNotFoundError`` naming it and the ``--data-dir`` fix for data set ``name``."""
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} not found; pass the folder that holds {path.parent.name}/ with "
                                "--data-dir (or set BILEVEL_DATA_DIR)")
    return path


def adult_rows(root: Path) -> list[list[str]]:
    """The rows of ``adult/adult.data`` then ``adult/adult.test`` (its first line, a note, skipped): the
    comma-separated fields of every non-blank line, stripped. Rows with missing values (``?``) and
    ragged rows are kept: the reader decides."""
    rows = []
    for file, skip in (("adult.data", 0), ("adult.test", 1)):
        with open(require(root / "adult" / file, "adult"), newline="") as fh:
            lines = fh.read().splitlines()[skip:]
        rows += [[field.strip() for field in line.split(",")] for line in lines if line.strip()]
    return rows


def bank_table(root: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of ``bank-additional-full.csv`` inside ``bank_marketing/bank-additional.zip``."""
    text = read_zip_member(require(root / "bank_marketing" / "bank-additional.zip", "bank"),
                           "bank-additional/bank-additional-full.csv").decode()
    header, *rows = list(csv.reader(io.StringIO(text), delimiter=";"))
    return header, rows


def compas_table(root: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of ``compas/compas-scores-two-years.csv``."""
    with open(require(root / "compas" / "compas-scores-two-years.csv", "compas"), newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return header, rows
