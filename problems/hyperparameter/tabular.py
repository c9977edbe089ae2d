"""Tabular classification sets for the per-feature L2 problem.

From the data directory (see :func:`~bilevel.problems.hyperparameter.mnist.data_root`):

- ``adult``: UCI Adult, ``adult/adult.data`` + ``adult/adult.test`` (48,842 rows;
  label ``>50K``), rows with missing values kept (``?`` is its own category);
- ``bank``: UCI Bank Marketing (Moro et al. 2014), ``bank-additional-full.csv``
  read inside ``bank_marketing/bank-additional.zip`` (41,188 rows; label
  ``y = yes``); ``duration`` is dropped because it is only known after the call
  that decides the label;
- ``compas``: ProPublica's ``compas/compas-scores-two-years.csv`` with their
  filter (screening within 30 days of arrest, ``is_recid != -1``, charge degree
  not ``O``, a score text): 6,172 rows; label ``two_year_recid``;
- ``german``: UCI Statlog German Credit, ``german/german.data`` (1,000 rows;
  label: good credit).

and, only when scikit-learn is installed (it is not a dependency of bilevel),
its bundled ``digits``, ``breast_cancer``, ``wine`` and ``iris``.
Categorical columns are one-hot encoded; numeric ones are kept as numbers
(standardize them with :func:`~bilevel.problems.hyperparameter.splits.split`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from bilevel.problems.datafiles import parsing
from bilevel.problems.tables import ADULT_COLUMNS, adult_rows, bank_table, compas_table, require

from .mnist import data_root

__all__ = ["Tabular", "TABULAR_SETS", "SKLEARN_SETS", "load_tabular"]


class Tabular(NamedTuple):
    """A classification table: float64 features ``x (n, d)``, int64 labels ``y (n,)``."""

    x: Tensor
    y: Tensor
    feature_names: tuple[str, ...]
    name: str

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1


def _encode(rows: list[list[str]], header: list[str], numeric: Iterable[str], categorical: Iterable[str],
            label: Callable[[list[str]], int], name: str) -> Tabular:
    index = {}
    for i, col in enumerate(header):
        index.setdefault(col, i)  # first occurrence of a repeated column name
    columns, names = [], []
    for col in numeric:
        columns.append(np.array([float(r[index[col]]) for r in rows])[:, None])
        names.append(col)
    for col in categorical:
        values = [r[index[col]] for r in rows]
        levels = sorted(set(values))
        lookup = {v: k for k, v in enumerate(levels)}
        codes = np.array([lookup[v] for v in values])
        columns.append(np.eye(len(levels))[codes])
        names.extend(f"{col}={level}" for level in levels)
    x = np.concatenate(columns, axis=1)
    y = np.array([label(r) for r in rows], dtype=np.int64)
    return Tabular(torch.from_numpy(x), torch.from_numpy(y), tuple(names), name)


def _adult(root: Path) -> Tabular:
    numeric = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
    categorical = [c for c in ADULT_COLUMNS[:-1] if c not in numeric and c != "education"]
    return _encode(adult_rows(root), ADULT_COLUMNS, numeric, categorical,
                   lambda r: int(r[-1].rstrip(".") == ">50K"), "adult")


def _bank(root: Path) -> Tabular:
    header, rows = bank_table(root)
    numeric = ["age", "campaign", "pdays", "previous", "emp.var.rate", "cons.price.idx", "cons.conf.idx",
               "euribor3m", "nr.employed"]
    categorical = ["job", "marital", "education", "default", "housing", "loan", "contact", "month",
                   "day_of_week", "poutcome"]
    return _encode(rows, header, numeric, categorical, lambda r: int(r[-1] == "yes"), "bank")


def _compas(root: Path) -> Tabular:
    header, rows = compas_table(root)
    col = {c: header.index(c) for c in ("days_b_screening_arrest", "is_recid", "c_charge_degree",
                                         "score_text", "two_year_recid")}
    rows = [r for r in rows if r[col["days_b_screening_arrest"]] != ""
            and abs(float(r[col["days_b_screening_arrest"]])) <= 30 and r[col["is_recid"]] != "-1"
            and r[col["c_charge_degree"]] != "O" and r[col["score_text"]] != "N/A"]
    numeric = ["age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count"]
    categorical = ["sex", "age_cat", "race", "c_charge_degree"]
    return _encode(rows, header, numeric, categorical, lambda r: int(r[col["two_year_recid"]]), "compas")


def _german(root: Path) -> Tabular:
    with open(require(root / "german" / "german.data", "german")) as fh:
        rows = [line.split() for line in fh if line.strip()]
    header = [f"A{i}" for i in range(1, 21)] + ["class"]
    numeric = ["A2", "A5", "A8", "A11", "A13", "A16", "A18"]
    categorical = [c for c in header[:-1] if c not in numeric]
    return _encode(rows, header, numeric, categorical, lambda r: int(r[-1] == "1"), "german")


TABULAR_SETS: dict[str, Callable[[Path], Tabular]] = {
    "adult": _adult, "bank": _bank, "compas": _compas, "german": _german}
SKLEARN_SETS = ("digits", "breast_cancer", "wine", "iris")
_FOLDERS = {"adult": "adult", "bank": "bank_marketing/bank-additional.zip",
            "compas": "compas/compas-scores-two-years.csv", "german": "german/german.data"}


def _sklearn(name: str) -> Tabular:
    try:
        from sklearn import datasets
    except ImportError as err:
        raise ImportError(f"data set {name!r} is bundled with scikit-learn, which is not installed: "
                          "pip install scikit-learn (or bilevel[bench]), or pick one of "
                          f"{sorted(TABULAR_SETS)}") from err
    bunch = getattr(datasets, f"load_{name}")()
    x = torch.as_tensor(np.asarray(bunch.data, dtype=np.float64))
    names = tuple(str(n) for n in getattr(bunch, "feature_names", range(x.shape[1])))
    return Tabular(x, torch.as_tensor(np.asarray(bunch.target, dtype=np.int64)), names, name)


def load_tabular(name: str, data_dir: str | os.PathLike | None = None) -> Tabular:
    """Load one of :data:`TABULAR_SETS` (from the data directory) or :data:`SKLEARN_SETS`."""
    if name in TABULAR_SETS:
        root = data_root(data_dir)
        with parsing(root / _FOLDERS[name]):
            return TABULAR_SETS[name](root)
    if name in SKLEARN_SETS:
        return _sklearn(name)
    raise ValueError(f"unknown tabular data set {name!r}; choose one of "
                     f"{sorted(TABULAR_SETS) + list(SKLEARN_SETS)}")
