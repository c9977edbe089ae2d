"""Meta-training and meta-testing of every method in one harness.

One meta-step: a meta-batch of episodes, ``torch.func.vmap`` of
:func:`bilevel.hypergradient` over the tasks (the outer parameters shared),
:func:`bilevel.check_result` on the batched diagnostics, the mean
hypergradient, one Adam step. PDFM's ``lambda0`` instead takes its projected
meta dual step. For the fair method, the curvature of every task's saddle point
(:meth:`~bilevel.problems.fair.problem.FairMetaProblem.curvature`) is checked at
each step: tasks whose system is indefinite are counted, logged and warned about
(:class:`~bilevel.problems.fair.problem.IndefiniteWarning`), never hidden.
:class:`FairTrainer` holds one method's training; the run loop
(:mod:`bilevel.runner.loop`) logs, checkpoints and resumes it exactly (the
parameters, Adam's state and the episode sampler's state are restored), alone
(:func:`train`) or as a run of a comparison (:mod:`.comparison`).

Under ``torchrun`` (:mod:`bilevel.distributed`) every rank draws the whole
meta-batch from the same generator and computes its contiguous shard of the
tasks; the per-task meta-gradients are summed locally and averaged by one
all-reduce over the global meta-batch, and the per-task values that the log,
the curvature check and PDFM's meta dual step need are gathered in global task
order. The optimizer is replicated (the replicas are compared at every
checkpoint), rank 0 alone writes, and evaluation shards each task's episodes.
Checkpoints do not depend on the number of processes, so a run resumes on
another. ``exact=True`` computes each task alone and averages the per-task
meta-gradients in task order: bitwise the same run on any number of processes.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import bilevel
from bilevel import BilevelProblem
from bilevel.runner import distributed
from bilevel.runner import Command, Run
from bilevel.runner import run as run_loop
from bilevel.solvers import CG, GMRES, MINRES, Direct

from .baselines import (GradientStepProblem, PDFMProblem, ProxLogisticProblem, dbc_bound, pdfm_dual_step,
                        probability_dbc)
from .config import FairConfig
from .data import Task, sample_episodes, evaluation_episodes
from .metrics import METRICS, accuracy, mean_ci, task_metrics
from .model import init_params, score
from .problem import FairMetaProblem, IndefiniteWarning

__all__ = ["METHODS", "Config", "FairRun", "FairTrainer", "Method", "build_method", "initial_outer", "make_solver",
           "train", "evaluate"]

METHODS = ("fair", "imaml", "maml", "pdfm")
SOLVERS = {"minres": MINRES, "gmres": GMRES, "direct": Direct, "cg": CG}
"""The fair method's adjoint solvers; MINRES and GMRES default to 50 iterations to ``rtol = 1e-8``."""


def make_solver(cfg: "Config") -> Any:
    """The fair method's adjoint solver ``cfg.solver`` with ``cfg.solver_maxiter`` and ``cfg.solver_rtol``."""
    if cfg.solver not in SOLVERS:
        raise ValueError(f"unknown solver {cfg.solver!r}; choose one of {sorted(SOLVERS)}")
    cls = SOLVERS[cfg.solver]
    options = {"rtol": 1e-8, "maxiter": 50} if cfg.solver in ("minres", "gmres") else {}
    if cfg.solver_rtol is not None:
        options["rtol"] = cfg.solver_rtol
    if cfg.solver_maxiter is not None and cfg.solver != "direct":
        options["maxiter"] = cfg.solver_maxiter
    return cls(**options)


_COMMAND = FairConfig()
"""The command's settings: the defaults of the settings a run shares with it."""


