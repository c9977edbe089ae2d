"""``bilevel imaml``: meta-train iMAML (or MAML, FOMAML) on sinusoid regression or Omniglot.

Examples::

    bilevel imaml                                   # sinusoid, a few minutes on a laptop CPU
    bilevel imaml --dataset omniglot --ways 5 --shots 1 --data-dir ~/data/omniglot --device cuda
    bilevel imaml --dataset omniglot --mode unrolled  # MAML through the same problem
    bilevel imaml --out-dir runs/imaml --resume       # continue a stopped run
"""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from bilevel.problems.imaml.config import DATASETS, MODES, SOLVERS, SPLITS, Config

    defaults = Config()
    p = subparsers.add_parser("imaml", help="few-shot meta-learning with implicit meta-gradients (iMAML)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    p.add_argument("--ways", type=int, default=defaults.ways, help="classes per Omniglot task (default 5)")
    p.add_argument("--split", choices=SPLITS, default=defaults.split,
                   help="Omniglot meta-test characters: the official runs' ten alphabets (default, unseen "
                        "alphabets) or a random 423 of all characters (the MAML/iMAML code's convention)")
    p.add_argument("--channels", type=int, default=defaults.channels, help="filters per conv layer (default 64)")
    p.add_argument("--shots", type=int, help="support examples per class (default 1; sinusoid: 10 points)")
    p.add_argument("--queries", type=int, help="query examples per class (default 5; sinusoid: 10 points)")
    p.add_argument("--mode", choices=MODES, default=defaults.mode,
                   help="implicit = iMAML, unrolled = MAML, first_order = FOMAML (default implicit)")
    p.add_argument("--solver", choices=sorted(SOLVERS), default=defaults.solver,
                   help="linear solver for (I + H/lam) (default cg; minres handles indefinite systems)")
    p.add_argument("--cg-steps", type=int, default=defaults.cg_steps, help="solver iterations (default 5)")
    p.add_argument("--damping", type=float, default=defaults.damping,
                   help="add damping * I to H + lam I in the adjoint solve (default 0)")
    p.add_argument("--lam", type=float, help="proximal strength (default 2 on Omniglot, 1 on sinusoid; "
                                             "0 for unrolled/first_order)")
    p.add_argument("--inner-lr", type=float, help="inner step size (default 0.1 Omniglot, 0.02 sinusoid)")
    p.add_argument("--inner-steps", type=int, help="inner steps (default 16 for 5-way, 25 for 20-way, 40 sinusoid)")
    p.add_argument("--inner-optimizer", choices=("gd", "nesterov"), default=defaults.inner_optimizer)
    p.add_argument("--prox-schedule", choices=("every_step", "last_step"), default=defaults.prox_schedule,
                   help="proximal term in every inner step (the formula, default) or one proximal step after "
                        "plain steps on the support loss (the paper's reference code)")
    p.add_argument("--meta-batch", type=int, help="tasks per meta-step (default 32 Omniglot, 25 sinusoid)")
    p.add_argument("--chunk-size", type=int,
                   help="tasks batched per vmap call (default: the whole meta-batch); smaller chunks hold "
                        "fewer tasks' activations at once, 1 is a loop over tasks")
    p.add_argument("--meta-lr", type=float, default=defaults.meta_lr, help="Adam step (default 1e-3)")
    p.add_argument("--steps", type=int, help="meta-steps (default 1000 sinusoid, 30000 Omniglot)")
    p.add_argument("--max-minutes", type=float,
                   help="stop meta-training after this wall-clock time (checkpointed, then the final evaluation)")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-tasks", type=int, default=defaults.eval_tasks, help="held-out tasks per evaluation")
    p.add_argument("--final-tasks", type=int, default=defaults.final_tasks, help="held-out tasks at the end")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--eval-lam", type=float,
                   help="proximal strength of the adaptation at evaluation (default: --lam; 0 adapts by plain "
                        "inner steps, as the paper's reference code does at test time)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each meta-gradient as one captured CUDA graph (faster on small networks)")
    p.add_argument("--out-dir", default=defaults.out_dir, help="metrics, checkpoint and plots (default runs/imaml)")
    p.add_argument("--data-dir", help="folder with the Omniglot zips (default $BILEVEL_DATA_DIR)")
    p.add_argument("--cache-dir", help="decoded-image cache (default $BILEVEL_CACHE_DIR or ~/.cache/bilevel)")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from bilevel.problems.imaml.config import Config
    from bilevel.problems.imaml.train import train

    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in vars(args).items() if k in fields})
    final = train(config, resume=args.resume)
    print(json.dumps(final["test"], indent=2))
    if "official_runs" in final:
        print(f"official 20-way one-shot runs: accuracy {final['official_runs']['accuracy']:.4f}")
    return 0
