"""``bilevel imaml``: meta-train iMAML (or MAML, FOMAML) on sinusoid regression or Omniglot.

Examples::

    bilevel imaml                                   # sinusoid, a few minutes on a laptop CPU
    bilevel imaml --dataset omniglot --ways 5 --shots 1 --data-dir ~/data/omniglot --device cuda
    bilevel imaml --dataset omniglot --mode unrolled  # MAML through the same problem
    bilevel imaml --out-dir runs/imaml --resume       # continue a stopped run, with its settings

An output folder that holds a run is refused unless --resume continues it or
--overwrite deletes it. --resume restores the run's settings from its
checkpoint; flags given with it must match, except the resumable ones (--steps,
--max-minutes, --device, ...). A damaged checkpoint is named with the way out:
--resume previous (the previous checkpoint, kept beside it) or --overwrite.
SIGTERM or Ctrl-C stops the run after a checkpoint of its last step.
"""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from bilevel.problems.imaml.config import (ACTIVATIONS, BASELINES, DATASETS, EVAL_BN, INNER_OPTIMIZERS,
                                               LR_SCHEDULES, MODES, SOLVERS, SPLITS, VARIANTS, Config)
    from bilevel.runner.flags import deprecated_alias
    from bilevel.runs import add_run_flags, count, real, track_given

    defaults = Config()
    p = subparsers.add_parser("imaml", help="few-shot meta-learning with implicit meta-gradients (iMAML)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    track_given(p)
    p.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    p.add_argument("--ways", type=count(1), default=defaults.ways, help="classes per Omniglot task (default 5)")
    p.add_argument("--split", choices=SPLITS, default=defaults.split,
                   help="Omniglot meta-test characters: the official runs' ten alphabets (default, unseen "
                        "alphabets) or a random 423 of all characters (the MAML/iMAML code's convention)")
    p.add_argument("--channels", type=count(1), default=defaults.channels,
                   help="filters per conv layer (default 64)")
    p.add_argument("--shots", type=count(1), help="support examples per class (default 1; sinusoid: 10 points)")
    p.add_argument("--queries", type=count(1), help="query examples per class (default 5; sinusoid: 10 points)")
    p.add_argument("--mode", choices=MODES, default=defaults.mode,
                   help="implicit = iMAML, unrolled = MAML, first_order = FOMAML (default implicit)")
    p.add_argument("--solver", choices=sorted(SOLVERS), default=defaults.solver,
                   help="linear solver for (I + H/lam) (default minres on the sinusoid, which handles indefinite "
                        "systems; cg on Omniglot)")
    p.add_argument("--solver-maxiter", dest="cg_steps", type=count(1), default=defaults.cg_steps,
                   help="the adjoint solver's iterations, whichever --solver (default 20 sinusoid, 5 Omniglot)")
    for old in ("--solver-steps", "--cg-steps"):
        deprecated_alias(p, old, "--solver-maxiter", "cg_steps", type=count(1))
    p.add_argument("--solver-rtol", type=real(0, low_open=True),
                   help="the adjoint solve converges when ||b - A v|| <= rtol ||b|| (default 1e-2 sinusoid, "
                        "the solver's 1e-5 on Omniglot)")
    p.add_argument("--damping", type=real(0), default=defaults.damping,
                   help="add damping * I to H + lam I in the adjoint solve (default: 22 with --variant reference, "
                        "else 0)")
    p.add_argument("--variant", choices=sorted(VARIANTS),
                   help="reference: the paper's reference code (plain inner steps and one closing proximal step, "
                        "the adjoint system damped by 22), the Omniglot default, which trains; formula: the "
                        "proximal term in every inner step, undamped (the sinusoid default)")
    p.add_argument("--lam", type=real(0), help="proximal strength (default 2 on Omniglot, 1 on sinusoid; "
                                             "0 for unrolled/first_order)")
    p.add_argument("--inner-lr", type=real(0, low_open=True),
                   help="inner step size (default 0.1 Omniglot, 0.02 sinusoid)")
    p.add_argument("--inner-steps", type=count(1),
                   help="inner steps (default 16 for 5-way, 25 for 20-way, 20 sinusoid; 10 for MAML/FOMAML on "
                        "the sinusoid)")
    p.add_argument("--inner-optimizer", choices=INNER_OPTIMIZERS, default=defaults.inner_optimizer,
                   help="newton_cg (iMAML-HF, the sinusoid default) and lbfgs: the library's inner solvers, "
                        "at most --inner-steps iterations to --inner-tol (bilevel.solvers.minimize); armijo: "
                        "gradient descent with a per-task backtracking step that cannot diverge; gd: fixed steps "
                        "of --inner-lr (the default otherwise); nesterov")
    p.add_argument("--inner-tol", type=real(0, low_open=True),
                   help="armijo, lbfgs, newton_cg: a task whose inner gradient norm is at most this is solved "
                        "and stops (default 1e-4 sinusoid)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=defaults.activation,
                   help="the network's nonlinearity: relu (the papers', the Omniglot default) or a smooth one, "
                        "silu (the sinusoid default) or softplus, with which the proximal inner problem is "
                        "solvable to a small gradient")
    p.add_argument("--prox-schedule", choices=("every_step", "last_step"), default=defaults.prox_schedule,
                   help="proximal term in every inner step (the formula) or one proximal step after plain steps "
                        "on the support loss (the paper's reference code); default: --variant's")
    p.add_argument("--meta-batch", type=count(1), help="tasks per meta-step (default 32 Omniglot, 25 sinusoid)")
    p.add_argument("--chunk-size", type=count(1),
                   help="tasks batched per vmap call (default: the whole meta-batch); smaller chunks hold "
                        "fewer tasks' activations at once, 1 is a loop over tasks")
    p.add_argument("--exact", action="store_true",
                   help="compute each task alone and average the per-task meta-gradients in task order: the "
                        "same parameters bitwise on any number of processes (torchrun), at some cost in speed")
    p.add_argument("--meta-lr", type=real(0, low_open=True), default=defaults.meta_lr,
                   help="Adam step (default 1e-3)")
    p.add_argument("--adam-eps", type=real(0, low_open=True), default=defaults.adam_eps,
                   help="Adam's epsilon (default 1e-8; the paper's reference code uses 1e-3)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule,
                   help="constant (default) or cosine: --meta-lr decayed to 0 over --steps")
    p.add_argument("--steps", type=count(1), help="meta-steps (default 1000 sinusoid, 30000 Omniglot)")
    p.add_argument("--max-minutes", type=real(0, low_open=True),
                   help="stop meta-training after this wall-clock time (checkpointed, then the final evaluation)")
    p.add_argument("--log-every", type=count(1), default=defaults.log_every)
    p.add_argument("--eval-every", type=count(1), default=defaults.eval_every)
    p.add_argument("--eval-tasks", type=count(1), default=defaults.eval_tasks, help="held-out tasks per evaluation")
    p.add_argument("--final-tasks", type=count(1), default=defaults.final_tasks, help="held-out tasks at the end")
    p.add_argument("--checkpoint-every", type=count(1), default=defaults.checkpoint_every)
    p.add_argument("--seed", type=count(0), default=defaults.seed)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--eval-lam", type=real(0),
                   help="proximal strength of the adaptation at evaluation (default: --lam; 0 adapts by plain "
                        "inner steps, as the paper's reference code does at test time)")
    p.add_argument("--eval-queries", type=count(1),
                   help="queries per class in evaluation tasks (default --queries; the reference code tests with 1)")
    p.add_argument("--eval-bn", choices=EVAL_BN,
                   help="balanced: score evaluation queries in groups of --shots per class, so that batch norm "
                        "sees batches like the support set (Omniglot default); queries: all queries at once")
    p.add_argument("--eval-rotations", action="store_true",
                   help="evaluation tasks also draw rotated test classes (90, 180, 270 degrees), as the reference "
                        "code does")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each meta-gradient as one captured CUDA graph (faster on small networks)")
    p.add_argument("--out-dir", default=defaults.out_dir, help="metrics, checkpoint and plots (default runs/imaml)")
    p.add_argument("--data-dir", help="folder with the Omniglot zips (default: $BILEVEL_DATA_DIR, else the nearest "
                                      "shared/data in the current folder or above, else ~/.cache/bilevel/data)")
    p.add_argument("--cache-dir", help="decoded-image cache (default $BILEVEL_CACHE_DIR or ~/.cache/bilevel)")
    add_run_flags(p, "<out-dir>/checkpoint.pt")
    p.add_argument("--baseline", choices=BASELINES,
                   help="also meta-train MAML at its usual setting (10 inner steps, lam 0) with the same tasks, in "
                        "<out-dir>/baseline_maml, and compare (default: maml for the sinusoid iMAML job)")
    p.add_argument("--spike-factor", type=real(1, low_open=True), default=defaults.spike_factor,
                   help="warn when a step's query loss exceeds this times its running median (default 10)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--threads", type=count(1), help="torch CPU threads (default: torch's)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the logged metrics for TensorBoard, in <out-dir>/tensorboard (needs the "
                        "tensorboard package)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from bilevel.devices import resolve_device
    from bilevel.problems.imaml.config import Config
    from bilevel.problems.imaml.job import run_job
    from bilevel.runs import given_flags, settings_of

    fields = {f.name for f in dataclasses.fields(Config)}
    settings = {**Config().to_dict(), **{k: v for k, v in settings_of(args).items() if k in fields}}
    if settings["device"] is None:  # without --device: a new run takes cuda when available; --resume the run's
        settings["device"] = str(resolve_device(None))
    if settings["threads"] is not None:
        torch.set_num_threads(settings["threads"])
    given = given_flags(args)
    run_job(Config(**settings), resume=args.resume or False, overwrite=args.overwrite, given=given, report=True,
            tensorboard=args.tensorboard)
    return 0