@dataclass
class Config:
    """Everything one method's run depends on (saved in its checkpoint); the settings it shares with
    the command take the command's defaults (:class:`~bilevel.problems.fair.config.FairConfig`)."""

    method: str = "fair"
    c: float = 0.1
    k_shot: int = _COMMAND.shots
    n_query: int = _COMMAND.queries
    meta_batch: int = _COMMAND.meta_batch
    steps: int = _COMMAND.steps
    meta_lr: float = _COMMAND.meta_lr
    prox: float = _COMMAND.prox
    mu: float = _COMMAND.mu
    delta: float = _COMMAND.delta
    barrier: float = 1e-3
    outer_fair_weight: float = _COMMAND.outer_fair_weight
    constraint_set: str = _COMMAND.constraint_set
    constraint: str = _COMMAND.constraint
    sharpness: float = _COMMAND.sharpness
    inner_steps: int = _COMMAND.inner_steps
    newton_steps: int = _COMMAND.newton_steps
    solver: str = _COMMAND.solver
    solver_maxiter: int | None = _COMMAND.solver_maxiter
    solver_rtol: float | None = _COMMAND.solver_rtol
    maml_lr: float = 0.1
    maml_steps: int = 5
    pdfm_dual_lr: float = 0.5
    pdfm_meta_dual_lr: float = 0.01
    pdfm_updates: int = 10
    lambda0: float = 1.0
    seed: int = _COMMAND.seed
    log_every: int = _COMMAND.log_every
    checkpoint_every: int = _COMMAND.checkpoint_every


@dataclass(frozen=True)
class Method:
    """A problem with the hypergradient mode and solver that train it."""

    problem: BilevelProblem
    mode: str
    solver: Any

    def adapt(self, outer: dict, data: dict) -> dict:
        """The inner solution from ``outer`` on the support set (no graph): the task model, or for the
        fair method ``{"model", "rho"}``."""
        with torch.no_grad():
            return self.problem.solve_inner(outer, data, self.problem.initial_inner(outer, data))


def build_method(cfg: Config) -> Method:
    if cfg.method == "fair":
        problem = FairMetaProblem(cfg.c, prox=cfg.prox, mu=cfg.mu, delta=cfg.delta, barrier=cfg.barrier,
                                  outer_fair_weight=cfg.outer_fair_weight, constraint_set=cfg.constraint_set,
                                  constraint=cfg.constraint, sharpness=cfg.sharpness, inner_steps=cfg.newton_steps)
        return Method(problem, "implicit", make_solver(cfg))
    if cfg.method == "imaml":
        return Method(ProxLogisticProblem(cfg.prox, inner_steps=cfg.inner_steps), "implicit", CG(rtol=1e-8, maxiter=50))
    if cfg.method == "maml":
        return Method(GradientStepProblem(cfg.maml_lr, cfg.maml_steps), "unrolled", None)
    if cfg.method == "pdfm":
        return Method(PDFMProblem(cfg.c, inner_lr=cfg.maml_lr, dual_lr=cfg.pdfm_dual_lr,
                                  pd_updates=cfg.pdfm_updates, constraint_set=cfg.constraint_set),
                      "first_order", None)
    raise ValueError(f"unknown method {cfg.method!r}; choose one of {METHODS}")


def initial_outer(dim: int, cfg: Config, device: torch.device | str | None = None) -> dict:
    return {"theta": init_params(dim, device=device),
            "lambda0": torch.tensor(cfg.lambda0, dtype=torch.float64, device=device)}


def _leaves(outer: dict) -> list[torch.Tensor]:
    return [outer["theta"]["w"], outer["theta"]["b"], outer["lambda0"]]


def curvatures(method: Method, outer: dict, data: dict, inner: dict,
               chunk_size: int | None = None) -> torch.Tensor | None:
    """For the fair method: :meth:`FairMetaProblem.curvature` of every (vmapped) task in ``data``
    at ``inner``, where ``<= 0`` marks an indefinite saddle-point system; ``None`` for the others."""
    if not isinstance(method.problem, FairMetaProblem):
        return None
    return torch.func.vmap(lambda i, d: method.problem.curvature(i, outer, d), chunk_size=chunk_size)(inner, data)


def meta_step(method: Method, outer: dict, batch: dict, chunk_size: int | None = None) -> bilevel.HypergradientResult:
    """Hypergradients of every task in ``batch``, vmapped (``chunk_size`` tasks at a time, ``None``:
    all); the failure policy applied once, after, to the whole batch."""
    kwargs = {"solver": method.solver} if method.mode == "implicit" else {}

    def one(data: dict) -> bilevel.HypergradientResult:
        return bilevel.hypergradient(method.problem, outer, data, mode=method.mode, on_failure="ignore", **kwargs)

    result = torch.func.vmap(one, chunk_size=chunk_size)(batch)
    return bilevel.check_result(result, on_failure="warn", residual_tol=method.problem.residual_tol)


