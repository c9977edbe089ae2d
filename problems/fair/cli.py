"""``bilevel fair``: meta-train and compare fair and unconstrained meta-learners.

Trains every requested method (the constrained ones once per fairness bound
``c``, iMAML and MAML once), evaluates each on the meta-test tasks and writes,
under ``--out``: one JSON-lines log and one checkpoint per run, ``results.jsonl``
(one evaluation record per run), and ``tradeoff.png`` (accuracy against the
demographic parity gap, all methods on one figure).

Example::

    bilevel fair --dataset communities --k-shot 10 --c 0.0 0.02 0.05 --steps 200 --out runs/fair_cc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fair", help="fair meta-learning (PDFM tasks): implicit primal-dual vs baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="communities", choices=("communities", "lsac", "adult", "bank", "compas"))
    p.add_argument("--methods", nargs="+", default=["fair", "imaml", "maml", "pdfm"],
                   choices=("fair", "imaml", "maml", "pdfm"))
    p.add_argument("--c", nargs="+", type=float, default=[0.0, 0.05, 0.2],
                   help="fairness bounds for the constrained methods (default: 0 0.05 0.2)")
    p.add_argument("--k-shot", type=int, default=10, help="support rows per task (default 10)")
    p.add_argument("--n-query", type=int, default=10, help="query rows per training task (default 10)")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100, help="meta-training steps per run (default 100)")
    p.add_argument("--meta-lr", type=float, default=0.01)
    p.add_argument("--prox", type=float, default=1.0, help="primal prox strength (fair, iMAML)")
    p.add_argument("--mu", type=float, default=1.0, help="dual prox strength (fair)")
    p.add_argument("--delta", type=float, default=0.1, help="smoothing width of |DBC| (fair, default 0.1)")
    p.add_argument("--constraint-set", default="support", choices=("support", "task"),
                   help="rows the constrained methods (fair, PDFM) evaluate their fairness constraint on "
                        "while adapting: the labelled support rows (default), or the support rows and the "
                        "query inputs (transductive: x and z only, the query labels stay unseen)")
    p.add_argument("--outer-fair-weight", type=float, default=1.0,
                   help="weight of the query constraint violation in the fair outer loss (default 1)")
    p.add_argument("--inner-steps", type=int, default=150,
                   help="Nesterov iterations of the iMAML inner solve (default 150)")
    p.add_argument("--newton-steps", type=int, default=30,
                   help="damped Newton iterations of the fair saddle-point solve (default 30)")
    p.add_argument("--solver", default="minres", choices=("minres", "gmres", "direct", "cg"),
                   help="adjoint solver of the fair method (default minres; cg reports negative curvature)")
    p.add_argument("--episodes", type=int, default=20, help="evaluation episodes per meta-test task")
    p.add_argument("--test-fraction", type=float, default=0.3, help="share of tasks held out for meta-test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $BILEVEL_DATA_DIR or ../shared/data)")
    p.add_argument("--out", default="runs/fair", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bilevel.devices import resolve_device

    from .data import load_tasks, split_tasks, to_device
    from .plot import tradeoff_plot
    from .train import Config, evaluate, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks(args.dataset, args.data_dir, min_rows=args.k_shot + args.n_query)
    device = resolve_device(args.device)
    train_tasks, test_tasks = (to_device(part, device) for part in split_tasks(tasks, args.test_fraction, args.seed))
    print(f"{args.dataset}: {len(train_tasks)} meta-train tasks, {len(test_tasks)} meta-test tasks, "
          f"{tasks[0].x.shape[1]} features, on {device}")
    results_path = out / "results.jsonl"
    done = {}
    if args.resume and results_path.exists():
        for line in results_path.read_text().splitlines():
            rec = json.loads(line)
            done[rec["run"]] = rec
    records = []
    for method in args.methods:
        for c in (args.c if method in ("fair", "pdfm") else [None]):
            cfg = Config(method=method, c=c if c is not None else 0.0, k_shot=args.k_shot, n_query=args.n_query,
                         meta_batch=args.meta_batch, steps=args.steps, meta_lr=args.meta_lr, prox=args.prox,
                         mu=args.mu, delta=args.delta, constraint_set=args.constraint_set,
                         outer_fair_weight=args.outer_fair_weight, inner_steps=args.inner_steps,
                         newton_steps=args.newton_steps,
                         solver=args.solver, seed=args.seed)
            tag = method if c is None else f"{method}_c{c:g}"
            if tag in done:
                records.append(done[tag])
                continue
            outer = train(cfg, train_tasks, out, resume=args.resume, progress=not args.no_progress, tag=tag)
            ev = evaluate(cfg, outer, test_tasks, episodes=args.episodes, seed=args.seed + 1)
            rec = {"run": tag, "dataset": args.dataset, "method": method, "c": c, "k_shot": args.k_shot,
                   "steps": args.steps, **ev}
            records.append(rec)
            with open(results_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            s = ev["summary"]
            print(f"{tag:>14}: accuracy {s['accuracy']['mean']:.3f} +- {s['accuracy']['ci95']:.3f}  "
                  f"parity gap {s['parity_gap']['mean']:.3f} +- {s['parity_gap']['ci95']:.3f}  "
                  f"DBC {s['dbc']['mean']:.4f}  consistency {s['consistency']['mean']:.3f}")
    tradeoff_plot(records, out / "tradeoff.png", title=f"{args.dataset}, {args.k_shot}-shot")
    print(f"wrote {results_path} and {out / 'tradeoff.png'}")
    return 0
