"""Fairness tasks for few-shot meta-learning, and episodes drawn from them.

Every data set becomes a list of :class:`Task` (features ``x``, binary label
``y``, binary sensitive attribute ``z``), one per value of a task attribute:

============== =================================== ====================== ============================
name           file (under the data directory)     task attribute         label ``y`` / attribute ``z``
============== =================================== ====================== ============================
communities    ``pdfm/communities_and_crime.csv``  US state               crime rate above the task's
                                                                          median / PDFM's ``z``
lsac           ``pdfm/lsac.csv``                   PDFM's ``grp``         PDFM's ``y`` above the task's
                                                                          median / PDFM's ``z``
adult          ``adult/adult.data`` + ``.test``    native country         income ``>50K`` / female
bank           ``bank_marketing/bank-additional    month x day of week    subscribed / age ``< 25`` or
               .zip`` (the full csv)               (the call's date)      ``>= 60``
compas         ``compas/compas-scores-two-years    birth year in two-     ``two_year_recid`` /
               .csv``                              year bins (as PDFM)    African-American
============== =================================== ====================== ============================

PDFM (Zhao et al., ICDM 2020) binarize the Communities and Crime target per
task: ``y = 1`` when the raw value is strictly above the task's median; we do
the same, and apply the same rule to LSAC, whose csv holds a raw continuous
score. The Communities column ``x23`` (one missing value) is dropped, as in
PDFM. Communities rows whose crime rate is exactly 0 are dropped as missing:
UCI leaves the violent-crime rate missing where a state's rape counts were
contested, and PDFM's csv holds those as 0 (every row of Illinois and Michigan,
59 of Minnesota's 66); UCI's normalized release omits the same communities.
Left in, they made whole tasks single-class, with labels that carry no signal.
Features are standardized within each task (PDFM's preprocessing); constant
features become zero. Categorical raw columns enter as their
category codes, standardized. Bank's ``duration`` is left out (it is only
known after the call, so it leaks the label).

A task is kept when it has at least ``min_rows`` rows and each sensitive group
has at least ``min_group`` of them, so that a query set can measure a
demographic parity gap.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bilevel.runner.datadir import resolve_data_dir
from bilevel.problems.datafiles import parsing
from bilevel.problems.tables import adult_rows, bank_table, compas_table

__all__ = ["DATASETS", "Task", "data_dir", "load_tasks", "split_tasks", "to_device", "sample_episodes",
           "evaluation_episodes", "synthetic_tasks", "halves"]

DATASETS = ("communities", "lsac", "adult", "bank", "compas")


@dataclass(frozen=True)
class Task:
    """One task: ``x`` (n, d) float, ``y`` (n,) in {0, 1}, ``z`` (n,) in {0, 1}."""

    name: str
    x: Tensor
    y: Tensor
    z: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory (:func:`bilevel.runner.datadir.resolve_data_dir`), checked to exist."""
    path = resolve_data_dir(path)
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} not found; pass --data-dir or set BILEVEL_DATA_DIR "
                                "to the folder that holds pdfm/, adult/, bank_marketing/, compas/")
    return path


