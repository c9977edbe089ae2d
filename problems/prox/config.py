"""The settings of a ``bilevel prox`` run: the one source of its defaults (the command's flags read them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DIFFERENTIATIONS", "ProxConfig", "RESUMABLE"]

DIFFERENTIATIONS = {"optimality": "cg", "pg": "gmres", "admm": "gmres", "unrolled": None}
"""How the hypergradient is taken, with its default adjoint solver: (a) ``grad E = 0``, (b) the
proximal-gradient fixed point, (c) the ADMM fixed point, or reverse mode through ``inner_steps`` PG steps."""
RESUMABLE = frozenset({"steps", "checkpoint_every", "log_every", "max_minutes", "device", "data_dir", "threads"})
"""Settings a resumed run may change; every other one must match the run's."""


@dataclass(frozen=True)
class ProxConfig:
    """A run: the images (``dataset``, ``size``, ``n_train``, ``n_test``, ``blur``, ``noise``, ``seed``),
    the regularizer (``filters``, ``learn_filters``, Huber width ``eps``), how it is differentiated
    (``differentiation``, the adjoint ``solver`` with ``solver_rtol`` and ``solver_maxiter``; the forward
    solver ``forward`` to ``tol`` in at most ``inner_steps`` iterations, ADMM's ``penalty``), the grid
    baseline (``grid`` points from ``grid_low`` to ``grid_high``) and Adam (``lr``, ``steps``)."""

    dataset: str = "shapes"
    data_dir: str | None = None
    size: int = 32
    n_train: int = 16
    n_test: int = 64
    blur: float = 1.0
    noise: float = 0.05
    seed: int = 0
    filters: str = "fd"
    learn_filters: bool = False
    eps: float = 0.02
    differentiation: str = "optimality"
    solver: str | None = None
    solver_rtol: float = 1e-6
    solver_maxiter: int = 1000
    forward: str = "admm"
    tol: float = 1e-7
    inner_steps: int = 3000
    penalty: float = 0.1
    on_failure: str = "warn"
    grid: int = 13
    grid_low: float = -9.0
    grid_high: float = -3.0
    lr: float = 0.05
    steps: int = 60
    dtype: str = "float64"
    device: str | None = None
    out_dir: str = "runs/prox"
    checkpoint_every: int = 10
    log_every: int = 1
    max_minutes: float | None = None
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.grid_low >= self.grid_high:
            raise ValueError(f"--grid-low {self.grid_low} must be below --grid-high {self.grid_high}")
        if self.differentiation not in DIFFERENTIATIONS:
            raise ValueError(f"differentiation must be one of {tuple(DIFFERENTIATIONS)}, got {self.differentiation!r}")
