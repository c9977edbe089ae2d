"""``bilevel hyperopt {l2,cleaning} ...``: tune hyperparameters by implicit differentiation.

Examples::

    bilevel hyperopt l2 --dataset mnist --out-dir runs/l2-mnist
    bilevel hyperopt cleaning --corrupt 0.5 --out-dir runs/cleaning
    bilevel hyperopt cleaning --out-dir runs/cleaning --resume    # continue a stopped run, with its settings

An output folder that holds a run is refused unless --resume continues it or
--overwrite deletes it. --resume restores the run's settings from its
checkpoint; flags given with it must match, except the resumable ones (--steps,
--max-minutes, --checkpoint-every, --device, ...). A damaged checkpoint is named
with the way out: --resume previous (the previous checkpoint, kept beside it)
or --overwrite. SIGTERM or Ctrl-C stops the run after a checkpoint of its last step.
"""

from __future__ import annotations

import argparse
from typing import Any

from bilevel.runner.flags import count, real, track_given

__all__ = ["register", "run"]


def _minutes(text: str) -> float:
    """``--max-time`` (seconds, the older flag) in ``--max-minutes``' unit."""
    return real(0, low_open=True)(text) / 60


def _common(parser: argparse.ArgumentParser) -> None:
    from bilevel.runner.flags import add_shared_flags, deprecated_alias
    from bilevel.solvers import SOLVERS

    from .config import HyperoptConfig

    d = HyperoptConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--download", action="store_true", help="download MNIST files that are missing")
    data.add_argument("--n-train", type=count(1), help="training examples (default: every row; MNIST 20000)")
    data.add_argument("--n-val", type=count(1), help="validation examples (default: every row; MNIST 5000)")
    data.add_argument("--n-test", type=count(1), help="test examples (default: every row; MNIST 10000)")
    data.add_argument("--dtype", choices=("float64", "float32"), default=d.dtype)
    loop = parser.add_argument_group("outer loop (HOAG)")
    loop.add_argument("--tol0", type=real(0, low_open=True), default=d.tol0, help="first inner and adjoint tolerance")
    loop.add_argument("--tol-decay", type=real(0, 1, low_open=True), default=d.tol_decay,
                      help="tolerance factor per outer step")
    loop.add_argument("--tol-min", type=real(0, low_open=True), default=d.tol_min, help="smallest tolerance")
    loop.add_argument("--first-move", type=real(0, low_open=True), default=d.first_move,
                      help="the first step moves the largest hyperparameter by this much")
    loop.add_argument("--grow", type=real(1), default=d.grow, help="step size factor after an accepted step")
    loop.add_argument("--select-fraction", type=real(0, 1, high_open=True), default=d.select_fraction,
                      help="hold out this fraction of the validation set and report the step with the lowest "
                           "loss on it (early stopping; the hypergradient uses the rest)")
    loop.add_argument("--on-failure", choices=("warn", "raise", "ignore"), default=d.on_failure,
                      help="what an inexact inner or adjoint solve does")
    loop.add_argument("--no-plot", dest="plot", action="store_false", help="skip plot.png")
    run = add_shared_flags(parser, HyperoptConfig, solvers=SOLVERS, help={
        "out_dir": "output folder (default: runs/hyperopt-<task>)",
        "data_dir": "folder holding mnist/, adult/, ... (default: $BILEVEL_DATA_DIR, else the nearest "
                    "shared/data in the current folder or above, else ~/.cache/bilevel/data)",
        "seed": "seed of the splits and the corruption (default {default})",
        "steps": "outer steps, rejected ones included (default {default})",
        "inner_steps": "iteration cap of the inner solver (default {default})",
        "solver_rtol": "relative tolerance of the adjoint solve beside the schedule's absolute one "
                       "(default {default}: the schedule alone)"})
    deprecated_alias(run, "--out", "--out-dir", "out_dir")
    deprecated_alias(run, "--max-time", "--max-minutes", "max_minutes", type=_minutes)
    deprecated_alias(run, "--max-inner-iter", "--inner-steps", "inner_steps", type=count(1))
    deprecated_alias(run, "--cg-maxiter", "--solver-maxiter", "solver_maxiter", type=count(1))


def register(subparsers: Any) -> None:
    """Add ``hyperopt`` with its ``l2`` and ``cleaning`` subcommands."""
    from bilevel.runner.flags import deprecated_alias

    from .config import DATASETS, HyperoptConfig

    d = HyperoptConfig()
    parser = subparsers.add_parser("hyperopt", help="hyperparameter optimization by implicit differentiation",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    l2 = tasks.add_parser("l2", help="per-feature L2 penalties of logistic / softmax regression")
    track_given(l2)
    l2.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    l2.add_argument("--init-penalty", type=real(0, low_open=True), default=d.init_penalty,
                    help="initial exp(lambda_j) of every feature")
    _common(l2)
    cleaning = tasks.add_parser("cleaning", help="data hyper-cleaning of MNIST with corrupted labels")
    track_given(cleaning)
    cleaning.add_argument("--corrupt", type=real(0, 1), default=d.corrupt, help="fraction of random training labels")
    deprecated_alias(cleaning, "--corruption", "--corrupt", "corrupt", type=real(0, 1))
    cleaning.add_argument("--reg", type=real(0), default=d.reg, help="L2 strength of the inner problem")
    _common(cleaning)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bilevel.runner.flags import config_from_args, run_from_args

    from .config import HyperoptConfig
    from .experiment import COMMANDS

    # the task is a subcommand, never a default: a resumed run of the other task is refused
    return run_from_args(COMMANDS[args.task], config_from_args(HyperoptConfig, args), args, compare=("task",))