def _per_task(cfg: Config, method: Method, outer: dict, data: dict, result: bilevel.HypergradientResult,
              logging: bool, chunk_size: int | None) -> dict[str, torch.Tensor]:
    """The per-task values a step needs beyond the meta-gradient: the curvature (fair method),
    the query DBC of PDFM's meta dual step and, at a log step, the logged diagnostics."""
    values = {}
    curvature = curvatures(method, outer, data, result.inner, chunk_size)
    if curvature is not None:
        values["curvature"] = curvature
    if cfg.method == "pdfm":
        values["dbc"] = torch.func.vmap(probability_dbc, chunk_size=chunk_size)(result.inner, data["xq"], data["zq"])
    if logging:
        values.update(outer_loss=result.outer_loss, inner_residual=result.inner_residual)
        if result.solve is not None:
            values.update(iterations=result.solve.iterations, converged=result.solve.converged)
    return values


def _trained_gradients(cfg: Config, grad: dict) -> list[torch.Tensor]:
    """The per-task gradients of the leaves Adam trains (PDFM's ``lambda0`` takes its dual step instead)."""
    per_task = [grad["theta"]["w"], grad["theta"]["b"]]
    if cfg.method == "fair":
        per_task.append(grad["lambda0"])
    return per_task


def _detached(tree: Any) -> Any:
    return bilevel.pytree.tree_map(torch.Tensor.detach, tree)