def _standardize(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return np.where(std > 0, (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0), 0.0)


def _codes(column: list[str]) -> np.ndarray:
    levels = {v: i for i, v in enumerate(sorted(set(column)))}
    return np.array([levels[v] for v in column], dtype=np.float64)


def _above_median(v: np.ndarray) -> np.ndarray:
    return (v > np.median(v)).astype(np.float64)


def _group(keys: list[str], x: np.ndarray, y: np.ndarray, z: np.ndarray, binarize_per_task: bool,
           min_rows: int, min_group: int) -> list[Task]:
    tasks = []
    for key in sorted(set(keys)):
        idx = np.array([i for i, k in enumerate(keys) if k == key])
        zt, yt = z[idx], y[idx]
        if len(idx) < min_rows or min((zt == 0).sum(), (zt == 1).sum()) < min_group:
            continue
        yt = _above_median(yt) if binarize_per_task else yt
        as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
        tasks.append(Task(key, as_t(_standardize(x[idx])), as_t(yt), as_t(zt)))
    return tasks


def _pdfm(path: Path, drop: tuple[str, ...],
          zero_is_missing: bool = False) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    keep = [j for j, h in enumerate(header) if h.startswith("x") and h not in drop]
    body = [r for r in rows[1:] if not (zero_is_missing and float(r[2]) == 0)]
    x = np.array([[float(r[j]) for j in keep] for r in body])
    return [r[0] for r in body], x, np.array([float(r[2]) for r in body]), np.array([float(r[1]) for r in body])


def _adult(root: Path):
    rows = [r for r in adult_rows(root) if len(r) == 15 and "?" not in r]
    numeric = [0, 2, 4, 10, 11, 12]
    categorical = [1, 3, 5, 6, 7, 8]
    x = np.column_stack([np.array([float(r[j]) for r in rows]) for j in numeric]
                        + [_codes([r[j] for r in rows]) for j in categorical])
    y = np.array([float(r[14].rstrip(".") == ">50K") for r in rows])
    z = np.array([float(r[9] == "Female") for r in rows])
    return [r[13] for r in rows], x, y, z


def _bank(root: Path):
    header, table = bank_table(root)
    rows = [dict(zip(header, r)) for r in table]
    numeric = ["age", "campaign", "pdays", "previous", "emp.var.rate", "cons.price.idx", "cons.conf.idx",
               "euribor3m", "nr.employed"]
    categorical = ["job", "marital", "education", "default", "housing", "loan", "contact", "poutcome"]
    x = np.column_stack([np.array([float(r[c]) for r in rows]) for c in numeric]
                        + [_codes([r[c] for r in rows]) for c in categorical])
    y = np.array([float(r["y"] == "yes") for r in rows])
    age = np.array([float(r["age"]) for r in rows])
    z = ((age < 25) | (age >= 60)).astype(np.float64)
    return [f"{r['month']}-{r['day_of_week']}" for r in rows], x, y, z


def _compas(root: Path):
    header, table = compas_table(root)
    rows = [dict(zip(header, r)) for r in table]
    numeric = ["age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count"]
    categorical = ["sex", "c_charge_degree", "age_cat"]
    x = np.column_stack([np.array([float(r[c]) for r in rows]) for c in numeric]
                        + [_codes([r[c] for r in rows]) for c in categorical])
    y = np.array([float(r["two_year_recid"]) for r in rows])
    z = np.array([float(r["race"] == "African-American") for r in rows])
    keys = [str(1930 + 2 * ((int(r["dob"][:4]) - 1930) // 2)) for r in rows]
    return keys, x, y, z


def load_tasks(dataset: str, root: str | os.PathLike | None = None, *, min_rows: int = 20,
               min_group: int = 2) -> list[Task]:
    """Load ``dataset`` (one of :data:`DATASETS`) as a list of tasks, sorted by name.

    A damaged or unexpected file raises :class:`~bilevel.problems.datafiles.DataFileError` naming it.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    root = data_dir(root)
    files = {"communities": root / "pdfm" / "communities_and_crime.csv", "lsac": root / "pdfm" / "lsac.csv",
             "adult": root / "adult", "bank": root / "bank_marketing" / "bank-additional.zip",
             "compas": root / "compas" / "compas-scores-two-years.csv"}
    with parsing(files[dataset]):
        if dataset == "communities":
            raw, per_task = _pdfm(files[dataset], drop=("x23",), zero_is_missing=True), True
        elif dataset == "lsac":
            raw, per_task = _pdfm(files[dataset], drop=()), True
        elif dataset == "adult":
            raw, per_task = _adult(root), False
        elif dataset == "bank":
            raw, per_task = _bank(root), False
        else:
            raw, per_task = _compas(root), False
    tasks = _group(*raw, binarize_per_task=per_task, min_rows=min_rows, min_group=min_group)
    if len(tasks) < 2:
        raise ValueError(f"{dataset}: only {len(tasks)} task(s) have >= {min_rows} rows and >= {min_group} "
                         "rows per sensitive group; lower min_rows/min_group")
    return tasks


def split_tasks(tasks: list[Task], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """Disjoint meta-train / meta-test task lists (a seeded permutation; at least one task each)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = min(max(1, round(test_fraction * len(tasks))), len(tasks) - 1)
    return [tasks[i] for i in order[n_test:]], [tasks[i] for i in order[:n_test]]


def to_device(tasks: list[Task], device: torch.device | str) -> list[Task]:
    """The tasks with their tensors on ``device``; episodes drawn from them (the draws
    themselves stay on the CPU generator, so they do not depend on the device) live there too."""
    return [Task(t.name, t.x.to(device), t.y.to(device), t.z.to(device)) for t in tasks]


def _pick(task: Task, idx: Tensor, prefix: str) -> dict[str, Tensor]:
    idx = idx.to(task.x.device)
    return {f"x{prefix}": task.x[idx], f"y{prefix}": task.y[idx], f"z{prefix}": task.z[idx]}


def sample_episodes(tasks: list[Task], batch: int, k_shot: int, n_query: int,
                    generator: torch.Generator) -> dict[str, Tensor]:
    """A meta-batch: ``batch`` tasks drawn with replacement, each split into a
    ``k_shot`` support set and a disjoint ``n_query`` query set (drawn without
    replacement). Returns stacked tensors ``xs, ys, zs`` (batch, k_shot[, d]) and
    ``xq, yq, zq`` (batch, n_query[, d]), ready for ``torch.func.vmap``.
    """
    picks = torch.randint(len(tasks), (batch,), generator=generator).tolist()
    episodes = []
    for i in picks:
        task = tasks[i]
        if len(task) < k_shot + n_query:
            raise ValueError(f"task {task.name!r} has {len(task)} rows, fewer than k_shot + n_query = "
                             f"{k_shot + n_query}; lower n_query or load with a larger min_rows")
        perm = torch.randperm(len(task), generator=generator)
        episodes.append({**_pick(task, perm[:k_shot], "s"), **_pick(task, perm[k_shot:k_shot + n_query], "q")})
    return {key: torch.stack([e[key] for e in episodes]) for key in episodes[0]}


def evaluation_episodes(task: Task, episodes: int, k_shot: int, generator: torch.Generator,
                        max_query: int = 400) -> dict[str, Tensor]:
    """``episodes`` splits of one meta-test task: ``k_shot`` support rows, and the other
    rows (at most ``max_query`` of them, drawn at random) as the query set."""
    if len(task) <= k_shot:
        raise ValueError(f"task {task.name!r} has {len(task)} rows; need more than k_shot = {k_shot}")
    end = min(len(task), k_shot + max_query)
    splits = [torch.randperm(len(task), generator=generator) for _ in range(episodes)]
    parts = [{**_pick(task, p[:k_shot], "s"), **_pick(task, p[k_shot:end], "q")} for p in splits]
    return {key: torch.stack([e[key] for e in parts]) for key in parts[0]}


def synthetic_tasks(count: int, n: int = 20, dim: int = 4, seed: int = 0) -> list[Task]:
    """A small biased task family for tests and examples: half the rows have ``z = 1`` and
    features shifted by 1.5 in every coordinate, and ``y ~ Bernoulli(sigmoid(sum x))``,
    so that an unconstrained classifier favours one group."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(count):
        z = torch.arange(n, dtype=torch.float64) % 2
        x = torch.randn(n, dim, generator=g, dtype=torch.float64) + 1.5 * z[:, None]
        y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x.sum(-1))).double()
        tasks.append(Task(f"synthetic{i}", x, y, z))
    return tasks


def halves(task: Task) -> dict[str, Tensor]:
    """One episode of ``task``: its first half as support, the second as query."""
    half = torch.arange(len(task))
    return {**_pick(task, half[: len(task) // 2], "s"), **_pick(task, half[len(task) // 2:], "q")}
