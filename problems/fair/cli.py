"""``bilevel fair``: meta-train and compare fair and unconstrained meta-learners.

Trains every requested method (the constrained ones once per fairness bound
``c``, iMAML and MAML once), evaluates each on the meta-test tasks and writes,
under ``--out-dir``: one JSON-lines log and one checkpoint per run, ``results.jsonl``
(one evaluation record per run), and ``tradeoff.png`` (accuracy against the
demographic parity gap, all methods on one figure).

Example::

    bilevel fair --dataset communities --shots 10 --c 0.0 0.02 0.05 --steps 200 --out-dir runs/fair_cc
    bilevel fair --out-dir runs/fair_cc --resume      # continue a stopped comparison, with its settings

The comparison is one run: ``metrics.jsonl`` holds every run's log records,
``final.json`` one evaluation record per run, ``tradeoff.png`` the figure. An
output folder that holds a comparison is refused unless --resume continues it or
--overwrite deletes it; --resume restores its settings from its checkpoint, and
flags given with it must match, except --device, --data-dir, --checkpoint-every,
--exact, --threads and --max-minutes. A damaged checkpoint is named with the way
out: --resume previous (the previous checkpoint, kept beside it) or --overwrite.
SIGTERM or Ctrl-C stops the comparison after a checkpoint of its last step.

Under ``torchrun --standalone --nproc_per_node N -m bilevel fair ...`` every
process trains and evaluates its shard of the tasks and rank 0 alone writes and
prints; the results are those of one process (to round-off; bitwise with --exact),
and a comparison resumes on any number of processes (see docs/distributed.md).
"""

from __future__ import annotations

import argparse

from bilevel.runner.flags import count, real, track_given

__all__ = ["register", "run_command"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from bilevel.runner.flags import add_shared_flags, deprecated_alias

    from .config import DATASETS, METHODS, FairConfig
    from .train import SOLVERS

    d = FairConfig()
    p = subparsers.add_parser("fair", help="fair meta-learning (PDFM tasks): implicit primal-dual vs baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    track_given(p)
    p.add_argument("--dataset", default=d.dataset, choices=DATASETS)
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    p.add_argument("--c", nargs="+", type=real(0), default=list(d.c),
                   help="fairness bounds for the constrained methods, in parity-gap units for every "
                        "constraint and for PDFM (default: 0 0.05 0.2)")
    p.add_argument("--constraint", default=d.constraint, choices=("dbc", "dp"),
                   help="the fair method's constraint: dbc, the score's decision boundary covariance (convex), "
                        "or dp, PDFM's probability form, a smoothed demographic parity gap (not convex: the "
                        "curvature of every saddle point is checked and indefinite ones reported; default dbc)")
    p.add_argument("--sharpness", type=real(0, low_open=True), default=d.sharpness,
                   help="k of the dp constraint's sigmoid(k s): 1 is PDFM's, larger is closer to the hard "
                        "parity gap (default 1)")
    p.add_argument("--shots", type=count(1), default=d.shots, help="support rows per task (default %(default)s)")
    p.add_argument("--queries", type=count(1), default=d.queries,
                   help="query rows per training task (default %(default)s)")
    deprecated_alias(p, "--k-shot", "--shots", "shots", type=count(1))
    deprecated_alias(p, "--n-query", "--queries", "queries", type=count(1))
    p.add_argument("--meta-batch", type=count(1), default=d.meta_batch)
    p.add_argument("--meta-lr", type=real(0, low_open=True), default=d.meta_lr)
    p.add_argument("--prox", type=real(0, low_open=True), default=d.prox, help="primal prox strength (fair, iMAML)")
    p.add_argument("--mu", type=real(0, low_open=True), default=d.mu, help="dual prox strength (fair)")
    p.add_argument("--delta", type=real(0, low_open=True), default=d.delta,
                   help="smoothing width of |gap| in the fair constraint, in gap units (default 0.01)")
    p.add_argument("--constraint-set", default=d.constraint_set, choices=("support", "task"),
                   help="rows the constrained methods (fair, PDFM) evaluate their fairness constraint on "
                        "while adapting: the labelled support rows (default), or the support rows and the "
                        "query inputs (transductive: x and z only, the query labels stay unseen)")
    p.add_argument("--outer-fair-weight", type=real(0), default=d.outer_fair_weight,
                   help="weight of the query constraint violation in the fair outer loss (default 1)")
    p.add_argument("--newton-steps", type=count(1), default=d.newton_steps,
                   help="damped Newton iterations of the fair saddle-point solve (default %(default)s)")
    p.add_argument("--episodes", type=count(1), default=d.episodes, help="evaluation episodes per meta-test task")
    p.add_argument("--test-fraction", type=real(0, 1, low_open=True, high_open=True), default=d.test_fraction,
                   help="share of tasks held out for meta-test")
    p.add_argument("--exact", action="store_true",
                   help="compute each task alone and average the per-task meta-gradients in task order: the "
                        "same results bitwise on any number of processes (torchrun), at some cost in speed")
    run = add_shared_flags(p, FairConfig, solvers=SOLVERS, help={
        "steps": "meta-training steps per run (default {default})",
        "checkpoint_every": "meta-steps between checkpoints (default {default})",
        "log_every": "meta-steps between the log records of each run (default {default})",
        "inner_steps": "Nesterov iterations of the iMAML inner solve (default {default})",
        "solver": "adjoint solver of the fair method (default minres; cg reports negative curvature)",
        "solver_maxiter": "iteration cap of the fair method's adjoint solve (default: 50 for minres and gmres, "
                          "the solver's own otherwise)",
        "solver_rtol": "relative tolerance of the fair method's adjoint solve (default: 1e-8 for minres and "
                       "gmres, the solver's own otherwise)"})
    deprecated_alias(run, "--out", "--out-dir", "out_dir")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from bilevel.runner.flags import config_from_args, run_from_args

    from .comparison import COMMAND
    from .config import FairConfig

    return run_from_args(COMMAND, config_from_args(FairConfig, args), args)