class FairTrainer:
    """One method's meta-training: its outer parameters, Adam, the episode sampler, and the step.

    Under ``torchrun`` (``ctx``) each rank computes its shard of every meta-batch; the run is
    the one-process run's to round-off, and bitwise with ``exact`` (each task computed alone,
    the per-task meta-gradients averaged in global task order), whatever the number of processes.
    """

    def __init__(self, cfg: Config, tasks: list[Task], ctx: distributed.Context, *, exact: bool = False,
                 tag: str | None = None) -> None:
        if cfg.meta_batch < ctx.world_size:
            raise ValueError(f"--meta-batch {cfg.meta_batch} is smaller than the {ctx.world_size} processes: "
                             "every process needs a task; raise --meta-batch or start fewer processes")
        self.cfg, self.tasks, self.ctx, self.exact = cfg, tasks, ctx, exact
        self.tag = tag or f"{cfg.method}_c{cfg.c:g}"
        self.method = build_method(cfg)
        self.leaves = _leaves(initial_outer(tasks[0].x.shape[1], cfg, tasks[0].x.device))
        for t in self.leaves:
            t.requires_grad_(True)
        self.trained = self.leaves if cfg.method != "pdfm" else self.leaves[:2]
        self.optimizer = torch.optim.Adam(self.trained, lr=cfg.meta_lr)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.indefinite = 0

    def step(self, step: int) -> dict | None:
        """Meta-step ``step`` (from 0); the log record when it is a log step (``None`` otherwise)."""
        cfg, ctx, leaves = self.cfg, self.ctx, self.leaves
        chunk = 1 if self.exact else None  # exact: one task per vmap call, whatever the tasks beside it
        batch = sample_episodes(self.tasks, cfg.meta_batch, cfg.k_shot, cfg.n_query, self.generator)
        mine = ctx.take(batch, cfg.meta_batch)
        params = {"theta": {"w": leaves[0], "b": leaves[1]}, "lambda0": leaves[2]}
        detached = {k: _detached(v) for k, v in params.items()}
        if cfg.method in ("imaml", "maml"):  # they ignore lambda0; it is not passed, and its gradient is 0
            detached = {"theta": detached["theta"]}
        result = meta_step(self.method, detached, mine, chunk)
        logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        per_task = _per_task(cfg, self.method, detached, mine, result, logging, chunk)
        shared = ctx.gather(per_task, cfg.meta_batch) if per_task else {}
        grads = _trained_gradients(cfg, result.grad)
        if self.exact:
            grads = ctx.ordered_mean(grads, cfg.meta_batch)
        else:  # one all-reduce of the per-rank sums, divided by the whole meta-batch
            grads = ctx.mean_of_sums([g.sum(0) for g in grads], cfg.meta_batch)
        if len(grads) < len(self.trained):
            grads.append(torch.zeros_like(leaves[2]))
        if "curvature" in shared and (bad := int((shared["curvature"] <= 0).sum())):
            self.indefinite += bad
            if ctx.is_main:
                warnings.warn(f"{self.tag}, step {step + 1}: {bad} of {cfg.meta_batch} tasks have an indefinite "
                              f"saddle-point system (smallest curvature {float(shared['curvature'].min()):.3g}); "
                              "their meta-gradients are those of a stationary point that is not a local "
                              "minimizer in w: raise --prox", IndefiniteWarning)
        self.optimizer.zero_grad()
        for t, g in zip(self.trained, grads):
            t.grad = g
        self.optimizer.step()
        if cfg.method == "pdfm":
            with torch.no_grad():
                bound = dbc_bound(cfg.c, batch["zq"])
                leaves[2].copy_(pdfm_dual_step(leaves[2], shared["dbc"], bound, cfg.pdfm_meta_dual_lr))
        if not logging:
            return None
        record = {"run": self.tag, "run_step": step + 1, "method": cfg.method, "c": cfg.c,
                  "outer_loss": float(shared["outer_loss"].mean()),
                  "inner_residual": float(shared["inner_residual"].max()),
                  "lambda0": float(leaves[2].detach()), "indefinite_total": self.indefinite}
        if "curvature" in shared:
            record["min_curvature"] = float(shared["curvature"].min())
        if "iterations" in shared:
            record["solver_iterations"] = float(shared["iterations"].float().mean())
            record["solver_converged"] = float(shared["converged"].float().mean())
        return record

    def outer(self) -> dict:
        """The trained outer parameters."""
        leaves = self.leaves
        return {"theta": {"w": leaves[0].detach(), "b": leaves[1].detach()}, "lambda0": leaves[2].detach()}

    def replicas(self) -> list[torch.Tensor]:
        return [t.detach() for t in self.leaves]

    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "leaves": [t.detach() for t in self.leaves],
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "indefinite": self.indefinite}

    def load_state_dict(self, state: dict) -> None:
        if {**state["config"], "checkpoint_every": self.cfg.checkpoint_every} != asdict(self.cfg):
            raise ValueError(f"the checkpoint of {self.tag} was written with a different configuration; start "
                             "over with --overwrite")
        device = self.leaves[0].device
        with torch.no_grad():
            for t, v in zip(self.leaves, state["leaves"]):
                t.copy_(v.to(device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.indefinite = state.get("indefinite", 0)


class FairRun:
    """One method's run alone (the run loop's instance behind :func:`train`)."""

    def __init__(self, cfg: Config, tasks: list[Task], run: Run, *, exact: bool = False, tag: str | None = None):
        self.trainer = FairTrainer(cfg, tasks, run.ctx, exact=exact, tag=tag)
        self.pending: dict | None = None

    def step(self, index: int) -> None:
        self.pending = self.trainer.step(index)

    def record(self, step: int, last: bool, seconds: float) -> dict | None:
        return None if self.pending is None else {**self.pending, "seconds": seconds}

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['outer_loss']:.3f}"}

    def replicas(self) -> list[torch.Tensor]:
        return self.trainer.replicas()

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)

    def evaluate(self, records: list[dict]) -> dict:
        return {"run": self.trainer.tag, "steps": self.trainer.cfg.steps}

    def report(self, final: dict) -> list[str]:
        return [f"fair: {final['run']} meta-trained for {final['steps']} steps"]


