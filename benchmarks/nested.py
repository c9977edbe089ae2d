"""NestedMAML against its baselines on task pools with corrupted training tasks (sinusoid or Omniglot).

Runs ``bilevel nested --method M --seed S`` for every method and seed, one at a
time, each in its own process (so that its peak resident memory is its own),
then prints, over seeds (95% Student-t intervals):

- per method: the test score after adaptation (sinusoid: MSE; ``--dataset omniglot``: accuracy),
  the share of the MAML-to-oracle gap
  it closes (``(maml - m) / (maml - oracle)`` of the seed means), the AUROC of
  its task weights, training seconds and peak memory;
- paired differences on the same seeds (same pool, same initialization):
  ``nested - lookahead``, ``influence - lookahead``, ``influence - nested``,
  ``nested - uniform``, ``nested - maml``, ``nested - imaml``, and for each learned
  rule ``m - (maml + oracle) / 2``, which is negative (for accuracy: positive) exactly
  when ``m`` closes more than half of the gap on that seed.

Every run's ``final.json`` (without its config) goes to ``<results>.json``
with the summary and the paired differences, and one row per run to
``<results>.csv``. Flags it does not know are passed to ``bilevel nested``.

    python benchmarks/nested.py --seeds 1 2 3 4 5 --steps 400
    python benchmarks/nested.py --resume          # keep finished runs, resume stopped ones
    python benchmarks/nested.py --resume --plot docs/img/nested_benchmark.png   # also draw the figure
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from scipy import stats

METHODS = ("maml", "imaml", "oracle", "uniform", "lookahead", "influence", "nested")
PAIRS = (("nested", "lookahead"), ("influence", "lookahead"), ("influence", "nested"), ("nested", "uniform"),
         ("nested", "maml"), ("nested", "imaml"))
LEARNED = ("lookahead", "influence", "nested")


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (NaN with one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def run_one(method: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train (or, with ``--resume``, reuse or continue) one run and return its ``final.json``."""
    out = Path(args.runs) / f"{method}-{seed}"
    final = out / "final.json"
    if final.is_file() and args.resume:
        record = json.loads(final.read_text())
        if record["steps"] == args.steps:
            return record
    cmd = [sys.executable, "-m", "bilevel.cli", "nested", "--method", method, "--seed", str(seed),
           "--steps", str(args.steps), "--out-dir", str(out), "--no-progress", "--threads", "1", *extra]
    if (out / "checkpoint.pt").is_file():
        cmd.append("--resume" if args.resume else "--overwrite")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(final.read_text())


def metric_of(records: list[dict]) -> str:
    """The test score the runs report: ``test_accuracy`` (Omniglot) or ``test_mse`` (sinusoid)."""
    return "test_accuracy" if "test_accuracy" in records[0] else "test_mse"


