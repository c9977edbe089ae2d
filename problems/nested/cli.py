"""``bilevel nested``: NestedMAML and its baselines on task pools with corrupted training tasks.

Examples::

    bilevel nested --method nested --corrupt 0.5 --seed 0 --out-dir runs/nested/nested-0
    bilevel nested --method maml --corrupt 0.5 --seed 0 --out-dir runs/nested/maml-0
    bilevel nested --out-dir runs/nested/nested-0 --resume --steps 2000   # continue, with the run's settings
    bilevel nested --dataset omniglot --method nested --out-dir runs/nested/omniglot-0   # flipped query labels

Sinusoid regression (the default) or Omniglot 5-way 1-shot classification; the
settings marked per data set take that data set's default unless given.

One run trains one method (maml, imaml, uniform, oracle, lookahead, influence, nested) on one
pool; benchmarks/nested.py runs them all over seeds. An output folder that holds
a run is refused unless --resume continues it or --overwrite deletes it; --resume
restores the run's settings from its checkpoint (flags given with it must match,
except --steps, --log-every, --checkpoint-every, --max-minutes, --device, --data-dir
and --threads). SIGTERM or Ctrl-C stops the run after a checkpoint of its last step.
"""

from __future__ import annotations

import argparse
from typing import Any

from bilevel.runner.flags import count, real, track_given


def register(subparsers: Any) -> None:
    """Add the ``nested`` subcommand."""
    from bilevel.problems.imaml.omniglot import SPLITS

    from bilevel.runner.flags import add_shared_flags, deprecated_alias
    from bilevel.solvers import SOLVERS

    from .problem import WEIGHTINGS
    from .tasks import CORRUPTIONS
    from .train import DATASET_DEFAULTS, DATASETS, METHODS, NestedConfig

    d = NestedConfig()

    def per_dataset(name: str) -> str:
        return "(default: " + ", ".join(f"{k} {v[name]}" for k, v in DATASET_DEFAULTS.items()) + ")"

    parser = subparsers.add_parser("nested", help="NestedMAML: learn which training tasks to trust",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    track_given(parser)
    parser.add_argument("--method", choices=METHODS, default=d.method, help="(default: %(default)s)")
    data = parser.add_argument_group("tasks")
    data.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                      help="sinusoid regression or Omniglot classification (default: %(default)s)")
    data.add_argument("--corrupt", type=real(0, 1, high_open=True), default=d.corrupt,
                      help="fraction of corrupted training tasks (default: %(default)s)")
    data.add_argument("--corruption", choices=CORRUPTIONS, default=d.corruption,
                      help="how a corrupted task is corrupted (default: %(default)s)")
    data.add_argument("--sigma", type=real(0), default=d.sigma, help="noise of a corrupted task (default: %(default)s)")
    data.add_argument("--train-tasks", type=count(2), default=None,
                      help="training pool size " + per_dataset("train_tasks"))
    data.add_argument("--val-tasks", type=count(1), default=d.val_tasks, help="clean validation tasks")
    data.add_argument("--test-tasks", type=count(2), default=None, help="clean test tasks " + per_dataset("test_tasks"))
    data.add_argument("--shots", type=count(1), default=None,
                      help="support points per task (Omniglot: per class) " + per_dataset("shots"))
    data.add_argument("--queries", type=count(1), default=None,
                      help="query points per task (Omniglot: per class) " + per_dataset("queries"))
    data.add_argument("--ways", type=count(2), default=d.ways, help="Omniglot: classes per task (default: %(default)s)")
    data.add_argument("--channels", type=count(1), default=d.channels,
                      help="Omniglot: channels of the convolutional network (default: %(default)s)")
    data.add_argument("--split", choices=SPLITS, default=d.split,
                      help="Omniglot: meta-train/meta-test characters (default: %(default)s)")
    data.add_argument("--cache-dir", default=None, help="Omniglot: folder of the decoded-image cache")
    algo = parser.add_argument_group("algorithm")
    algo.add_argument("--lam", type=real(0, low_open=True), default=None,
                      help="iMAML's proximal strength " + per_dataset("lam"))
    algo.add_argument("--inner-lr", type=real(0, low_open=True), default=None,
                      help="first Armijo trial step (iMAML), fixed step (MAML) " + per_dataset("inner_lr"))
    algo.add_argument("--inner-tol", type=real(0), default=d.inner_tol,
                      help="a task whose inner gradient norm is at most this stops moving")
    algo.add_argument("--maml-inner-steps", type=count(1), default=None,
                      help="MAML's plain inner steps of --inner-lr " + per_dataset("maml_inner_steps"))
    algo.add_argument("--mu", type=real(0), default=d.mu, help="L2 strength of the middle level")
    algo.add_argument("--meta-lr", type=real(0, low_open=True), default=None,
                      help="Adam step on theta " + per_dataset("meta_lr"))
    algo.add_argument("--meta-batch", type=count(1), default=None,
                      help="tasks drawn from the pool per step, the oracle's from its clean tasks (default: "
                           "sinusoid the whole pool, omniglot 8)")
    algo.add_argument("--weighting", choices=WEIGHTINGS, default=d.weighting,
                      help="w = N softmax(u) or w = 2 sigmoid(u) (default: %(default)s)")
    algo.add_argument("--weight-lr", type=real(0, low_open=True), default=d.weight_lr, help="Adam step on u")
    algo.add_argument("--weight-decay", type=real(0), default=d.weight_decay,
                      help="L2 pull of u towards 0 (uniform weights) in its Adam steps (default: %(default)s)")
    algo.add_argument("--weight-every", type=count(1), default=d.weight_every, help="theta-steps per u-step")
    algo.add_argument("--weight-start", type=count(0), default=None,
                      help="theta-steps before the first weight update (default: nested 50, influence 0)")
    algo.add_argument("--outer-solver-steps", type=count(1), default=d.outer_solver_steps,
                      help="GMRES iterations of the outer hypergradient's adjoint solve")
    algo.add_argument("--outer-ridge", type=real(0), default=d.outer_ridge,
                      help="ridge added to the middle level's Jacobian in the outer adjoint solve")
    run = add_shared_flags(parser, NestedConfig, solvers=SOLVERS, help={
        "data_dir": "Omniglot: folder of the archives (bilevel.runner.datadir)",
        "seed": "seed of the pools and the initialization (default {default})",
        "steps": "meta-steps " + per_dataset("steps"),
        "inner_steps": "Armijo steps of the adaptation " + per_dataset("inner_steps"),
        "solver": "linear solver of each task's meta-gradient (default {default})",
        "solver_maxiter": "iteration cap of each task's meta-gradient solve (default {default})",
        "solver_rtol": "relative residual at which a task's meta-gradient solve stops (default {default})"})
    deprecated_alias(run, "--solver-steps", "--solver-maxiter", "solver_maxiter", type=count(1))
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from bilevel.runner.flags import config_from_args, run_from_args

    from .train import COMMAND, NestedConfig

    return run_from_args(COMMAND, config_from_args(NestedConfig, args), args)
