"""``bilevel fair``: meta-train and compare fair and unconstrained meta-learners.

Trains every requested method (the constrained ones once per fairness bound
``c``, iMAML and MAML once), evaluates each on the meta-test tasks and writes,
under ``--out-dir``: one JSON-lines log and one checkpoint per run, ``results.jsonl``
(one evaluation record per run), and ``tradeoff.png`` (accuracy against the
demographic parity gap, all methods on one figure).

Example::

    bilevel fair --dataset communities --k-shot 10 --c 0.0 0.02 0.05 --steps 200 --out-dir runs/fair_cc
    bilevel fair --out-dir runs/fair_cc --resume      # continue a stopped comparison, with its settings

An output folder that holds a comparison is refused unless --resume continues it
or --overwrite deletes it. The settings are kept in ``<out-dir>/run.pt``; --resume
restores them, and flags given with it must match, except --device, --data-dir,
--checkpoint-every, --exact and --no-progress. Finished runs are taken from
``results.jsonl``, the others continue from their checkpoints. A damaged
checkpoint is named with the way out: --resume previous (the previous
checkpoints, kept beside them) or --overwrite.

Under ``torchrun --standalone --nproc_per_node N -m bilevel fair ...`` every
process trains and evaluates its shard of the tasks and rank 0 alone writes and
prints; the results are those of one process (to round-off; bitwise with --exact),
and a comparison resumes on any number of processes (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bilevel.runs import add_run_flags, count, real, track_given

__all__ = ["register", "run", "SETTINGS", "RESUMABLE"]

SETTINGS = "run.pt"
"""The comparison's settings, written (as a checkpoint) before its first run starts."""
RESUMABLE = ("device", "data_dir", "no_progress", "checkpoint_every", "exact")
"""Settings that may change when a comparison is resumed; the others must match ``run.pt``."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fair", help="fair meta-learning (PDFM tasks): implicit primal-dual vs baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    track_given(p)
    p.add_argument("--dataset", default="communities", choices=("communities", "lsac", "adult", "bank", "compas"))
    p.add_argument("--methods", nargs="+", default=["fair", "imaml", "maml", "pdfm"],
                   choices=("fair", "imaml", "maml", "pdfm"))
    p.add_argument("--c", nargs="+", type=real(0), default=[0.0, 0.05, 0.2],
                   help="fairness bounds for the constrained methods, in parity-gap units for every "
                        "constraint and for PDFM (default: 0 0.05 0.2)")
    p.add_argument("--constraint", default="dbc", choices=("dbc", "dp"),
                   help="the fair method's constraint: dbc, the score's decision boundary covariance (convex), "
                        "or dp, PDFM's probability form, a smoothed demographic parity gap (not convex: the "
                        "curvature of every saddle point is checked and indefinite ones reported; default dbc)")
    p.add_argument("--sharpness", type=real(0, low_open=True), default=1.0,
                   help="k of the dp constraint's sigmoid(k s): 1 is PDFM's, larger is closer to the hard "
                        "parity gap (default 1)")
    p.add_argument("--k-shot", type=count(1), default=10, help="support rows per task (default 10)")
    p.add_argument("--n-query", type=count(1), default=10, help="query rows per training task (default 10)")
    p.add_argument("--meta-batch", type=count(1), default=8)
    p.add_argument("--steps", type=count(1), default=100, help="meta-training steps per run (default 100)")
    p.add_argument("--meta-lr", type=real(0, low_open=True), default=0.01)
    p.add_argument("--prox", type=real(0, low_open=True), default=1.0, help="primal prox strength (fair, iMAML)")
    p.add_argument("--mu", type=real(0, low_open=True), default=1.0, help="dual prox strength (fair)")
    p.add_argument("--delta", type=real(0, low_open=True), default=0.01,
                   help="smoothing width of |gap| in the fair constraint, in gap units (default 0.01)")
    p.add_argument("--constraint-set", default="support", choices=("support", "task"),
                   help="rows the constrained methods (fair, PDFM) evaluate their fairness constraint on "
                        "while adapting: the labelled support rows (default), or the support rows and the "
                        "query inputs (transductive: x and z only, the query labels stay unseen)")
    p.add_argument("--outer-fair-weight", type=real(0), default=1.0,
                   help="weight of the query constraint violation in the fair outer loss (default 1)")
    p.add_argument("--inner-steps", type=count(1), default=150,
                   help="Nesterov iterations of the iMAML inner solve (default 150)")
    p.add_argument("--newton-steps", type=count(1), default=30,
                   help="damped Newton iterations of the fair saddle-point solve (default 30)")
    p.add_argument("--solver", default="minres", choices=("minres", "gmres", "direct", "cg"),
                   help="adjoint solver of the fair method (default minres; cg reports negative curvature)")
    p.add_argument("--checkpoint-every", type=count(1), default=50,
                   help="meta-steps between the checkpoints of each run (default 50)")
    p.add_argument("--episodes", type=count(1), default=20, help="evaluation episodes per meta-test task")
    p.add_argument("--test-fraction", type=real(0, 1, low_open=True, high_open=True), default=0.3,
                   help="share of tasks held out for meta-test")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $BILEVEL_DATA_DIR, else the nearest "
                        "shared/data in the current folder or above, else ~/.cache/bilevel/data)")
    p.add_argument("--out-dir", dest="out", default="runs/fair", help="output folder (default runs/fair)")
    p.add_argument("--out", dest="out", default="runs/fair", help=argparse.SUPPRESS)  # deprecated spelling
    add_run_flags(p, "the checkpoints in --out")
    p.add_argument("--exact", action="store_true",
                   help="compute each task alone and average the per-task meta-gradients in task order: the "
                        "same results bitwise on any number of processes (torchrun), at some cost in speed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bilevel import distributed
    from bilevel.checkpoint import file_patterns, load_for_resume
    from bilevel.checkpoint import save as save_checkpoint
    from bilevel.devices import resolve_device
    from bilevel.runs import given_flags, output_patterns, prepare_output, read_records, restore, settings_of
    from bilevel.runs import write_records

    from .data import load_tasks, split_tasks, to_device
    from .plot import tradeoff_plot
    from .train import METHODS, Config, evaluate, run_patterns, train

    if given_flags(args).get("out") == "--out":
        print("bilevel fair: --out is deprecated; use --out-dir", file=sys.stderr)
    out = Path(args.out)
    settings = settings_of(args)
    if args.resume:  # the comparison's settings, with the flags given on top
        saved = load_for_resume(out / SETTINGS, map_location="cpu")["settings"]
        settings = restore(saved, settings, given_flags(args), RESUMABLE, out)
    args = argparse.Namespace(**settings)  # the restored settings from here on
    device = resolve_device(args.device)
    ctx = distributed.init(device)  # under torchrun: each rank trains its shard, rank 0 writes
    device = ctx.device  # on CUDA, this rank's GPU
    tasks = load_tasks(args.dataset, args.data_dir, min_rows=args.k_shot + args.n_query)
    train_tasks, test_tasks = (to_device(part, device) for part in split_tasks(tasks, args.test_fraction, args.seed))
    patterns = (*file_patterns(SETTINGS), *output_patterns("results.jsonl", "tradeoff.png"),
                *(pattern for m in METHODS for tag in (m, f"{m}_c*") for pattern in run_patterns(tag)))
    if ctx.is_main:
        prepare_output(out, patterns, resume=bool(args.resume), overwrite=args.overwrite)
        if not args.resume:  # before any run starts, so that every comparison folder can be resumed
            save_checkpoint({"settings": {k: v for k, v in settings.items()
                                          if k not in ("out", "resume", "overwrite")}}, out / SETTINGS)
        where = f"{ctx.world_size} processes" if ctx.distributed else str(device)
        print(f"{args.dataset}: {len(train_tasks)} meta-train tasks, {len(test_tasks)} meta-test tasks, "
              f"{tasks[0].x.shape[1]} features, on {where}")
    ctx.barrier()
    results_path = out / "results.jsonl"
    done = {}
    if args.resume:  # finished runs; a record cut short by a kill is dropped (its run is evaluated again)
        done = {rec["run"]: rec for rec in read_records(results_path)}
        if ctx.is_main:
            write_records(results_path, done.values())
    records = []
    for method in args.methods:
        for c in (args.c if method in ("fair", "pdfm") else [None]):
            cfg = Config(method=method, c=c if c is not None else 0.0, k_shot=args.k_shot, n_query=args.n_query,
                         meta_batch=args.meta_batch, steps=args.steps, meta_lr=args.meta_lr, prox=args.prox,
                         mu=args.mu, delta=args.delta, constraint_set=args.constraint_set,
                         constraint=args.constraint, sharpness=args.sharpness,
                         outer_fair_weight=args.outer_fair_weight, inner_steps=args.inner_steps,
                         newton_steps=args.newton_steps, solver=args.solver, seed=args.seed,
                         ckpt_every=args.checkpoint_every)
            tag = method if c is None else f"{method}_c{c:g}"
            if tag in done:
                records.append(done[tag])
                continue
            outer = train(cfg, train_tasks, out, resume=args.resume or False, progress=not args.no_progress,
                          tag=tag, ctx=ctx, exact=args.exact)
            ev = evaluate(cfg, outer, test_tasks, episodes=args.episodes, seed=args.seed + 1, ctx=ctx,
                          exact=args.exact)
            rec = {"run": tag, "dataset": args.dataset, "method": method, "c": c, "k_shot": args.k_shot,
                   "steps": args.steps, **ev}
            records.append(rec)
            if not ctx.is_main:
                continue
            with open(results_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            s = ev["summary"]
            print(f"{tag:>14}: accuracy {s['accuracy']['mean']:.3f} +- {s['accuracy']['ci95']:.3f}  "
                  f"parity gap {s['parity_gap']['mean']:.3f} +- {s['parity_gap']['ci95']:.3f} "
                  f"(null {s['null_gap']['mean']:.3f}, {s['parity_gap']['nan']} episodes without both groups)  "
                  f"soft gap {s['soft_gap']['mean']:.3f}  DBC {s['dbc']['mean']:.4f}  "
                  f"consistency {s['consistency']['mean']:.3f}")
            if ev["indefinite"]["count"]:
                print(f"{tag:>14}: {ev['indefinite']['count']} of {ev['indefinite']['of']} adapted saddle points "
                      "are indefinite in w (raise --prox)")
    if ctx.is_main:
        tradeoff_plot(records, out / "tradeoff.png", title=f"{args.dataset}, {args.k_shot}-shot")
        print(f"wrote {results_path} and {out / 'tradeoff.png'}")
    ctx.barrier()
    return 0