def summarize(records: list[dict], methods: list[str]) -> tuple[list[dict], list[dict]]:
    """Per-method summaries and paired differences (of the test score) over the seeds all methods share."""
    by = {(r["method"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    metric = metric_of(records)
    score = {m: [by[m, s][metric] for s in seeds] for m in methods}
    mean = {m: interval(v)[0] for m, v in score.items()}
    gap = mean.get("maml", math.nan) - mean.get("oracle", math.nan)
    summary = []
    for m in methods:
        mu, ci = interval(score[m])
        auc, auc_ci = interval([by[m, s]["auroc"] for s in seeds])
        summary.append({"method": m, metric: mu, f"{metric}_ci95": ci,
                        "gap_closed": (mean["maml"] - mu) / gap if gap == gap and gap != 0 else math.nan,
                        "auroc": auc, "auroc_ci95": auc_ci,
                        "seconds": sum(by[m, s]["seconds"] for s in seeds) / len(seeds),
                        "peak_mib": max(by[m, s]["peak_mib"] for s in seeds), "seeds": seeds})
    paired = []
    for a, b in PAIRS:
        if a in score and b in score:
            d, ci = interval([x - y for x, y in zip(score[a], score[b])])
            paired.append({"difference": f"{a} - {b}", "mean": d, "ci95": ci,
                           "per_seed": [x - y for x, y in zip(score[a], score[b])]})
    for m in (m for m in LEARNED if {m, "maml", "oracle"} <= set(score)):
        diffs = [n - (x + o) / 2 for n, x, o in zip(score[m], score["maml"], score["oracle"])]
        d, ci = interval(diffs)
        paired.append({"difference": f"{m} - (maml + oracle)/2", "mean": d, "ci95": ci, "per_seed": diffs})
    return summary, paired


def plot(records: list[dict], methods: list[str], path: str) -> None:
    """Test score per method and seed, and the final weights of the learned methods, clean against corrupted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.3))
    for i, m in enumerate(methods):
        values = [r[metric_of(records)] for r in records if r["method"] == m]
        left.scatter([i] * len(values), values, s=14, alpha=0.7)
        left.hlines(sum(values) / len(values), i - 0.3, i + 0.3, color="k")
    left.set_xticks(range(len(methods)), methods, rotation=20)
    left.set_ylabel(metric_of(records).replace("test_", "test ").replace("mse", "MSE") + " after adaptation")
    left.set_title("per seed (dots) and mean (bar)")
    learned = [m for m in LEARNED if m in methods]
    for i, m in enumerate(learned):
        for r in (r for r in records if r["method"] == m):
            for w, bad in zip(r["weights"], r["corrupted"]):
                right.scatter(2 * i + bad + 0.25 * (r["seed"] % 5 - 2) / 2, w, s=8, alpha=0.5,
                              color="tab:red" if bad else "tab:blue")
    right.set_xticks(range(2 * len(learned)), [f"{m}\n{k}" for m in learned for k in ("clean", "corrupted")])
    right.set_ylabel("final task weight (sum N)")
    right.set_yscale("symlog", linthresh=1e-2)
    right.set_ylim(bottom=0)
    right.set_title("task weights, all seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--runs", default="runs/nested-bench", help="folder of the runs' output folders")
    parser.add_argument("--results", default="benchmarks/results/nested",
                        help="results prefix: writes <prefix>.json and <prefix>.csv")
    parser.add_argument("--resume", action="store_true", help="keep finished runs, resume stopped ones")
    parser.add_argument("--plot", default=None, help="also draw the test scores and task weights into this PNG")
    args, extra = parser.parse_known_args()

    records = []
    for seed in args.seeds:
        for method in args.methods:
            record = {k: v for k, v in run_one(method, seed, args, extra).items() if k not in ("settings", "config")}
            records.append(record)
            metric = metric_of([record])
            print(f"seed {seed} {method:10s} {metric} {record[metric]:.4f}  AUROC {record['auroc']:.3f}  "
                  f"{record['seconds']:.0f} s", flush=True)
    summary, paired = summarize(records, args.methods)

    metric = metric_of(records)
    print(f"\n{len(args.seeds)} seeds, {args.steps} steps, extra flags {extra}; 95% t-intervals over seeds")
    print(f"{'method':10s} {metric:>17s} {'gap closed':>10s} {'AUROC':>14s} {'seconds':>8s} {'peak MiB':>8s}")
    for s in summary:
        print(f"{s['method']:10s} {s[metric]:8.3f} +- {s[metric + '_ci95']:5.3f} {s['gap_closed']:10.2f} "
              f"{s['auroc']:6.3f} +- {s['auroc_ci95']:5.3f} {s['seconds']:8.0f} {s['peak_mib']:8.0f}")
    print(f"\npaired differences of {metric} (same seeds)")
    for p in paired:
        print(f"{p['difference']:28s} {p['mean']:+8.3f} +- {p['ci95']:5.3f}   per seed "
              + " ".join(f"{x:+.3f}" for x in p["per_seed"]))

    prefix = Path(args.results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    blob = {"steps": args.steps, "seeds": args.seeds, "flags": extra, "runs": records, "summary": summary,
            "paired": paired}
    prefix.with_suffix(".json").write_text(json.dumps(blob, indent=1) + "\n")
    loss = "mse" if metric == "test_mse" else "loss"
    columns = ["method", "seed", "steps", metric, f"{metric}_ci95", f"test_{loss}_before", "auroc", "seconds",
               "peak_mib"]
    with open(prefix.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    if args.plot:
        plot(records, args.methods, args.plot)


if __name__ == "__main__":
    main()