def train(cfg: Config, tasks: list[Task], out: Path, *, resume: bool | str = False, progress: bool = True,
          tag: str | None = None, ctx: distributed.Context | None = None, exact: bool = False) -> dict:
    """Meta-train ``cfg.method`` on ``tasks`` in the folder ``out``; returns the outer parameters.

    The run loop (:mod:`bilevel.runner.loop`) writes ``metrics.jsonl`` (a record every
    ``log_every`` steps), ``checkpoint.pt`` (every ``checkpoint_every`` steps) and ``final.json``;
    with ``resume`` the checkpoint is continued exactly (``resume="previous"``: the previous
    one kept beside it). Runs on the device of the tasks' tensors (see
    :func:`~bilevel.problems.fair.data.to_device`); see :class:`FairTrainer` for ``ctx`` and ``exact``.
    """
    made: list[FairRun] = []

    def build(config: Config, run: Run) -> FairRun:
        made.append(FairRun(config, tasks, run, exact=exact, tag=tag))
        return made[-1]

    device = tasks[0].x.device
    command = Command("fair", build, frozenset({"checkpoint_every"}))
    run_loop(command, cfg, out_dir=out, resume=resume, progress=progress, ctx=ctx or distributed.init(device),
             report=False)
    return made[-1].trainer.outer()


def evaluate(cfg: Config, outer: dict, tasks: list[Task], *, episodes: int = 20, seed: int = 1,
             adapt_with: Config | None = None, ctx: distributed.Context | None = None, exact: bool = False) -> dict:
    """Adapt on ``k_shot`` support rows of each meta-test task and score every other row.

    ``adapt_with`` adapts with another method's problem from the same ``outer`` (e.g. iMAML's
    initialization adapted under a fairness constraint at test time); by default ``cfg``'s.
    The episodes depend only on ``seed``, ``cfg.k_shot`` and the tasks, so two methods evaluated
    with the same arguments see identical episodes. Returns, per metric, the mean and 95%
    interval over all (task, episode) pairs (with the count of NaN episodes), the per-task
    means, the per-episode values (``"episodes"``: task -> metric -> list), the accuracy of
    the constant predictor of the support's majority label (``"constant_accuracy"`` per
    episode, for the mixing line) and, for the fair method, the count of indefinite
    saddle-point systems.

    Under several processes (``ctx``) each adapts its shard of every task's episodes; the
    scores are gathered in episode order and every rank returns the same figures (bitwise
    those of one process with ``exact``, which adapts one episode per vmap call).
    """
    ctx = ctx or distributed.single_process(tasks[0].x.device)
    method = build_method(adapt_with or cfg)
    generator = torch.Generator().manual_seed(seed)
    per_episode: dict[str, list[torch.Tensor]] = {m: [] for m in METRICS}
    per_task, by_episode, indefinite, checked = {}, {}, 0, 0
    for task in tasks:
        data = evaluation_episodes(task, episodes, cfg.k_shot, generator, max_query=len(task))
        mine, idle = ctx.take_or_stand_in(data, episodes)  # idle: fewer episodes than processes
        # episodes adapted at once: bounds the memory on large tasks (exact: one at a time)
        chunk = 1 if exact else max(1, 200_000 // len(task))
        inner = torch.func.vmap(lambda d: method.adapt(outer, d), chunk_size=chunk)(mine)
        model = inner["model"] if isinstance(method.problem, FairMetaProblem) else inner
        scored = {"score": torch.func.vmap(score, chunk_size=chunk)(model, mine["xq"])}
        curvature = curvatures(method, outer, mine, inner, chunk)
        if curvature is not None:
            scored["curvature"] = curvature
        if idle:
            scored = {key: value[:0] for key, value in scored.items()}
        scored = ctx.gather(scored, episodes)
        s = scored["score"]
        if "curvature" in scored:
            indefinite += int((scored["curvature"] <= 0).sum())
        checked += episodes
        values = task_metrics(s, data["xq"], data["yq"], data["zq"], generator)
        majority = (data["ys"].mean(-1, keepdim=True) >= 0.5).to(s.dtype) * 2 - 1
        values["constant_accuracy"] = accuracy(majority.expand_as(s), data["yq"])
        for m in METRICS:
            per_episode[m].append(values[m])
        per_task[task.name] = {m: float(values[m].nanmean()) for m in METRICS}
        by_episode[task.name] = {m: v.tolist() for m, v in values.items()}
    summary = {m: mean_ci(torch.cat(per_episode[m])) for m in METRICS}
    return {"summary": summary, "per_task": per_task, "episodes": by_episode,
            "indefinite": {"count": indefinite, "of": checked if isinstance(method.problem, FairMetaProblem) else 0}}
