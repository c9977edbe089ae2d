"""The settings of a ``bilevel fair`` comparison: the one source of its defaults (the command's flags
read them), and the per-method :class:`~bilevel.problems.fair.train.Config` of each of its runs."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DATASETS", "FairConfig", "METHODS", "RESUMABLE", "run_config", "runs"]

DATASETS = ("communities", "lsac", "adult", "bank", "compas")
METHODS = ("fair", "imaml", "maml", "pdfm")
RESUMABLE = frozenset({"device", "data_dir", "checkpoint_every", "exact", "threads", "max_minutes"})
"""Settings a resumed comparison may change; every other one must match the comparison's."""


@dataclass(frozen=True)
class FairConfig:
    """A comparison: every method of ``methods`` meta-trained on the ``dataset``'s tasks (the
    constrained ones, ``fair`` and ``pdfm``, once per fairness bound of ``c``), then evaluated on
    the held-out ``test_fraction`` of the tasks, ``episodes`` per task.

    Episodes of ``shots`` support and ``queries`` query rows, ``meta_batch`` of them per step,
    ``steps`` Adam steps of ``meta_lr`` per run. The fair method: ``prox``, ``mu``, ``delta``,
    its ``constraint`` (``dbc`` or ``dp`` with ``sharpness``) on the ``constraint_set``, the
    query violation weighted by ``outer_fair_weight``, ``newton_steps`` of its saddle-point solve
    and the adjoint ``solver`` (``solver_maxiter`` and ``solver_rtol``; ``None``: 50 iterations
    to 1e-8 for MINRES and GMRES, the solver's defaults otherwise). iMAML: ``inner_steps``
    Nesterov iterations. ``exact``: each task computed alone, bitwise the same on any number of
    processes.
    """

    dataset: str = "communities"
    methods: tuple[str, ...] = field(default=METHODS)
    c: tuple[float, ...] = (0.0, 0.05, 0.2)
    constraint: str = "dbc"
    sharpness: float = 1.0
    shots: int = 10
    queries: int = 10
    meta_batch: int = 8
    steps: int = 100
    meta_lr: float = 0.01
    prox: float = 1.0
    mu: float = 1.0
    delta: float = 0.01
    constraint_set: str = "support"
    outer_fair_weight: float = 1.0
    inner_steps: int = 150
    newton_steps: int = 30
    solver: str = "minres"
    solver_maxiter: int | None = None
    solver_rtol: float | None = None
    checkpoint_every: int = 50
    log_every: int = 10
    episodes: int = 20
    test_fraction: float = 0.3
    seed: int = 0
    device: str | None = None
    data_dir: str | None = None
    out_dir: str = "runs/fair"
    exact: bool = False
    max_minutes: float | None = None
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "c", tuple(self.c))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")


def runs(config: FairConfig) -> list[tuple[str, float | None]]:
    """The comparison's runs in order: ``(method, c)``, ``c`` ``None`` for the unconstrained methods."""
    return [(method, c) for method in config.methods for c in (config.c if method in ("fair", "pdfm") else [None])]


def run_config(config: FairConfig, method: str, c: float | None) -> "Config":  # noqa: F821
    """The per-method :class:`~bilevel.problems.fair.train.Config` of one run of the comparison."""
    from bilevel.problems.fair.train import Config

    return Config(method=method, c=c if c is not None else 0.0, k_shot=config.shots, n_query=config.queries,
                  meta_batch=config.meta_batch, steps=config.steps, meta_lr=config.meta_lr, prox=config.prox,
                  mu=config.mu, delta=config.delta, constraint_set=config.constraint_set,
                  constraint=config.constraint, sharpness=config.sharpness,
                  outer_fair_weight=config.outer_fair_weight, inner_steps=config.inner_steps,
                  newton_steps=config.newton_steps, solver=config.solver, solver_maxiter=config.solver_maxiter,
                  solver_rtol=config.solver_rtol, seed=config.seed, log_every=config.log_every,
                  checkpoint_every=config.checkpoint_every)

