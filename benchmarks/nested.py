"""NestedMAML against its baselines on sinusoid pools with corrupted training tasks.

Runs ``bilevel nested --method M --seed S`` for every method and seed, one at a
time, each in its own process (so that its peak resident memory is its own),
then prints the test MSE after adaptation with a 95% interval over seeds
(Student t), the AUROC of the learned weights, training seconds and peak memory,
and how much of the MAML-to-oracle gap each method closes. One JSON line per
run goes to ``results/nested.jsonl`` and one per method to
``results/nested_summary.jsonl``.

    python benchmarks/nested.py --seeds 0 1 2 3 4 --steps 300 --corrupt 0.5
    python benchmarks/nested.py --resume          # finish the runs of an interrupted invocation
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from scipy import stats

METHODS = ("maml", "imaml", "uniform", "oracle", "lookahead", "nested")


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def run_one(method: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(args.runs) / f"{method}-{seed}"
    final = out / "final.json"
    if final.is_file() and args.resume:
        record = json.loads(final.read_text())
        if record["steps"] == args.steps:
            return record
    cmd = [sys.executable, "-m", "bilevel.cli", "nested", "--method", method, "--seed", str(seed),
           "--steps", str(args.steps), "--corrupt", str(args.corrupt), "--out-dir", str(out), "--no-progress",
           "--threads", "1", *extra]
    if (out / "checkpoint.pt").is_file():
        cmd.append("--resume" if args.resume else "--overwrite")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(final.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--corrupt", type=float, default=0.5)
    parser.add_argument("--runs", default="runs/nested-bench", help="folder of the runs' output folders")
    parser.add_argument("--results", default="results/nested.jsonl")
    parser.add_argument("--resume", action="store_true", help="keep finished runs, resume stopped ones")
    args, extra = parser.parse_known_args()  # anything else goes to `bilevel nested`

    records = []
    for seed in args.seeds:
        for method in args.methods:
            record = run_one(method, seed, args, extra)
            records.append(record)
            print(f"seed {seed} {method:10s} test MSE {record['test_mse']:.4f}  AUROC {record['auroc']:.3f}  "
                  f"{record['seconds']:.0f} s", flush=True)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "w") as fh:
        for r in records:
            fh.write(json.dumps({k: v for k, v in r.items() if k != "settings"}) + "\n")

    by_method = {m: [r for r in records if r["method"] == m] for m in args.methods}
    mean_mse = {m: interval([r["test_mse"] for r in rs])[0] for m, rs in by_method.items()}
    gap = mean_mse.get("maml", math.nan) - mean_mse.get("oracle", math.nan)
    print(f"\nsinusoid K=10, {args.corrupt:.0%} of the training tasks corrupted, {len(args.seeds)} seeds, "
          f"{args.steps} steps; 95% t-intervals over seeds")
    print(f"{'method':10s} {'test MSE':>18s} {'gap closed':>10s} {'AUROC':>14s} {'seconds':>8s} {'peak MiB':>8s}")
    summary = []
    for m, rs in by_method.items():
        mse, mse_ci = interval([r["test_mse"] for r in rs])
        auc, auc_ci = interval([r["auroc"] for r in rs])
        closed = (mean_mse["maml"] - mse) / gap if gap == gap and gap != 0 else math.nan
        seconds = sum(r["seconds"] for r in rs) / len(rs)
        peak = max(r["peak_mib"] for r in rs)
        print(f"{m:10s} {mse:9.4f} +- {mse_ci:6.4f} {closed:10.2f} {auc:6.3f} +- {auc_ci:5.3f} {seconds:8.0f} "
              f"{peak:8.0f}")
        summary.append({"method": m, "test_mse": mse, "test_mse_ci95": mse_ci, "gap_closed": closed, "auroc": auc,
                        "auroc_ci95": auc_ci, "seconds": seconds, "peak_mib": peak, "seeds": len(rs),
                        "steps": args.steps, "corrupt": args.corrupt})
    with open(results.with_name(results.stem + "_summary.jsonl"), "w") as fh:
        for s in summary:
            fh.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()
