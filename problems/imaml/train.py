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

``<out_dir>/checkpoint.pt`` (settings, meta-parameters, Adam state, step,
sampler state) is written at step 0 and every ``checkpoint_every`` steps by
:func:`bilevel.checkpoint.save` (atomic, with a SHA-256 digest checked on load,
the previous one kept as ``checkpoint.prev.pt``); :func:`train` with
``resume=True`` continues from it exactly as if the run had not stopped
(``resume="previous"`` from the previous one). A folder that holds a run is
refused unless it is resumed or ``overwrite=True`` deletes that run's files.
``max_minutes`` stops a run at the first log step past that wall-clock budget,
with a checkpoint, so ``--resume`` (with more time) continues it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel import distributed
from bilevel.checkpoint import file_patterns, load_for_resume
from bilevel.checkpoint import save as save_checkpoint
from bilevel.cuda_graph import CUDAGraphed
from bilevel.problems.imaml.config import RESUMABLE, Config
from bilevel.problems.imaml.experiment import Experiment, build, protocol
from bilevel.problems.imaml.models import Params
from bilevel.problems.imaml.monitor import Monitor, summarize
from bilevel.problems.imaml.problem import MetaGradient, adapt, meta_gradient
from bilevel.runs import output_patterns, prepare_output, read_records, write_records, write_text_atomic
from bilevel.solvers import Status

