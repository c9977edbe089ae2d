"""``bilevel imaml`` as a job: the run, the MAML baseline beside it, and the closing report.

When the resolved ``baseline`` is ``"maml"`` (the sinusoid main job's default), the
same command also meta-trains MAML at its usual setting (10 plain inner steps,
``lam = 0``) with the same seed, meta-steps, meta-batch, Adam step and evaluation
tasks, in ``<out_dir>/baseline_maml``; ``final.json`` gains a ``baseline`` entry
and ``learning_curves.png`` shows both methods. :func:`report` is what the
command prints at the end: where the files are, the final error (or accuracy)
with its 95% interval next to the before-adaptation and predict-zero baselines
and MAML's, and the solver outcomes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bilevel.problems.imaml.config import Config
from bilevel.runner import CHECKPOINT, METRICS, Run
from bilevel.runner import run as run_loop

__all__ = ["run_job", "run_baseline", "baseline_config", "method_name", "report", "BASELINE_DIR"]

BASELINE_DIR = "baseline_maml"


def baseline_config(config: Config) -> Config:
    """MAML at its usual setting for the resolved ``config``: the same task stream and
    evaluation, 10 plain gradient steps of the data set's default inner step, ``lam = 0``."""
    return dataclasses.replace(config, mode="unrolled", lam=None, inner_lr=None, inner_steps=None,
                               inner_optimizer=None, inner_tol=None, prox_schedule="every_step", solver=None,
                               cg_steps=None, solver_rtol=None, damping=0.0, eval_lam=None, baseline="none",
                               out_dir=str(Path(config.out_dir) / BASELINE_DIR)).resolved()


def run_job(config: Config, *, resume: bool | str = False, overwrite: bool = False,
            given: dict[str, str] | None = None, report: bool = False, tensorboard: bool = False) -> dict[str, Any]:
    """Meta-train ``config`` and, when its resolved ``baseline`` is ``"maml"``, the baseline beside
    it (:func:`run_baseline`); the final results. ``given``: the flags typed, for ``--resume``;
    ``tensorboard``: the logged metrics for TensorBoard too."""
    from bilevel.problems.imaml.train import command

    return run_loop(command(baseline=True), config.resolved(), resume=resume, overwrite=overwrite, given=given,
                    report=report, tensorboard=tensorboard)


def run_baseline(config: Config, meta_steps: int, run: Run) -> dict[str, Any]:
    """Meta-train the MAML baseline of the resolved ``config`` for ``meta_steps`` (the run's, a
    ``max_minutes`` stop included) in ``<out_dir>/baseline_maml``, resuming with the run when it
    has a checkpoint of its own; its entry of ``final.json``."""
    from bilevel.problems.imaml.train import command

    maml = dataclasses.replace(baseline_config(config), steps=meta_steps, max_minutes=None)
    resume = bool(run.resume) and (Path(maml.out_dir) / CHECKPOINT).is_file()
    result = run_loop(command(), maml, resume=resume, overwrite=run.overwrite and not resume, ctx=run.ctx,
                      progress=run.progress, report=False)
    return {"method": "maml", "out_dir": maml.out_dir, "inner_steps": maml.inner_steps, "lam": maml.lam,
            "inner_lr": maml.inner_lr, "meta_steps": result["meta_steps"], "test": result["test"]}


def method_name(config: Config) -> str:
    return {"implicit": "iMAML", "unrolled": "MAML", "first_order": "FOMAML"}[config.mode]


def _interval(test: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * test[key]:.{digits}f} +- {scale * test[key + '_ci95']:.{digits}f}"


def report(final: dict[str, Any], config: Config) -> str:
    """The lines the command prints when the run of the resolved ``config`` ends with ``final``
    (the parts of ``final`` that are present)."""
    test = final["test"]
    lines = [f"{method_name(config)} on {config.dataset}, {final.get('meta_steps', 0)} meta-steps"]
    if "protocol" in test:
        lines.append(f"protocol: {test['protocol']}")
    if "acc_after" in test:
        lines += [f"held-out accuracy on {test['tasks']} tasks (%, 95% interval):",
                  f"  after adaptation      {_interval(test, 'acc_after', 100, 1)}",
                  f"  before adaptation     {_interval(test, 'acc_before', 100, 1)}",
                  f"  chance                {100 / config.ways:.1f}"]
    elif "loss_after" in test:
        lines += [f"held-out query MSE on {test['tasks']} tasks (95% interval):",
                  f"  after adaptation      {_interval(test, 'loss_after')}",
                  f"  before adaptation     {_interval(test, 'loss_before')}",
                  f"  predicting zero       {_interval(test, 'loss_zero')}"]
    if "baseline" in final:
        base = final["baseline"]
        lines.append(f"  MAML baseline ({base['inner_steps']} inner steps of {base['inner_lr']:g}, "
                     f"lam {base['lam']:g}, {base['meta_steps']} meta-steps), after adaptation: "
                     f"{_interval(base['test'], 'loss_after')} (files in {base['out_dir']})")
    if "official_runs" in final:
        lines.append(f"official 20-way one-shot runs: accuracy {final['official_runs']['accuracy']:.4f}")
    outcomes = final.get("solver_outcomes", {})
    if "adjoint" in outcomes:
        adjoint = outcomes["adjoint"]
        failed = ", ".join(f"{k} {v}" for k, v in adjoint["status"].items() if v and k != "converged") or "none"
        tol = f"rtol {config.solver_rtol:g}" if config.solver_rtol else "the solver's default rtol"
        lines.append(f"adjoint solves ({config.solver}, at most {config.cg_steps} iterations, {tol} on the true "
                     f"residual): {adjoint['converged']} of {adjoint['solves']} converged "
                     f"({100 * adjoint['converged_fraction']:.1f}%), {adjoint['mean_iterations']:.1f} iterations "
                     f"on average; statuses of the rest: {failed}; proven indefinite (H + lam I has a "
                     f"negative eigenvalue): {adjoint['indefinite']}")
    if "inner" in outcomes:
        lines.append(f"inner solves ({config.inner_optimizer}, {config.inner_steps} steps): mean residual "
                     f"||grad of the inner objective|| {outcomes['inner']['mean_residual']:.3g}")
    if "warnings" in outcomes:
        lines.append(f"health warnings logged: {outcomes['warnings']} (see 'warnings' in {METRICS})")
    return "\n".join(lines)
