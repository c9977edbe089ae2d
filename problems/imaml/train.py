"""Meta-training loop: Adam on the meta-parameters, periodic evaluation, resumable.

Each step samples a meta-batch of tasks, computes the averaged meta-gradient
with :func:`~bilevel.problems.imaml.problem.meta_gradient` (one vmapped
computation over tasks) and takes an Adam step. Statistics stay on the device
and are read back every ``log_every`` steps only, written as JSON lines to
``<out_dir>/metrics.jsonl``: query loss, the adjoint solves' outcomes per
status (``negative_curvature`` counts the tasks whose ``I + H/lam`` was found
indefinite by CG; ``adjoint_converged`` those whose true residual met the
solver's ``rtol``), the inner residual, evaluation before and after adaptation,
and the health warnings of :class:`~bilevel.problems.imaml.monitor.Monitor`
(most solves failing, loss spikes; NaN stops the run). ``final.json`` ends with
the run's solver outcomes.

:class:`IMAMLRun` is the instance the run loop drives (:mod:`bilevel.runner.loop`):
the loop owns ``checkpoint.pt`` (settings, meta-parameters, Adam state, sampler
state, the statistics not yet logged), ``metrics.jsonl``, ``final.json``, resume,
``max_minutes`` and the preemption checkpoint; the instance adds the plots.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.runner import distributed
from bilevel.runner.checkpoint import load_for_resume
from bilevel.cuda_graph import CUDAGraphed
from bilevel.problems.imaml.config import RESUMABLE, Config
from bilevel.problems.imaml.experiment import Experiment, build, protocol
from bilevel.problems.imaml.models import Params
from bilevel.problems.imaml.monitor import Monitor, summarize
from bilevel.problems.imaml.problem import MetaGradient, adapt, meta_gradient
from bilevel.runner import CHECKPOINT, METRICS, Command, Run
from bilevel.runner import run as run_loop
from bilevel.solvers import Status

__all__ = ["train", "evaluate", "combine", "combine_in_order", "load_checkpoint", "CHECKPOINT", "METRICS",
           "IMAMLRun", "command"]

PLOTS = ("learning_curves.png", "sinusoid_fits.png")
"""The files a run writes besides the loop's."""
EVAL_SEED = 1  # evaluation tasks come from their own generator, the same at every evaluation


