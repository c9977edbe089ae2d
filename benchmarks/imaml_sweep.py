"""The runs that chose the sinusoid main job's settings (``bilevel imaml``): a sweep.

Each variant is a :class:`~bilevel.problems.imaml.config.Config` change from the
main job's settings, meta-trained with :func:`~bilevel.problems.imaml.train.train`
on one thread, one run at a time. A row reports the final adapted MSE on 600
held-out tasks (95% interval), the adjoint solves that met the tolerance on the
true residual, the statuses that did not, the mean inner residual, the health
warnings, and the CPU and wall-clock seconds (on one thread the CPU time is what
the run takes on an idle core; wall-clock grows with other load).

    OMP_NUM_THREADS=1 python benchmarks/imaml_sweep.py                  # every variant, seed 0
    OMP_NUM_THREADS=1 python benchmarks/imaml_sweep.py --only main maml --seeds 0 1 2 3 4

Rows are appended to ``benchmarks/results/imaml_sweep.jsonl`` (``--out``); the
table is printed at the end. docs/results/imaml.md, "Choosing the main job's settings",
holds the results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bilevel.problems.imaml.config import Config
from bilevel.problems.imaml.monitor import TrainingWarning
from bilevel.problems.imaml.train import train

MAML = dict(mode="unrolled")  # the usual MAML: lam 0, 10 plain steps of 0.02 (the resolved defaults)
CG10 = dict(solver="cg", cg_steps=10)
# Changes from the main job's settings (lam 3, 20 Armijo steps from 0.02, MINRES 20, rtol 1e-2), one row each.
VARIANTS: dict[str, dict[str, Any]] = {
    "main": {},
    "maml": MAML,
    "old-default": dict(lam=1.0, inner_steps=40, inner_optimizer="gd", solver="cg", cg_steps=5, solver_rtol=1e-5),
    "lam1-cg10": dict(lam=1.0, **CG10),
    "lam1-cg10-armijo40": dict(lam=1.0, inner_steps=40, **CG10),
    "lam1-cg10-damping3": dict(lam=1.0, damping=3.0, **CG10),
    "lam2-cg10": dict(lam=2.0, **CG10),
    "lam5-cg10": dict(lam=5.0, **CG10),
    "lam1-minres10": dict(lam=1.0, cg_steps=10),
    "lam1": dict(lam=1.0),
    "lam1-minres30": dict(lam=1.0, cg_steps=30),
    "lam1-rtol1e-3": dict(lam=1.0, solver_rtol=1e-3),
    "lam1-armijo10": dict(lam=1.0, inner_steps=10),
    "lam2": dict(lam=2.0),
    "minres30": dict(cg_steps=30),
}


def run(name: str, seed: int, steps: int | None) -> dict[str, Any]:
    """Meta-train variant ``name`` with ``seed``; the row of the table."""
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)  # counted in the row instead
        config = Config(seed=seed, steps=steps, out_dir=out, progress=False, baseline="none", **VARIANTS[name])
        started, cpu = time.perf_counter(), time.process_time()
        final = train(config)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    test, outcomes = final["test"], final["solver_outcomes"]
    row: dict[str, Any] = {"variant": name, "seed": seed, "steps": final["meta_steps"], "seconds": seconds,
                           "cpu_seconds": cpu,
                           "mse_after": test["loss_after"], "mse_after_ci95": test["loss_after_ci95"],
                           "mse_before": test["loss_before"], "mse_zero": test["loss_zero"],
                           "warnings": outcomes["warnings"], "inner_residual": outcomes["inner"]["mean_residual"],
                           "config": final["config"]}
    if "adjoint" in outcomes:
        adjoint = outcomes["adjoint"]
        row.update(converged=adjoint["converged_fraction"], iterations=adjoint["mean_iterations"],
                   status={k: v for k, v in adjoint["status"].items() if v})
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    lines = ["| variant | seed | meta-steps | MSE after | MSE before | adjoint converged | not converged | "
             "inner residual | warnings | CPU s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        failed = ", ".join(f"{k} {v}" for k, v in r.get("status", {}).items() if k != "converged") or "-"
        converged = f"{100 * r['converged']:.1f}%" if "converged" in r else "-"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['steps']} | {r['mse_after']:.3f} +- "
                     f"{r['mse_after_ci95']:.3f} | {r['mse_before']:.2f} | {converged} | {failed} | "
                     f"{r['inner_residual']:.3f} | {r['warnings']} | {r['cpu_seconds']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="meta-steps (default: the main job's)")
    parser.add_argument("--out", default="benchmarks/results/imaml_sweep.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or VARIANTS:
        for seed in args.seeds:
            row = run(name, seed, args.steps)
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