__all__ = ["train", "evaluate", "combine", "combine_in_order", "load_checkpoint", "CHECKPOINT", "METRICS",
           "RUN_FILES"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RUN_FILES = (*file_patterns(CHECKPOINT),
             *output_patterns(METRICS, "final.json", "learning_curves.png", "sinusoid_fits.png"))
"""The files a run writes in its folder (globs): what ``overwrite`` deletes."""
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


def _save(out: Path, config: Config, step: int, rng: np.random.Generator, seconds: float, theta: Params,
          optimizer: torch.optim.Optimizer) -> None:
    """Checkpoint the run at ``step`` (plain values and CPU tensors only: it is read with ``weights_only``)."""
    save_checkpoint({"config": config.to_dict(), "step": step, "rng": rng.bit_generator.state, "seconds": seconds,
                     "theta": {k: v.cpu() for k, v in theta.items()}, "optimizer": optimizer.state_dict()},
                    out / CHECKPOINT)


def load_checkpoint(out_dir: str | os.PathLike, resume: bool | str = True) -> dict[str, Any]:
    """The checkpoint of the run in ``out_dir`` (``resume="previous"``: the previous one kept beside it).

    Raises :class:`~bilevel.errors.CheckpointError` when it is damaged, ``FileNotFoundError`` when absent.
    """
    return load_for_resume(Path(out_dir) / CHECKPOINT, resume, map_location="cpu")


def _check_compatible(saved: dict[str, Any], config: Config) -> None:
    current = config.to_dict()
    saved = {**Config().to_dict(), **saved}  # a setting newer than the checkpoint had its default
    changed = [k for k in current if k not in RESUMABLE and saved[k] != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"cannot resume: settings differ from the checkpoint ({details}); "
                         f"use the original settings or a new --out-dir")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after ``step`` (written after the checkpoint, before a crash), and a
    last line cut short by a kill."""
    write_records(path, read_records(path, upto=step))


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


def train(config: Config, *, resume: bool | str = False, overwrite: bool = False,
          omniglot_images: tuple[np.ndarray, np.ndarray] | None = None,
          ctx: distributed.Context | None = None) -> dict[str, Any]:
    """Run (or resume) the meta-training described by ``config``; returns the final evaluation.

    Writes ``metrics.jsonl``, ``checkpoint.pt``, ``final.json`` and PNG plots in
    ``config.out_dir``. ``resume``: ``True`` (or ``"latest"``) continues from the
    checkpoint there, ``"previous"`` from the previous one kept beside it; a folder
    holding a run is refused (``FileExistsError``) unless resumed or ``overwrite``.

    Under ``torchrun`` (or with ``ctx``) every rank draws the whole meta-batch from
    the same generator and computes the meta-gradient of its contiguous shard
    (:mod:`bilevel.distributed`); the step, the checkpoint and the metrics are those
    of the one-process run, whatever the number of processes, so a run may resume
    on another. Rank 0 alone writes files. With ``config.exact`` they agree bitwise:
    each task is computed alone and the per-task meta-gradients are averaged in
    global task order (:func:`combine_in_order`).
    """
    config = config.resolved()
    ctx = ctx or distributed.init(config.device)
    if config.meta_batch < ctx.world_size:
        raise ValueError(f"--meta-batch {config.meta_batch} is smaller than the {ctx.world_size} processes: "
                         "every process needs a task; raise --meta-batch or start fewer processes")
    if ctx.is_main:
        prepare_output(config.out_dir, RUN_FILES, resume=bool(resume), overwrite=overwrite)
    ctx.barrier()
    out = Path(config.out_dir)
    device = ctx.device if ctx.distributed else torch.device(config.device)
    exp = build(config, omniglot_images)
    if config.exact:  # every vmap holds one task: its values do not depend on the batch around it
        exp = dataclasses.replace(exp, chunk_size=1)
    theta = {k: v.to(device) for k, v in exp.init.items()}
    optimizer = torch.optim.Adam(list(theta.values()), lr=config.meta_lr, eps=config.adam_eps)
    rng = np.random.default_rng(config.seed)
    step, elapsed = 0, 0.0
    metrics_path = out / METRICS
    if resume:
        saved = load_checkpoint(out, resume)
        _check_compatible(saved["config"], config)
        for k, v in saved["theta"].items():
            theta[k].copy_(v)
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        step = saved["step"]
        elapsed = saved.get("seconds", 0.0)  # checkpoints written before it was saved start the clock at 0
        if ctx.is_main:
            _truncate_metrics(metrics_path, step)
    elif ctx.is_main:
        _save(out, config, 0, rng, 0.0, theta, optimizer)
        metrics_path.write_text("")
    ctx.barrier()

    from tqdm import tqdm

    def compute(theta: Params, tasks) -> MetaGradient:
        return meta_gradient(exp.problem, theta, tasks, mode=config.mode, solver=exp.solver,
                             chunk_size=exp.chunk_size)

    if config.cuda_graph:
        compute = CUDAGraphed(compute)
    bar = tqdm(total=config.steps, initial=step, disable=not (config.progress and ctx.is_main),
               desc=f"imaml {config.dataset}")
    window, resumed_at = _Window(getattr(exp.solver, "rtol", None)), time.perf_counter()
    monitor = Monitor(spike_factor=config.spike_factor)
    monitor.replay(read_records(metrics_path))
    started = resumed_at - elapsed  # "seconds" in the metrics counts the training time of every run so far
    deadline = resumed_at + 60 * config.max_minutes if config.max_minutes else math.inf
    with (metrics_path.open("a") if ctx.is_main else contextlib.nullcontext()) as log:
        while step < config.steps:
            tasks = ctx.take(exp.train_tasks.sample(rng, config.meta_batch, device), config.meta_batch)
            if config.exact:
                parts = [compute(theta, tasks.index(slice(i, i + 1))) for i in range(tasks.query_y.shape[0])]
                mg = combine_in_order(ctx, parts, config.meta_batch)
            else:
                mg = combine(ctx, compute(theta, tasks), config.meta_batch)
            for k, p in theta.items():
                p.grad = mg.grad[k]
            for group in optimizer.param_groups:
                group["lr"] = meta_lr(config, step)
            optimizer.step()
            window.add(mg)
            step += 1
            bar.update(1)
            last = step == config.steps
            if step % config.log_every == 0 or last:
                last = last or time.perf_counter() >= deadline
                entries, losses = window.flush()
                record = {"step": step, **entries, "seconds": time.perf_counter() - started}
                if ctx.distributed:  # the same decision to stop on every rank: rank 0's clock
                    last = bool(ctx.sum(torch.tensor([float(last and ctx.is_main)], device=device)))
                if ctx.is_main:
                    alerts = monitor.check(step - len(losses) + 1, losses, record)
                    if alerts:
                        record["warnings"] = alerts
                if step % config.eval_every == 0 or last:
                    record["eval"] = evaluate(exp, theta, config.eval_tasks, config.meta_batch, device, config.seed,
                                              ctx=ctx)
                if ctx.is_main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.set_postfix(_postfix(record))
            if step % config.checkpoint_every == 0 or last:
                ctx.check_replicas(theta)
                if ctx.is_main:
                    _save(out, config, step, rng, time.perf_counter() - started, theta, optimizer)
                ctx.barrier()
            if last:
                break
    bar.close()
    return _finish(config, exp, theta, device, out, step, ctx)


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


def _finish(config: Config, exp: Experiment, theta: Params, device: torch.device, out: Path,
            step: int, ctx: distributed.Context) -> dict[str, Any]:
    from bilevel.problems.imaml import plots

    test = evaluate(exp, theta, config.final_tasks, config.meta_batch, device, config.seed, ctx=ctx)
    if not ctx.is_main:
        ctx.barrier()  # rank 0 writes the files
        return {"config": config.to_dict(), "meta_steps": step, "test": test}
    records = read_records(out / METRICS)
    final: dict[str, Any] = {"config": config.to_dict(), "meta_steps": step, "test": test,
                             "solver_outcomes": summarize(records)}
    final["test"]["protocol"] = protocol(config)
    if exp.classification and config.ways == 20 and config.shots == 1 and config.split == "official-runs":
        from bilevel.problems.imaml.evaluation import official_runs_accuracy

        final["official_runs"] = official_runs_accuracy(exp.eval_problem, theta, config.data_dir, device,
                                                         chunk_size=exp.chunk_size)
    write_text_atomic(out / "final.json", json.dumps(final, indent=2) + "\n")
    plots.learning_curves(out / METRICS, out / "learning_curves.png", classification=exp.classification)
    if not exp.classification:
        plots.sinusoid_fits(exp.eval_problem, theta, exp.test_tasks, out / "sinusoid_fits.png", seed=config.seed)
    ctx.barrier()
    return final