def evaluate(exp: Experiment, theta: Params, n_tasks: int, chunk: int, device: torch.device,
             seed: int, test: bool = True, ctx: distributed.Context | None = None) -> dict[str, Any]:
    """Loss (and accuracy) on the queries of ``n_tasks`` fixed tasks, before and after adaptation.

    Returns means, each with the half-width of a 95% confidence interval over tasks
    (``_ci95``: 1.96 standard errors). For regression also ``loss_zero``, the
    error of predicting 0 on the same queries (the mean of ``y^2``). Under several
    processes (``ctx``) each adapts its shard of every chunk and the per-task
    values are gathered in task order, so every rank returns the same figures.
    """
    ctx = ctx or distributed.single_process(device)
    rng = np.random.default_rng([seed, EVAL_SEED])
    sampler = exp.test_tasks if test else exp.train_tasks
    parts: dict[str, list[torch.Tensor]] = {"loss_before": [], "loss_after": [], "acc_before": [], "acc_after": [],
                                            "loss_zero": []}
    done = 0
    while done < n_tasks:
        size = min(chunk, n_tasks - done)
        tasks, idle = ctx.take_or_stand_in(sampler.sample(rng, size, device), size)  # idle: a chunk below the world
        out = adapt(exp.eval_problem, theta, tasks, chunk_size=exp.chunk_size, query_forward=exp.query_forward)
        per_task = {"loss_before": out.loss_before, "loss_after": out.loss_after}
        if exp.classification:
            per_task["acc_before"] = (out.output_before.argmax(-1) == tasks.query_y).float().mean(-1)
            per_task["acc_after"] = (out.output_after.argmax(-1) == tasks.query_y).float().mean(-1)
        else:
            per_task["loss_zero"] = tasks.query_y.flatten(1).square().mean(1)  # MSE of predicting 0
        if idle:
            per_task = {key: value[:0] for key, value in per_task.items()}
        for key, value in ctx.gather(per_task, size).items():
            parts[key].append(value)
        done += size
    result: dict[str, Any] = {"tasks": n_tasks}
    for key, values in parts.items():
        if values:
            v = torch.cat(values).double().cpu()
            result[key] = float(v.mean())
            result[key + "_ci95"] = float(1.96 * v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return result


def load_checkpoint(out_dir: str | os.PathLike, resume: bool | str = True) -> dict[str, Any]:
    """The checkpoint of the run in ``out_dir`` (``resume="previous"``: the previous one kept beside it).

    Raises :class:`~bilevel.errors.CheckpointError` when it is damaged, ``FileNotFoundError`` when absent.
    """
    return load_for_resume(Path(out_dir) / CHECKPOINT, resume, map_location="cpu")


class _Window:
    """Per-step statistics kept as device tensors between two logs (no host sync per step).

    ``rtol``: the adjoint solver's relative tolerance, against which each solve's
    true residual counts as converged (``None``: the solver's own status decides).
    """

    def __init__(self, rtol: float | None) -> None:
        self.rtol = rtol
        self.reset()

    def reset(self) -> None:
        self.loss: list[torch.Tensor] = []
        self.inner: list[torch.Tensor] = []
        self.status: list[torch.Tensor] = []
        self.converged: list[torch.Tensor] = []
        self.indefinite: list[torch.Tensor] = []
        self.iterations: list[torch.Tensor] = []

    def add(self, mg: MetaGradient) -> None:
        self.loss.append(mg.query_loss.mean())
        if mg.inner_residual is not None:
            self.inner.append(torch.stack([mg.inner_residual.mean(), mg.inner_residual.max()]))
        if mg.status is not None:
            self.status.append(torch.stack([mg.count(s) for s in Status]))
            self.converged.append(mg.count(Status.CONVERGED) if self.rtol is None else mg.converged(self.rtol))
            self.indefinite.append(mg.indefinite.sum())
            self.iterations.append(mg.iterations.float().mean())

    def flush(self) -> tuple[dict[str, Any], list[float]]:
        """The window's log entries and its per-step mean query losses; then starts a new window."""
        losses = torch.stack(self.loss)
        out: dict[str, Any] = {"query_loss": float(losses.mean())}
        if self.inner:
            inner = torch.stack(self.inner)
            out["inner_residual"], out["inner_residual_max"] = float(inner[:, 0].mean()), float(inner[:, 1].max())
        if self.status:
            counts = torch.stack(self.status).sum(0).tolist()
            out["solve_status"] = {s.name.lower(): int(c) for s, c in zip(Status, counts)}
            out["adjoint_converged"] = int(torch.stack(self.converged).sum())
            out["adjoint_indefinite"] = int(torch.stack(self.indefinite).sum())
            out["solve_iterations"] = float(torch.stack(self.iterations).mean())
        self.reset()
        return out, losses.tolist()

    _LISTS = ("loss", "inner", "status", "converged", "indefinite", "iterations")

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """The steps not logged yet (a run stopped between two logs), on the CPU."""
        return {name: [t.cpu() for t in getattr(self, name)] for name in self._LISTS}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]], device: torch.device) -> None:
        for name in self._LISTS:
            setattr(self, name, [t.to(device) for t in state[name]])


def combine(ctx: distributed.Context, local: MetaGradient, meta_batch: int) -> MetaGradient:
    """The whole meta-batch's :class:`MetaGradient` from every rank's share.

    ``local.grad`` is the mean over this rank's tasks: ``n_local`` times it is their
    sum, and one all-reduce of the sums divided by ``meta_batch`` gives the mean over
    every task (exact: the tasks are independent). The per-task diagnostics are
    gathered in task order. One process: ``local`` itself.
    """
    if not ctx.distributed:
        return local
    n_local = local.query_loss.shape[0]
    grad = ctx.mean_of_sums({k: g * n_local for k, g in local.grad.items()}, meta_batch)
    per_task = {name: value for name, value in local._asdict().items() if name != "grad" and value is not None}
    return local._replace(grad=grad, **ctx.gather(per_task, meta_batch))


def combine_in_order(ctx: distributed.Context, parts: list[MetaGradient], meta_batch: int) -> MetaGradient:
    """Exact mode: the whole meta-batch's :class:`MetaGradient` from this rank's per-task ones.

    Each of ``parts`` is one task's, computed alone (a batch of one), so its values
    do not depend on which other tasks share a rank. The per-task gradients are
    averaged in global task order (:meth:`~bilevel.distributed.Context.ordered_mean`)
    and the diagnostics gathered: bitwise the same on any number of processes.
    """
    grads = {k: torch.stack([part.grad[k] for part in parts]) for k in parts[0].grad}
    per_task = {name: torch.cat([getattr(part, name) for part in parts]) for name, value in parts[0]._asdict().items()
                if name != "grad" and value is not None}
    return parts[0]._replace(grad=ctx.ordered_mean(grads, meta_batch), **ctx.gather(per_task, meta_batch))


