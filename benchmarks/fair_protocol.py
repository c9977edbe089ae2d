"""The fair meta-learning protocol: every method on identical episodes, fronts, matched-gap accuracy.

For each data set, shot count, task split and meta-training seed (a *unit*),
every method is meta-trained on the split's meta-train tasks and evaluated on
the same episodes of its meta-test tasks (``k_shot`` support rows, every other
row of the task scored; the episodes depend only on the split). Tasks are kept
with at least ``--min-group`` rows in each sensitive group (10 on Communities,
20 elsewhere by default). Methods:

- ``ours-dbc``, ``ours-dp``: :class:`~bilevel.problems.fair.problem.FairMetaProblem` with the score
  covariance or PDFM's probability constraint, implicit meta-gradient, over a sweep of ``c``;
- ``pdfm``: PDFM (Zhao et al., ICDM 2020) re-implemented as published, first-order, same ``c`` sweep
  (``c`` is in parity-gap units for every method);
- ``imaml``, ``maml``: unconstrained;
- ``mix``: iMAML mixed at random with the constant predictor of the support's majority label
  (with probability ``q``: accuracy ``(1 - q) a + q a_const``, gap ``(1 - q) g``, a straight line);
- ``tt-dbc``, ``tt-dp``: iMAML's initialization adapted under the constraint at test time only
  (no fairness meta-learning), same ``c`` sweep.

Constrained methods evaluate their constraint on ``--constraint-set`` (default ``task``: support rows
and the task's unlabelled inputs, the same for every method). A unit's value of a metric is the mean
over its meta-test tasks of the per-task mean over episodes; NaN episodes (a query without one of the
groups) are counted and reported. Fronts use the hard parity gap. A method's accuracy at gap ``g`` is
the best accuracy that randomly mixing two of its points, or one of them and the constant predictor
(gap 0), reaches with gap ``<= g`` (each mixture's accuracy and group rates are linear in the mixing
weight, so its gap is at most the linear interpolation); every front thus reaches every gap, and the
smallest gap a method reaches by itself is reported beside it. Per unit, matched gaps are 75% and 50% of iMAML's
gap; the area between a front and the mixing line is ``(1/g0) int (front - mix) dg`` over ``[0, g0]``
where the front is defined (``g0``: iMAML's gap; in accuracy points). Intervals are Student-t 95%
intervals over the units; differences between methods are paired by unit.

Prints Markdown tables, appends one JSON line per (unit, method, c) to ``--out`` and one per
(data set, shot) summary to ``--summary``, and draws one figure per data set (``--plot-dir``)::

    python benchmarks/fair_protocol.py --datasets communities adult bank compas --shots 10 \\
        --seeds 0 1 --splits 0 1 --steps 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bilevel.problems.fair.data import load_tasks, split_tasks
from bilevel.problems.fair.metrics import METRICS, mean_ci
from bilevel.errors import ConvergenceWarning
from bilevel.problems.fair.problem import IndefiniteWarning
from bilevel.problems.fair.train import Config, evaluate, train

MIN_GROUP = {"communities": 10, "lsac": 20, "adult": 20, "bank": 20, "compas": 20}
FRONTS = ("ours-dbc", "ours-dp", "ours", "pdfm", "tt-dbc", "tt-dp", "maml")


def unit_means(ev: dict) -> dict[str, float]:
    """Per metric, the mean over tasks of the per-task mean over episodes (NaN episodes left out);
    ``"nan_episodes"``: how many episodes had no parity gap (a group missing from the query)."""
    tasks = ev["episodes"].values()
    out = {m: float(np.mean([np.nanmean(t[m]) for t in tasks])) for m in (*METRICS, "constant_accuracy")}
    out["nan_episodes"] = int(sum(np.isnan(t["parity_gap"]).sum() for t in tasks))
    out["episodes"] = int(sum(len(t["accuracy"]) for t in tasks))
    return out


def accuracy_at(points: list[tuple[float, float]], g: float) -> float:
    """Best accuracy of a random mixture of two of ``points`` ``(gap, accuracy)`` with gap ``<= g``
    (callers include the constant predictor's point ``(0, a_const)``)."""
    best = math.nan
    for gi, ai in points:
        if gi <= g:
            best = ai if math.isnan(best) else max(best, ai)
            for gj, aj in points:
                if gj > g:  # mix i and j so that the interpolated gap is exactly g
                    t = (g - gi) / (gj - gi)
                    best = max(best, ai + t * (aj - ai))
    return best


def area_over_mix(points: list[tuple[float, float]], g0: float, a0: float, a_const: float, grid: int = 101) -> float:
    """``(1/g0) int_0^g0 (front(g) - mix(g)) dg`` over the gaps where the front is defined (trapezoids)."""
    points = [*points, (0.0, a_const)]
    gs = np.linspace(0.0, g0, grid)
    diff = np.array([accuracy_at(points, g) - (a_const + (a0 - a_const) * g / g0) for g in gs])
    ok = ~np.isnan(diff)
    if ok.sum() < 2:
        return math.nan
    return float(np.trapezoid(diff[ok], gs[ok]) / g0)


def run_unit(dataset: str, shot: int, split: int, seed: int, train_tasks, test_tasks, args) -> list[dict]:
    """Every method on one unit; one record per (method, c) with its unit means."""
    base = dict(k_shot=shot, n_query=args.n_query, meta_batch=args.meta_batch, steps=args.steps,
                meta_lr=args.meta_lr, prox=args.prox, mu=args.mu, delta=args.delta,
                constraint_set=args.constraint_set, newton_steps=args.newton_steps, inner_steps=args.inner_steps,
                seed=seed, log_every=args.steps, checkpoint_every=args.steps)
    eval_seed = 1000 + split  # identical episodes for every method and seed of this split
    records = []

    warned = {"indefinite": 0, "not_converged": 0}  # meta-training warnings of the run being recorded

    def record(method: str, c: float | None, ev: dict, seconds: float) -> None:
        rec = {"dataset": dataset, "shot": shot, "split": split, "seed": seed, "method": method, "c": c,
               "seconds": round(seconds, 1), "indefinite": ev["indefinite"], "training_warnings": dict(warned),
               **unit_means(ev)}
        records.append(rec)
        warned.update(indefinite=0, not_converged=0)

    with tempfile.TemporaryDirectory() as tmp:
        def fit(cfg: Config) -> tuple[dict, float]:
            """Meta-train ``cfg``; its indefinite-system and non-convergence warnings are counted."""
            t0 = time.time()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tag = f"{cfg.method}_{cfg.constraint}_c{cfg.c:g}"
                outer = train(cfg, train_tasks, Path(tmp) / tag, progress=False, tag=tag)
            warned["indefinite"] = sum(issubclass(w.category, IndefiniteWarning) for w in caught)
            warned["not_converged"] = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            return outer, time.time() - t0

        imaml_cfg = Config(method="imaml", **base)
        imaml, seconds = fit(imaml_cfg)
        record("imaml", None, evaluate(imaml_cfg, imaml, test_tasks, episodes=args.episodes, seed=eval_seed), seconds)
        for constraint in ("dbc", "dp"):
            for c in args.c:
                t0 = time.time()
                tt = Config(method="fair", c=c, constraint=constraint, sharpness=args.sharpness, **base)
                ev = evaluate(imaml_cfg, imaml, test_tasks, episodes=args.episodes, seed=eval_seed, adapt_with=tt)
                record(f"tt-{constraint}", c, ev, time.time() - t0)
        maml_cfg = Config(method="maml", **base)
        maml, seconds = fit(maml_cfg)
        record("maml", None, evaluate(maml_cfg, maml, test_tasks, episodes=args.episodes, seed=eval_seed), seconds)
        for method, constraint in (("fair", "dbc"), ("fair", "dp"), ("pdfm", "dbc")):
            for c in args.c:
                cfg = Config(method=method, c=c, constraint=constraint, sharpness=args.sharpness, **base)
                outer, seconds = fit(cfg)
                ev = evaluate(cfg, outer, test_tasks, episodes=args.episodes, seed=eval_seed)
                record("pdfm" if method == "pdfm" else f"ours-{constraint}", c, ev, seconds)
    return records


def summarize(records: list[dict]) -> dict:
    """Matched-gap accuracies, areas and paired differences over the units of one (data set, shot)."""
    units = sorted({(r["seed"], r["split"]) for r in records})
    per_unit: dict[str, dict[str, list[float]]] = {}
    for unit in units:
        rows = [r for r in records if (r["seed"], r["split"]) == unit]
        imaml = next(r for r in rows if r["method"] == "imaml")
        g0, a0, a_const = imaml["parity_gap"], imaml["accuracy"], imaml["constant_accuracy"]
        for name in FRONTS:
            members = ("ours-dbc", "ours-dp") if name == "ours" else (name,)
            points = [(r["parity_gap"], r["accuracy"]) for r in rows if r["method"] in members]
            values = per_unit.setdefault(name, {})
            for frac in (0.75, 0.5):
                values.setdefault(f"acc@{frac:g}", []).append(accuracy_at([*points, (0.0, a_const)], frac * g0))
            values.setdefault("min_gap/g0", []).append(min(g for g, _ in points) / g0)
            values.setdefault("area", []).append(area_over_mix(points, g0, a0, a_const))
        mix = per_unit.setdefault("mix", {})
        for frac in (0.75, 0.5):
            mix.setdefault(f"acc@{frac:g}", []).append(a_const + (a0 - a_const) * frac)
        mix.setdefault("area", []).append(0.0)
        mix.setdefault("min_gap/g0", []).append(0.0)
        per_unit.setdefault("imaml", {}).setdefault("gap", []).append(g0)
        per_unit["imaml"].setdefault("accuracy", []).append(a0)

    def ci(values: list[float]) -> dict:
        return mean_ci(torch.tensor(values, dtype=torch.float64), student=True)

    summary = {name: {k: ci(v) for k, v in values.items()} for name, values in per_unit.items()}
    paired = {}
    pairs = [("ours", other) for other in ("pdfm", "mix", "tt-dbc", "tt-dp", "maml")]
    pairs += [("ours-dp", "ours-dbc"), ("ours-dp", "tt-dp"), ("ours-dbc", "tt-dbc")]
    for mine, other in pairs:
        for key in ("acc@0.75", "acc@0.5", "area"):
            diff = [a - b for a, b in zip(per_unit[mine][key], per_unit[other][key])]
            paired[f"{mine} - {other} {key}"] = ci(diff)
    return {"units": len(units), "fronts": summary, "paired": paired}


def fmt(s: dict, scale: float = 1.0) -> str:
    if s["n"] == 0:
        return f"not reached ({s['nan']})"
    text = f"{scale * s['mean']:.3f}" if scale == 1 else f"{scale * s['mean']:+.1f}"
    if not math.isnan(s["ci95"]):
        text += f" +- {scale * s['ci95']:.3f}" if scale == 1 else f" +- {scale * s['ci95']:.1f}"
    return text + (f" ({s['nan']} NaN)" if s["nan"] else "")


def print_tables(dataset: str, shot: int, records: list[dict], summary: dict) -> None:
    print(f"\n### {dataset}, {shot}-shot ({summary['units']} units)\n")
    print("| method | c | accuracy | hard gap | soft gap | DBC | null gap | excess gap | consistency | NaN episodes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    keys = sorted({(r["method"], r["c"]) for r in records}, key=lambda k: (k[0], k[1] if k[1] is not None else -1))
    for method, c in keys:
        rows = [r for r in records if r["method"] == method and r["c"] == c]
        cells = [fmt(mean_ci(torch.tensor([r[m] for r in rows], dtype=torch.float64), student=True))
                 for m in ("accuracy", "parity_gap", "soft_gap", "dbc", "null_gap", "excess_gap", "consistency")]
        nan = sum(r["nan_episodes"] for r in rows)
        total = sum(r["episodes"] for r in rows)
        bad = sum(r["indefinite"]["count"] for r in rows)
        steps_bad = sum(r["training_warnings"]["indefinite"] for r in rows)
        steps_nc = sum(r["training_warnings"]["not_converged"] for r in rows)
        extra = f" ({bad} indefinite at test)" if bad else ""
        extra += f" ({steps_bad} meta-steps with an indefinite task)" if steps_bad else ""
        extra += f" ({steps_nc} meta-steps with an unconverged solve)" if steps_nc else ""
        print(f"| {method}{extra} | {'' if c is None else f'{c:g}'} | " + " | ".join(cells) + f" | {nan}/{total} |")
    fronts = summary["fronts"]
    print("\n| front | accuracy at 75% of iMAML's gap | at 50% | area over the mixing line (points) "
          "| smallest own gap / iMAML's |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("mix", *FRONTS):
        f = fronts[name]
        print(f"| {name} | {fmt(f['acc@0.75'])} | {fmt(f['acc@0.5'])} | {fmt(f['area'], 100)} "
              f"| {fmt(f['min_gap/g0'])} |")
    print("\n| paired difference (accuracy points) | mean +- 95% interval over units |\n| --- | --- |")
    for key, s in summary["paired"].items():
        print(f"| {key} | {fmt(s, 100)} |")


def hardware() -> str:
    """The CPU model, its core count and torch's version, for the figures' footers."""
    model = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores, 1 thread, torch {torch.__version__}"


def plot(dataset: str, shot: int, records: list[dict], path: Path, command: str) -> None:
    """Mean accuracy against mean hard parity gap over the units, every method; the mixing line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"ours-dbc": ("tab:red", "o"), "ours-dp": ("tab:purple", "D"), "pdfm": ("tab:blue", "s"),
              "tt-dbc": ("tab:orange", "<"), "tt-dp": ("tab:brown", ">"), "imaml": ("tab:green", "^"),
              "maml": ("tab:gray", "v")}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for method, (color, marker) in styles.items():
        cs = sorted({r["c"] for r in records if r["method"] == method}, key=lambda c: -1 if c is None else c)
        stats = []
        for c in cs:
            rows = [r for r in records if r["method"] == method and r["c"] == c]
            gap = mean_ci(torch.tensor([r["parity_gap"] for r in rows]), student=True)
            acc = mean_ci(torch.tensor([r["accuracy"] for r in rows]), student=True)
            stats.append((gap, acc))
        ax.errorbar([g["mean"] for g, _ in stats], [a["mean"] for _, a in stats],
                    xerr=[0 if math.isnan(g["ci95"]) else g["ci95"] for g, _ in stats],
                    yerr=[0 if math.isnan(a["ci95"]) else a["ci95"] for _, a in stats], color=color, marker=marker,
                    linestyle="-" if len(stats) > 1 else "none", capsize=2, label=method, alpha=0.85)
    imaml = [r for r in records if r["method"] == "imaml"]
    g0, a0 = np.mean([r["parity_gap"] for r in imaml]), np.mean([r["accuracy"] for r in imaml])
    a_const = np.mean([r["constant_accuracy"] for r in imaml])
    ax.plot([0, g0], [a_const, a0], "k--", label="mix (iMAML / constant)")
    ax.set_xlabel("hard demographic parity gap (lower is fairer)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{dataset}, {shot}-shot, {len(imaml)} units (seed x split), 95% t-intervals", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    footer = textwrap.fill(f"{hardware()}; {command}", 200)
    fig.text(0.01, 0.005, footer, fontsize=4.5, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["communities", "adult", "bank", "compas"])
    parser.add_argument("--shots", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--splits", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--c", nargs="+", type=float, default=[0.0, 0.05, 0.15],
                        help="bounds in parity-gap units for ours, PDFM and the test-time constraint")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--meta-lr", type=float, default=0.01)
    parser.add_argument("--n-query", type=int, default=20, help="query rows of a training episode (PDFM: 20)")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per meta-test task")
    parser.add_argument("--prox", type=float, default=1.0)
    parser.add_argument("--mu", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--sharpness", type=float, default=4.0, help="k of the dp constraint (1: PDFM's)")
    parser.add_argument("--constraint-set", default="task", choices=("support", "task"))
    parser.add_argument("--newton-steps", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=100)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/fair_protocol.jsonl")
    parser.add_argument("--summary", default="results/fair_protocol_summary.jsonl")
    parser.add_argument("--plot-dir", default="docs/img")
    parser.add_argument("--from-results", action="store_true",
                        help="run nothing: print the tables and draw the figures from the records in --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "python benchmarks/fair_protocol.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("out", "summary", "plot_dir", "data_dir", "from_results"))
    if args.from_results:
        report(args, [json.loads(line) for line in Path(args.out).read_text().splitlines()])
        return
    for path in (args.out, args.summary):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    for dataset in args.datasets:
        every = load_tasks(dataset, args.data_dir, min_rows=2 * max(args.shots), min_group=2)
        tasks = load_tasks(dataset, args.data_dir, min_rows=max(args.shots) + args.n_query,
                           min_group=MIN_GROUP[dataset])
        print(f"\n## {dataset}: {len(tasks)} of {len(every)} tasks have >= {MIN_GROUP[dataset]} rows per group")
        for shot in args.shots:
            records = []
            for split in args.splits:
                train_tasks, test_tasks = split_tasks(tasks, args.test_fraction, split)
                for seed in args.seeds:
                    rows = run_unit(dataset, shot, split, seed, train_tasks, test_tasks, args)
                    with open(args.out, "a") as f:
                        for r in rows:
                            f.write(json.dumps({**r, "tasks": len(tasks), "test_tasks": len(test_tasks)}) + "\n")
                    records += rows
                    print(f"  unit seed {seed} split {split}: {sum(r['seconds'] for r in rows):.0f} s "
                          f"({time.time() - t_start:.0f} s so far)", flush=True)
            summary = summarize(records)
            print_tables(dataset, shot, records, summary)
            with open(args.summary, "a") as f:
                f.write(json.dumps({"dataset": dataset, "shot": shot, "tasks": len(tasks), "command": command,
                                    **summary}) + "\n")
            if shot == (10 if 10 in args.shots else args.shots[0]):
                plot(dataset, shot, records, Path(args.plot_dir) / f"fair_{dataset}_protocol.png", command)
    print(f"\ntotal {time.time() - t_start:.0f} s")


def report(args: argparse.Namespace, records: list[dict]) -> None:
    """Tables and figures from stored records (those of ``args.datasets`` and ``args.shots``)."""
    for dataset in args.datasets:
        for shot in args.shots:
            rows = [r for r in records if r["dataset"] == dataset and r["shot"] == shot]
            if not rows:
                continue
            print(f"\n## {dataset}: {rows[0]['tasks']} tasks, {rows[0]['test_tasks']} meta-test tasks per split")
            print_tables(dataset, shot, rows, summarize(rows))
            units = sorted({(r["seed"], r["split"]) for r in rows})
            seeds, splits = sorted({u[0] for u in units}), sorted({u[1] for u in units})
            command = (f"python benchmarks/fair_protocol.py --datasets {dataset} --shots {shot} "
                       f"--seeds {' '.join(map(str, seeds))} --splits {' '.join(map(str, splits))} "
                       f"--steps {args.steps} --episodes {args.episodes} --c {' '.join(map(str, args.c))} "
                       f"--prox {args.prox} --sharpness {args.sharpness}")
            plot(dataset, shot, rows, Path(args.plot_dir) / f"fair_{dataset}_protocol.png", command)


if __name__ == "__main__":
    main()
