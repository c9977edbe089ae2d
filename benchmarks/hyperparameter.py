"""Hyperparameter tuning side by side, on the same data and wall-clock budget.

    python benchmarks/hyperparameter.py l2 --dataset adult --data-dir ../shared/data
    python benchmarks/hyperparameter.py cleaning --data-dir ../shared/data --run runs/hyperopt-cleaning
    python benchmarks/hyperparameter.py solvers --data-dir ../shared/data

``l2``: (a) per-feature L2 tuned by HOAG (this library), (b) scikit-learn's
LogisticRegressionCV over a grid of single strengths, validated on the same
validation set (``PredefinedSplit``, no refit, so every model trains on the same
training set), (c) Optuna's default sampler tuning the single strength for
the grid search's wall time. scikit-learn runs with its defaults (L-BFGS,
``tol=1e-4``) except ``max_iter=1000``. HOAG gets the same wall time as the grid search.
``C`` and our penalty are related by ``exp(lambda) = 1 / (C n_train)``.

``cleaning``: the all-corrupted model (every weight 1) and the oracle trained
on the clean examples only, against a finished ``bilevel hyperopt cleaning``
run (its ``final.json``); reports the share of the gap closed.

``solvers``: the hypergradient of per-feature L2 on a subsample by CG, the
Neumann series and unrolled reverse mode, against the dense direct solve:
relative error and time per hypergradient.

Needs the ``bench`` extra (scikit-learn, optuna) for ``l2``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import bilevel
from bilevel.problems.hyperparameter.cleaning import HyperCleaning, corrupt_labels
from bilevel.problems.hyperparameter.config import HyperoptConfig
from bilevel.problems.hyperparameter.experiment import COMMANDS, selected_record
from bilevel.runner import run
from bilevel.problems.hyperparameter.l2 import PerFeatureL2
from bilevel.problems.hyperparameter.linear import accuracy, mean_loss, minimize
from bilevel.problems.hyperparameter.mnist import load_mnist
from bilevel.problems.hyperparameter.splits import Splits, mnist_splits, split
from bilevel.problems.hyperparameter.tabular import load_tabular
from bilevel.solvers import CG, Direct, Neumann


def load(dataset: str, data_dir: str | None, seed: int) -> Splits:
    if dataset == "mnist":
        return mnist_splits(load_mnist(data_dir), seed=seed)
    table = load_tabular(dataset, data_dir)
    return split(table.x, table.y, seed=seed)


def sklearn_log_loss(model, x, y) -> tuple[float, float]:
    from sklearn.metrics import log_loss

    proba = model.predict_proba(x.numpy())
    return float(log_loss(y.numpy(), proba, labels=model.classes_)), float((proba.argmax(1) == y.numpy()).mean())


def grid_search(data: Splits, n_grid: int) -> dict:
    """LogisticRegressionCV over ``n_grid`` strengths, one train/validation split, no refit."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    x = torch.cat([data.x_train, data.x_val]).numpy()
    y = torch.cat([data.y_train, data.y_val]).numpy()
    fold = np.r_[np.full(len(data.y_train), -1), np.zeros(len(data.y_val))]
    began = time.perf_counter()
    model = LogisticRegressionCV(Cs=np.logspace(-4, 4, n_grid), cv=PredefinedSplit(fold), scoring="neg_log_loss",
                                 refit=False, max_iter=1000).fit(x, y)
    seconds = time.perf_counter() - began
    test_loss, test_acc = sklearn_log_loss(model, data.x_test, data.y_test)
    best_c = float(np.atleast_1d(model.C_)[0])
    return {"method": f"LogisticRegressionCV ({n_grid} strengths)", "seconds": seconds, "test_loss": test_loss,
            "test_acc": test_acc, "best_C": best_c}


def optuna_search(data: Splits, budget: float, seed: int) -> dict:
    """Optuna's default sampler (TPE) over log10 C, for ``budget`` seconds."""
    import optuna
    from sklearn.linear_model import LogisticRegression

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    models = {}

    def objective(trial) -> float:
        c = 10 ** trial.suggest_float("log10_C", -4, 4)
        model = LogisticRegression(C=c, max_iter=1000).fit(data.x_train.numpy(), data.y_train.numpy())
        models[trial.number] = model
        return sklearn_log_loss(model, data.x_val, data.y_val)[0]

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    began = time.perf_counter()
    study.optimize(objective, timeout=budget)
    seconds = time.perf_counter() - began
    best = models[study.best_trial.number]
    test_loss, test_acc = sklearn_log_loss(best, data.x_test, data.y_test)
    return {"method": f"Optuna TPE over C ({len(study.trials)} trials)", "seconds": seconds, "test_loss": test_loss,
            "test_acc": test_acc, "best_C": 10 ** study.best_params["log10_C"]}


