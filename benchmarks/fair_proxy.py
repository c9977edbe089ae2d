"""Does a zero decision boundary covariance lower the demographic parity gap, with every row labelled?

A check of the fairness proxy independent of meta-learning. On each meta-test
task of a data set (the split of ``bilevel fair``), fit a ridge-regularized
logistic regression on all of the task's rows, once unconstrained and once
subject to the exact constraint ``u(w) = mean_i (z_i - mean z) s_w(x_i) = 0``.
``u`` is linear in ``w`` (``u = a^T w``, ``a = mean_i (z_i - mean z) x_i``; the
bias drops out), so the constrained fit minimizes over ``w = P v`` with ``P``
the projection onto the orthogonal complement of ``a``. Accuracy and parity gap
are measured in sample on the same rows, averaged over the tasks.

With ``--parity-bounds``, a second table fits the same regression under
``|mean_{z=1} p - mean_{z=0} p| <= bound`` (``p = sigmoid(s)``: a smoothed parity
gap, PDFM's probability covariance divided by the variance of ``z``; not convex,
solved by SLSQP from zero), to see how much accuracy a given parity gap costs
when every row is labelled.

Prints Markdown tables and appends JSON lines to results/fair_proxy.jsonl.

    python benchmarks/fair_proxy.py --dataset communities --reg 0.1 1 --parity-bounds 0.1 0.2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from bilevel.problems.fair.data import load_tasks, split_tasks
from bilevel.problems.fair.metrics import accuracy, parity_gap


def ridge_logistic(x: np.ndarray, y: np.ndarray, reg: float, projection: np.ndarray):
    """``params = (v, b) -> (loss, gradient)`` of ``mean BCE(P v, b) + reg/2 |P v|^2`` on the rows ``x``."""
    def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = projection @ params[:-1], params[-1]
        s = x @ w + b
        p = 1 / (1 + np.exp(-s))
        loss = np.mean(np.logaddexp(0, s) - y * s) + 0.5 * reg * w @ w
        r = (p - y) / len(y)
        return loss, np.append(projection.T @ (x.T @ r + reg * w), r.sum())

    return loss_and_grad


def fit(x: np.ndarray, y: np.ndarray, reg: float, projection: np.ndarray) -> np.ndarray:
    """Scores of ``argmin mean BCE(P v, b) + reg/2 |P v|^2`` on the rows ``x``."""
    res = scipy.optimize.minimize(ridge_logistic(x, y, reg, projection), np.zeros(x.shape[1] + 1), jac=True,
                                  method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-9})
    return x @ (projection @ res.x[:-1]) + res.x[-1]


def fit_parity_bounded(x: np.ndarray, y: np.ndarray, z: np.ndarray, reg: float, bound: float) -> np.ndarray:
    """Scores of ``argmin mean BCE(w, b) + reg/2 |w|^2`` subject to a smoothed parity gap ``<= bound``."""
    def gap(params: np.ndarray) -> float:
        p = 1 / (1 + np.exp(-(x @ params[:-1] + params[-1])))
        return float(p[z == 1].mean() - p[z == 0].mean())

    constraints = [{"type": "ineq", "fun": lambda q: bound - gap(q)}, {"type": "ineq", "fun": lambda q: bound + gap(q)}]
    res = scipy.optimize.minimize(ridge_logistic(x, y, reg, np.eye(x.shape[1])), np.zeros(x.shape[1] + 1),
                                  jac=True, method="SLSQP", constraints=constraints, options={"maxiter": 500})
    return x @ res.x[:-1] + res.x[-1]


def metrics(s: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """Accuracy and demographic parity gap of the scores ``s`` (as in ``bilevel fair``'s evaluation)."""
    s, y, z = (torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in (s, y, z))
    return float(accuracy(s, y)), float(parity_gap(s, z))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="communities")
    parser.add_argument("--reg", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--parity-bounds", nargs="*", type=float, default=[],
                        help="bounds on the smoothed parity gap for the second table (default: none)")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/fair_proxy.jsonl")
    args = parser.parse_args()

    tasks = split_tasks(load_tasks(args.dataset, args.data_dir), args.test_fraction, args.seed)[1]
    print(f"{args.dataset}: {len(tasks)} meta-test tasks, all rows labelled, in-sample\n")
    print("| reg | unconstrained accuracy / gap | u = 0 accuracy / gap |\n| --- | --- | --- |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for reg in args.reg:
        rows = []
        for task in tasks:
            x, y, z = task.x.numpy(), task.y.numpy(), task.z.numpy()
            a = ((z - z.mean())[:, None] * x).mean(0)
            free = np.eye(x.shape[1])
            fair = free - np.outer(a, a) / max(a @ a, 1e-300)
            rows.append(metrics(fit(x, y, reg, free), y, z) + metrics(fit(x, y, reg, fair), y, z))
        acc0, gap0, acc1, gap1 = np.mean(rows, axis=0)
        print(f"| {reg:g} | {acc0:.3f} / {gap0:.3f} | {acc1:.3f} / {gap1:.3f} |")
        with open(args.out, "a") as f:
            f.write(json.dumps({"dataset": args.dataset, "reg": reg, "tasks": len(tasks),
                                "unconstrained": {"accuracy": acc0, "parity_gap": gap0},
                                "zero_covariance": {"accuracy": acc1, "parity_gap": gap1}}) + "\n")
    if args.parity_bounds:
        print("\n| reg | smoothed parity gap bound | accuracy / gap |\n| --- | --- | --- |")
    for reg in args.reg:
        for bound in args.parity_bounds:
            rows = [metrics(fit_parity_bounded(t.x.numpy(), t.y.numpy(), t.z.numpy(), reg, bound), t.y.numpy(),
                            t.z.numpy()) for t in tasks]
            acc, gap = np.mean(rows, axis=0)
            print(f"| {reg:g} | {bound:g} | {acc:.3f} / {gap:.3f} |")
            with open(args.out, "a") as f:
                f.write(json.dumps({"dataset": args.dataset, "reg": reg, "tasks": len(tasks), "parity_bound": bound,
                                    "accuracy": acc, "parity_gap": gap}) + "\n")


if __name__ == "__main__":
    main()