class IMAMLRun:
    """A meta-training run (the run loop's instance): Adam on the meta-parameters, evaluations,
    and with ``baseline`` the MAML baseline of the resolved config beside it (see :mod:`.job`).

    Under ``torchrun`` every rank draws the whole meta-batch from the same generator and
    computes the meta-gradient of its contiguous shard (:mod:`bilevel.distributed`); the step,
    the checkpoint and the metrics are those of the one-process run, whatever the number of
    processes, so a run may resume on another. With ``config.exact`` they agree bitwise: each
    task is computed alone and the per-task meta-gradients are averaged in global task order
    (:func:`combine_in_order`).
    """

    def __init__(self, config: Config, run: Run, *, baseline: bool = False,
                 omniglot_images: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        config = config.resolved()
        ctx = run.ctx
        if config.meta_batch < ctx.world_size:
            raise ValueError(f"--meta-batch {config.meta_batch} is smaller than the {ctx.world_size} processes: "
                             "every process needs a task; raise --meta-batch or start fewer processes")
        self.config, self.run, self.ctx, self.device = config, run, ctx, run.device
        self.with_baseline = baseline and config.baseline == "maml"
        exp = build(config, omniglot_images)
        if config.exact:  # every vmap holds one task: its values do not depend on the batch around it
            exp = dataclasses.replace(exp, chunk_size=1)
        self.exp = exp
        self.theta = {k: v.to(self.device) for k, v in exp.init.items()}
        self.optimizer = torch.optim.Adam(list(self.theta.values()), lr=config.meta_lr, eps=config.adam_eps)
        self.rng = np.random.default_rng(config.seed)
        self.window = _Window(getattr(exp.solver, "rtol", None))
        self.monitor = Monitor(spike_factor=config.spike_factor)
        self.taken = 0

        def compute(theta: Params, tasks) -> MetaGradient:
            # one way of batching the tasks for the whole run: "auto" would time both on its first calls,
            # so a resumed run (timing afresh) could round otherwise than the run it continues
            return meta_gradient(exp.problem, theta, tasks, mode=config.mode, solver=exp.solver,
                                 chunk_size=exp.chunk_size, over_tasks="vmap")

        self.compute = CUDAGraphed(compute) if config.cuda_graph else compute

    def step(self, index: int) -> None:
        config, ctx = self.config, self.ctx
        tasks = ctx.take(self.exp.train_tasks.sample(self.rng, config.meta_batch, self.device), config.meta_batch)
        if config.exact:
            parts = [self.compute(self.theta, tasks.index(slice(i, i + 1))) for i in range(tasks.query_y.shape[0])]
            mg = combine_in_order(ctx, parts, config.meta_batch)
        else:
            mg = combine(ctx, self.compute(self.theta, tasks), config.meta_batch)
        for k, p in self.theta.items():
            p.grad = mg.grad[k]
        for group in self.optimizer.param_groups:
            group["lr"] = meta_lr(config, index)
        self.optimizer.step()
        self.window.add(mg)
        self.taken = index + 1

    def record(self, step: int, last: bool, seconds: float) -> dict[str, Any]:
        config = self.config
        entries, losses = self.window.flush()
        record = {**entries, "seconds": seconds}
        if self.ctx.is_main:
            alerts = self.monitor.check(step - len(losses) + 1, losses, {"step": step, **record})
            if alerts:
                record["warnings"] = alerts
        if step % config.eval_every == 0 or last:
            record["eval"] = evaluate(self.exp, self.theta, config.eval_tasks, config.meta_batch, self.device,
                                      config.seed, ctx=self.ctx)
        return record

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return _postfix(record)

    def replicas(self) -> Params:
        return self.theta

    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors only: the checkpoint is read with ``weights_only``."""
        return {"theta": {k: v.cpu() for k, v in self.theta.items()}, "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state, "taken": self.taken, "window": self.window.state_dict(),
                "monitor": {"losses": list(self.monitor.losses), "failing_windows": self.monitor.failing_windows}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["theta"].items():
            self.theta[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.taken = state["taken"]
        self.window.load_state_dict(state["window"], self.device)
        self.monitor.losses.extend(state["monitor"]["losses"])
        self.monitor.failing_windows = state["monitor"]["failing_windows"]

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The held-out evaluation (and the official 20-way runs where they apply), the solver
        outcomes of the logged ``records``, and the MAML baseline when the job runs one."""
        config, exp, ctx = self.config, self.exp, self.ctx
        test = evaluate(exp, self.theta, config.final_tasks, config.meta_batch, self.device, config.seed, ctx=ctx)
        final: dict[str, Any] = {"config": config.to_dict(), "meta_steps": self.taken, "test": test}
        if ctx.is_main:
            final["solver_outcomes"] = summarize(records)
            final["test"]["protocol"] = protocol(config)
            if exp.classification and config.ways == 20 and config.shots == 1 and config.split == "official-runs":
                from bilevel.problems.imaml.evaluation import official_runs_accuracy

                final["official_runs"] = official_runs_accuracy(exp.eval_problem, self.theta, config.data_dir,
                                                                self.device, chunk_size=exp.chunk_size)
        if self.with_baseline:
            from bilevel.problems.imaml.job import run_baseline

            final["baseline"] = run_baseline(config, self.taken, self.run)
        return final

    def finish(self, out: Path, final: dict[str, Any], records: list[dict[str, Any]]) -> None:
        from bilevel.problems.imaml import plots
        from bilevel.problems.imaml.job import method_name

        config, exp = self.config, self.exp
        baseline = None
        if "baseline" in final:
            baseline = (Path(final["baseline"]["out_dir"]) / METRICS, "MAML baseline")
        plots.learning_curves(out / METRICS, out / "learning_curves.png", classification=exp.classification,
                              label=method_name(config) if baseline else None, baseline=baseline)
        if not exp.classification:
            plots.sinusoid_fits(exp.eval_problem, self.theta, exp.test_tasks, out / "sinusoid_fits.png",
                                seed=config.seed)

    def report(self, final: dict[str, Any]) -> list[str]:
        from bilevel.problems.imaml.job import report

        return report(final, self.config).split("\n")


def command(*, baseline: bool = False, omniglot_images: tuple[np.ndarray, np.ndarray] | None = None) -> Command:
    """``bilevel imaml`` for the run loop: meta-training alone, or with ``baseline`` the job (the
    MAML baseline beside the run when the config asks for it)."""
    return Command("imaml", lambda config, run: IMAMLRun(config, run, baseline=baseline,
                                                         omniglot_images=omniglot_images),
                   frozenset(RESUMABLE), files=PLOTS)


def train(config: Config, *, resume: bool | str = False, overwrite: bool = False,
          omniglot_images: tuple[np.ndarray, np.ndarray] | None = None,
          ctx: distributed.Context | None = None) -> dict[str, Any]:
    """Run (or resume) the meta-training described by ``config``; returns the final evaluation.

    Writes ``metrics.jsonl``, ``checkpoint.pt``, ``final.json`` and PNG plots in
    ``config.out_dir``. ``resume``: ``True`` (or ``"latest"``) continues from the
    checkpoint there, ``"previous"`` from the previous one kept beside it; a folder
    holding a run is refused (``FileExistsError``) unless resumed or ``overwrite``.
    """
    return run_loop(command(omniglot_images=omniglot_images), config.resolved(), resume=resume,
                    overwrite=overwrite, ctx=ctx, report=False)


def meta_lr(config: Config, step: int) -> float:
    """Adam's step at meta-step ``step`` (from 0): ``meta_lr``, or with ``lr_schedule="cosine"``
    ``meta_lr (1 + cos(pi step / steps)) / 2`` (Loshchilov and Hutter, ICLR 2017), a function
    of the step alone so that a resumed run continues the same schedule."""
    if config.lr_schedule == "cosine":
        return config.meta_lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
    return config.meta_lr


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    post = {"loss": f"{record['query_loss']:.3f}"}
    if "solve_status" in record:
        post["solved"] = f"{record['adjoint_converged']}/{sum(record['solve_status'].values())}"
        post["negcurv"] = str(record["solve_status"]["negative_curvature"])
    if "eval" in record:
        ev = record["eval"]
        post["eval"] = f"{ev['acc_after']:.3f}" if "acc_after" in ev else f"{ev['loss_after']:.3f}"
    return post
