"""The pieces a training run builds from its :class:`~bilevel.problems.imaml.config.Config`:
the network, the problem, the task samplers and the adjoint linear solver.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from bilevel.problems.imaml import models
from bilevel.problems.imaml.config import Config
from bilevel.problems.imaml.problem import IMAMLProblem, balanced_groups, cross_entropy, mse
from bilevel.problems.imaml.sinusoid import SinusoidTasks
from bilevel.problems.imaml.tasks import OmniglotTasks
from bilevel.solvers import SOLVERS

__all__ = ["Experiment", "build", "make_solver", "protocol"]


@dataclass
class Experiment:
    """The pieces of a run: problem, initial parameters, samplers, solver, the problem
    whose inner solve adapts at evaluation (``problem`` itself unless ``eval_lam`` is set),
    how many tasks each ``vmap`` batches (``chunk_size``; ``None``: all), and the forward
    pass that scores evaluation queries (``None``: the network's, all queries in one
    batch; Omniglot's default scores them in class-balanced groups, :func:`balanced_groups`)."""

    problem: IMAMLProblem
    init: models.Params
    train_tasks: Any
    test_tasks: Any
    solver: Any
    classification: bool
    eval_problem: IMAMLProblem
    chunk_size: int | None = None
    query_forward: Callable | None = None


def make_solver(name: str, maxiter: int, damping: float, rtol: float | None = None) -> Any:
    """The adjoint solver ``name`` from :mod:`bilevel.solvers`, capped at ``maxiter`` iterations,
    with ``damping`` added to the operator's diagonal (the solvers' ``ridge``) and relative
    tolerance ``rtol`` (``None``: the solver's default)."""
    cls = SOLVERS[name]
    kwargs: dict[str, Any] = {"ridge": damping} if damping else {}
    if rtol is not None:
        kwargs["rtol"] = rtol
    if "maxiter" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["maxiter"] = maxiter
    return cls(**kwargs)


def protocol(config: Config) -> str:
    """How a resolved ``config`` scores held-out tasks, in words (stored beside every figure)."""
    lam = config.lam if config.eval_lam is None else config.eval_lam
    adapt = f"adapted by {config.inner_steps} {config.inner_optimizer} steps with lam {lam:g}"
    if config.activation != "relu":
        adapt += f", {config.activation} network"
    if config.dataset == "sinusoid":
        return f"{config.shots} support and {config.eval_queries} query points, {adapt}"
    norm = (f"batch norm over class-balanced groups of {config.shots} per class" if config.eval_bn == "balanced"
            else f"batch norm over all {config.ways * config.eval_queries} queries at once")
    split = "random split" if config.split == "random" else "held-out alphabets split"
    rotated = "rotated and unrotated" if config.eval_rotations else "unrotated"
    return (f"{config.ways}-way {config.shots}-shot, {config.eval_queries} queries per class scored with {norm}, "
            f"{adapt}, {rotated} test classes, {split}")


def build(config: Config, omniglot_images: tuple[np.ndarray, np.ndarray] | None = None) -> Experiment:
    """Network, problem, samplers and solver for a resolved ``config``.

    ``omniglot_images``: the (meta-train, meta-test) character arrays; loaded from
    ``config.data_dir`` when not given.
    """
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    if config.dataset == "sinusoid":
        forward, loss, init = models.forward_with(models.mlp_forward, config.activation), mse, models.mlp_init(
            generator=generator)
        train, test = SinusoidTasks(config.shots, config.queries), SinusoidTasks(config.shots, config.eval_queries)
    else:
        if omniglot_images is None:
            from bilevel.problems.imaml.omniglot import load_omniglot

            omniglot_images = load_omniglot(config.data_dir, config.cache_dir).split(scheme=config.split)
        forward, loss = models.forward_with(models.conv4_forward, config.activation), cross_entropy
        init = models.conv4_init(config.ways, config.channels, generator=generator)
        train = OmniglotTasks(omniglot_images[0], config.ways, config.shots, config.queries, rotations=True)
        test = OmniglotTasks(omniglot_images[1], config.ways, config.shots, config.eval_queries,
                             rotations=config.eval_rotations)
    def make_problem(lam: float) -> IMAMLProblem:
        return IMAMLProblem(forward, loss, lam=lam, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                            inner_optimizer=config.inner_optimizer, prox_schedule=config.prox_schedule,
                            inner_tol=config.inner_tol)

    problem = make_problem(config.lam)
    eval_problem = problem if config.eval_lam is None else make_problem(config.eval_lam)
    solver = (make_solver(config.solver, config.cg_steps, config.damping, config.solver_rtol)
              if config.mode == "implicit" else None)
    query_forward = balanced_groups(forward, config.ways, config.shots) if config.eval_bn == "balanced" else None
    return Experiment(problem, init, train, test, solver, config.dataset == "omniglot", eval_problem,
                      config.chunk_size, query_forward)
