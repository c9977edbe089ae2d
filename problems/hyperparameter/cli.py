"""``bilevel hyperopt {l2,cleaning} ...``: tune hyperparameters by implicit differentiation.

Examples::

    bilevel hyperopt l2 --dataset mnist --out-dir runs/l2-mnist
    bilevel hyperopt cleaning --corruption 0.5 --out-dir runs/cleaning
    bilevel hyperopt cleaning --out-dir runs/cleaning --resume    # continue a stopped run, with its settings

An output folder that holds a run is refused unless --resume continues it or
--overwrite deletes it. --resume restores the run's settings from its
checkpoint; flags given with it must match, except the resumable ones (--steps,
--max-time, --checkpoint-every, --device, ...). A damaged checkpoint is named
with the way out: --resume previous (the previous checkpoint, kept beside it)
or --overwrite.
"""

from __future__ import annotations

import argparse
from typing import Any

from bilevel.runs import add_run_flags, count, real, track_given

DATASETS = ("mnist", "adult", "bank", "compas", "german", "digits", "breast_cancer", "wine", "iris")


def _common(parser: argparse.ArgumentParser, *, n_train: int | None, n_val: int | None,
            n_test: int | None) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="folder holding mnist/, adult/, ... (default: $BILEVEL_DATA_DIR, else the nearest "
                           "shared/data in the current folder or above, else ~/.cache/bilevel/data)")
    data.add_argument("--download", action="store_true", help="download MNIST files that are missing")
    data.add_argument("--n-train", type=count(1), default=n_train, help="training examples (default: %(default)s)")
    data.add_argument("--n-val", type=count(1), default=n_val, help="validation examples (default: %(default)s)")
    data.add_argument("--n-test", type=count(1), default=n_test, help="test examples (default: %(default)s)")
    data.add_argument("--seed", type=count(0), default=0, help="seed of the splits and the corruption")
    data.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    loop = parser.add_argument_group("outer loop (HOAG)")
    loop.add_argument("--steps", type=count(1), default=100, help="outer steps, rejected ones included")
    loop.add_argument("--max-time", type=real(0, low_open=True), default=None,
                      help="stop after this many seconds of optimization")
    loop.add_argument("--tol0", type=real(0, low_open=True), default=1e-3, help="first inner and adjoint tolerance")
    loop.add_argument("--tol-decay", type=real(0, 1, low_open=True), default=0.9,
                      help="tolerance factor per outer step")
    loop.add_argument("--tol-min", type=real(0, low_open=True), default=1e-8, help="smallest tolerance")
    loop.add_argument("--first-move", type=real(0, low_open=True), default=1.0,
                      help="the first step moves the largest hyperparameter by this much")
    loop.add_argument("--grow", type=real(1), default=1.5, help="step size factor after an accepted step")
    loop.add_argument("--select-fraction", type=real(0, 1, high_open=True), default=0.0,
                      help="hold out this fraction of the validation set and report the step with the lowest "
                           "loss on it (early stopping; the hypergradient uses the rest)")
    loop.add_argument("--max-inner-iter", type=count(1), default=2000, help="inner solver iteration cap")
    loop.add_argument("--cg-maxiter", type=count(1), default=1000, help="conjugate gradient iteration cap")
    loop.add_argument("--on-failure", choices=("warn", "raise", "ignore"), default="warn",
                      help="what an inexact inner or adjoint solve does")
    run = parser.add_argument_group("run")
    run.add_argument("--out-dir", dest="out", default=None, help="output folder (default: runs/hyperopt-<task>)")
    run.add_argument("--out", dest="out", default=None, help=argparse.SUPPRESS)  # deprecated spelling
    add_run_flags(run, "<out-dir>/checkpoint.pt")
    run.add_argument("--checkpoint-every", type=count(1), default=10, help="outer steps between checkpoints")
    run.add_argument("--threads", type=count(1), default=None, help="torch CPU threads")
    run.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    run.add_argument("--no-plot", dest="plot", action="store_false", help="skip plot.png")


def register(subparsers: Any) -> None:
    """Add ``hyperopt`` with its ``l2`` and ``cleaning`` subcommands."""
    parser = subparsers.add_parser("hyperopt", help="hyperparameter optimization by implicit differentiation",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    l2 = tasks.add_parser("l2", help="per-feature L2 penalties of logistic / softmax regression")
    track_given(l2)
    l2.add_argument("--dataset", choices=DATASETS, default="mnist")
    l2.add_argument("--init-penalty", type=real(0, low_open=True), default=1e-3,
                    help="initial exp(lambda_j) of every feature")
    _common(l2, n_train=None, n_val=None, n_test=None)
    cleaning = tasks.add_parser("cleaning", help="data hyper-cleaning of MNIST with corrupted labels")
    track_given(cleaning)
    cleaning.add_argument("--corruption", type=real(0, 1), default=0.5, help="fraction of random training labels")
    cleaning.add_argument("--reg", type=real(0), default=1e-3, help="L2 strength of the inner problem")
    _common(cleaning, n_train=20_000, n_val=5_000, n_test=10_000)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    import torch

    from bilevel.runs import given_flags, restore, settings_of

    from .experiment import RUN_KEYS, run_experiment, saved_settings
    from .tasks import cleaning_task, l2_task

    if given_flags(args).get("out") == "--out":
        print("bilevel hyperopt: --out is deprecated; use --out-dir", file=sys.stderr)
    settings = settings_of(args)
    if settings["out"] is None:
        settings["out"] = f"runs/hyperopt-{args.task}"
    if args.resume:  # the run's settings, with the flags given (and the task) on top
        given = {**given_flags(args), "task": "task"}
        settings = restore(saved_settings(settings["out"], args.resume), settings, given, RUN_KEYS, settings["out"])
    if settings["threads"] is not None:
        torch.set_num_threads(settings["threads"])
    if args.task == "l2" and settings["dataset"] == "mnist":
        settings.update({k: v for k, v in (("n_train", 20_000), ("n_val", 5_000), ("n_test", 10_000))
                         if settings[k] is None})
    result = run_experiment(settings, l2_task if args.task == "l2" else cleaning_task)
    print(json.dumps(result))
    return 0
