"""The settings of a ``bilevel hyperopt`` run: the one source of its defaults (the command's flags read them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATASETS", "HyperoptConfig", "MNIST_SIZES", "RESUMABLE", "TASKS"]

TASKS = ("l2", "cleaning")
DATASETS = ("mnist", "adult", "bank", "compas", "german", "digits", "breast_cancer", "wine", "iris")
MNIST_SIZES = {"n_train": 20_000, "n_val": 5_000, "n_test": 10_000}
"""The split sizes on MNIST when none are given (the other data sets split all their rows)."""
RESUMABLE = frozenset({"steps", "max_minutes", "checkpoint_every", "log_every", "threads", "plot", "data_dir",
                       "download", "device"})
"""Settings a resumed run may change; every other one must match the run's."""


@dataclass(frozen=True)
class HyperoptConfig:
    """A tuning run by HOAG (:class:`~bilevel.problems.hyperparameter.outer.HOAG`).

    ``task``: ``"l2"`` (per-feature L2 penalties on ``dataset``, starting from ``init_penalty``)
    or ``"cleaning"`` (hyper-cleaning of MNIST with a fraction ``corrupt`` of random training
    labels, inner L2 strength ``reg``). The split sizes ``n_train``, ``n_val``, ``n_test``
    (``None``: every row, or :data:`MNIST_SIZES` on MNIST). The outer loop: ``steps``, the
    tolerance schedule ``max(tol_min, tol0 * tol_decay^k)`` of the inner and adjoint solves,
    ``first_move``, ``grow``, the held-out ``select_fraction``; the inner solve at most
    ``inner_steps`` iterations; the adjoint ``solver`` at most ``solver_maxiter`` iterations,
    to the schedule's tolerance and ``solver_rtol`` (0: the schedule alone).
    """

    task: str = "l2"
    dataset: str = "mnist"
    init_penalty: float = 1e-3
    corrupt: float = 0.5
    reg: float = 1e-3
    data_dir: str | None = None
    download: bool = False
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    seed: int = 0
    dtype: str = "float64"
    steps: int = 100
    tol0: float = 1e-3
    tol_decay: float = 0.9
    tol_min: float = 1e-8
    first_move: float = 1.0
    grow: float = 1.5
    select_fraction: float = 0.0
    inner_steps: int = 2000
    solver: str = "cg"
    solver_maxiter: int = 1000
    solver_rtol: float = 0.0
    on_failure: str = "warn"
    out_dir: str | None = None
    checkpoint_every: int = 10
    log_every: int = 1
    max_minutes: float | None = None
    threads: int | None = None
    device: str | None = None
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "cleaning" and self.dataset != "mnist":
            raise ValueError(f"hyper-cleaning runs on MNIST, got dataset {self.dataset!r}")
        if self.out_dir is None:
            object.__setattr__(self, "out_dir", f"runs/hyperopt-{self.task}")
        if self.dataset == "mnist":
            for name, size in MNIST_SIZES.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, size)
