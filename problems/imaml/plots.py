"""PNG plots of a run: learning curves, and adapted sinusoids against the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bilevel.problems.imaml.models import Params
from bilevel.problems.imaml.problem import IMAMLProblem
from bilevel.problems.imaml.sinusoid import X_RANGE, SinusoidTasks

__all__ = ["learning_curves", "sinusoid_fits"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]


def learning_curves(metrics: Path, png: Path, *, classification: bool, label: str | None = None,
                    baseline: tuple[Path, str] | None = None) -> None:
    """Training query loss, and evaluation before/after adaptation, against the meta-step.

    ``baseline``: the ``metrics.jsonl`` of a second run and its name, drawn dashed
    beside this run (``label``) on both panels.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    key = "acc" if classification else "loss"
    runs = [(_records(metrics), label, "-")]
    if baseline is not None:
        runs.append((_records(baseline[0]), baseline[1], "--"))
    for records, name, style in runs:
        prefix = f"{name}: " if name else ""
        ax_loss.plot([r["step"] for r in records], [r["query_loss"] for r in records], style, label=name)
        evals = [r for r in records if "eval" in r]
        steps = [r["step"] for r in evals]
        for color, when in (("C1", "before"), ("C0", "after")):
            ax_eval.plot(steps, [r["eval"][f"{key}_{when}"] for r in evals], style, color=color, marker="o",
                         label=f"{prefix}{when} adaptation")
    ax_loss.set(xlabel="meta-step", ylabel="query loss after adaptation (train tasks)", yscale="log")
    if baseline is not None:
        ax_loss.legend()
    ax_eval.set(xlabel="meta-step", ylabel=f"held-out query {'accuracy' if classification else 'MSE'}")
    if not classification:
        ax_eval.set_yscale("log")
    ax_eval.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


@torch.no_grad()
def sinusoid_fits(problem: IMAMLProblem, theta: Params, tasks: SinusoidTasks, png: Path, *,
                  seed: int = 0, n: int = 4) -> None:
    """For ``n`` held-out tasks: truth, support points, prediction before and after adaptation."""
    rng = np.random.default_rng([seed, 2])
    amplitude, phase = tasks.sample_params(rng, n)
    batch = tasks.make(rng, amplitude, phase)
    device = next(iter(theta.values())).device
    grid = np.linspace(*X_RANGE, 200)
    x = torch.tensor(grid, dtype=torch.float32, device=device)[:, None]
    plt = _pyplot()
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), sharey=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        task = batch.index(i).to(device)
        phi = problem.solve_inner(theta, task, theta)
        ax.plot(grid, amplitude[i] * np.sin(grid - phase[i]), "k-", label="truth")
        ax.plot(grid, problem.forward(theta, x).cpu().squeeze(-1), "C1:", label="before adaptation")
        ax.plot(grid, problem.forward(phi, x).cpu().squeeze(-1), "C0-", label="after adaptation")
        ax.plot(task.support_x.cpu().squeeze(-1), task.support_y.cpu().squeeze(-1), "C3^", label="support")
        ax.set(title=f"A={amplitude[i]:.2f}, phase={phase[i]:.2f}", xlabel="x")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