def ours(args, budget: float) -> dict:
    """HOAG for ``budget`` seconds of optimization.

    The reported model is the step that the run would select among those finished within
    the budget (the last one, or with ``--select-fraction`` the one with the lowest loss on
    the held-out part of the validation set): the step that overshoots the budget is not used.
    """
    # Pay torch's lazy imports (torch.optim's first optimizer loads torch._dynamo, about 2 s) before
    # the clock starts, as the other methods' imports are paid before theirs.
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])
    config = HyperoptConfig(task="l2", dataset=args.dataset, data_dir=args.data_dir, seed=args.seed,
                            init_penalty=args.init_penalty, on_failure="ignore", out_dir=args.out, steps=10_000,
                            max_minutes=budget / 60, checkpoint_every=50, progress=False,
                            select_fraction=args.select_fraction)
    run(COMMANDS["l2"], config, report=False)
    with open(Path(args.out) / "metrics.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    in_time = [r for r in records if r["time"] <= budget] or records[:1]
    chosen = selected_record(in_time)
    return {"method": "per-feature L2 by HOAG (bilevel)", "seconds": in_time[-1]["time"],
            "test_loss": chosen["test_loss"], "test_acc": chosen["test_acc"], "val_loss": chosen["val_loss"],
            "outer_steps": in_time[-1]["step"], "selected_step": chosen["step"]}


def cmd_l2(args) -> list[dict]:
    data = load(args.dataset, args.data_dir, args.seed)
    grid = grid_search(data, args.grid)
    budget = grid["seconds"] if args.budget is None else args.budget
    rows = [grid, ours(args, budget)]
    rows.append(optuna_search(data, budget, args.seed))
    return rows


def train(data: Splits, x: torch.Tensor, y: torch.Tensor, reg: float) -> torch.Tensor:
    problem = HyperCleaning(reg=reg)
    clean = data._replace(x_train=x, y_train=y)
    theta = torch.full((x.shape[0],), 30.0, dtype=x.dtype)  # sigmoid(30) = 1 to double precision
    weights, _, _ = minimize(lambda w: problem.inner_objective(w, theta, clean), problem.initial_inner(theta, clean),
                             tol=1e-6, max_iter=5000)
    return weights


def cmd_cleaning(args) -> list[dict]:
    summary = json.loads((Path(args.run) / "final.json").read_text())
    settings = summary["config"]
    data = mnist_splits(load_mnist(args.data_dir), n_train=settings["n_train"], n_val=settings["n_val"],
                        n_test=settings["n_test"], seed=settings["seed"])
    noisy, corrupted = corrupt_labels(data.y_train, settings["corrupt"], data.n_classes, seed=settings["seed"])
    rows = []
    baselines = (("all corrupted data (weights 1)", torch.ones_like(corrupted)),
                 ("oracle: clean examples only", ~corrupted))
    for name, keep in baselines:
        began = time.perf_counter()
        w = train(data, data.x_train[keep], noisy[keep], settings["reg"])
        rows.append({"method": name, "seconds": time.perf_counter() - began,
                     "test_loss": float(mean_loss(w, data.x_test, data.y_test)),
                     "test_acc": float(accuracy(w, data.x_test, data.y_test))})
    final = summary["final"]
    gap = rows[1]["test_acc"] - rows[0]["test_acc"]
    rows.append({"method": "hyper-cleaning by HOAG (bilevel)", "seconds": final["time"],
                 "test_loss": final["test_loss"], "test_acc": final["test_acc"], "auc": final["auc"],
                 "precision": final["precision"], "recall": final["recall"],
                 "gap_closed": (final["test_acc"] - rows[0]["test_acc"]) / gap})
    return rows


def cmd_solvers(args) -> list[dict]:
    table = load_tabular(args.dataset if args.dataset != "mnist" else "adult", args.data_dir)
    n = args.subsample
    data = split(table.x, table.y, n_train=n, n_val=n, n_test=n, seed=args.seed)
    problem = PerFeatureL2(inner_tol=1e-10, method="newton")
    lam = torch.full((data.x_train.shape[1],), math.log(args.init_penalty), dtype=torch.float64)
    reference = bilevel.hypergradient(problem, lam, data, solver=Direct(), on_failure="ignore").grad
    # step of the Neumann series and of unrolled gradient descent: 1 / L with L bounding the Hessian
    lipschitz = 0.25 * float(torch.linalg.matrix_norm(data.x_train, 2)) ** 2 / n + args.init_penalty
    rows = []
    variants = [("implicit, CG", dict(solver=CG(rtol=1e-10)), 0), ("implicit, direct", dict(solver=Direct()), 0)]
    for terms in args.terms:
        variants += [(f"implicit, Neumann ({terms} terms)",
                      dict(solver=Neumann(alpha=1 / lipschitz, maxiter=terms, rtol=1e-10)), 0),
                     (f"unrolled, {terms} gradient steps", dict(mode="unrolled"), terms)]
    for name, options, steps in variants:
        problem.inner_lr, problem.inner_steps = 1 / lipschitz, max(steps, 1)
        began = time.perf_counter()
        for _ in range(args.repeats):
            result = bilevel.hypergradient(problem, lam, data, on_failure="ignore", **options)
        seconds = (time.perf_counter() - began) / args.repeats
        error = float((result.grad - reference).norm() / reference.norm())
        rows.append({"method": name, "seconds_per_hypergradient": seconds, "relative_error_vs_direct": error})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("l2", "cleaning", "solvers"))
    parser.add_argument("--dataset", default="adult")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=10, help="strengths in the grid search")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for HOAG and Optuna (default: the grid search's)")
    parser.add_argument("--init-penalty", type=float, default=1e-3)
    parser.add_argument("--select-fraction", type=float, default=0.0,
                        help="HOAG: hold out this fraction of the validation set to select the step to report")
    parser.add_argument("--out", default="runs/benchmark-hyperparameter")
    parser.add_argument("--run", default="runs/hyperopt-cleaning", help="folder of a finished cleaning run")
    parser.add_argument("--subsample", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--terms", type=int, nargs="+", default=[200, 2000],
                        help="Neumann terms and unrolled steps compared")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = {"l2": cmd_l2, "cleaning": cmd_cleaning, "solvers": cmd_solvers}[args.what](args)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
