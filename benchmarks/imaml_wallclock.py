"""iMAML, MAML and FOMAML on Omniglot at equal wall-clock, run side by side.

Launches ``bilevel imaml --mode {implicit, unrolled, first_order}`` as three
concurrent processes (one thread each, the same seed, so the same task stream
and the same held-out tasks), each stopped by ``--max-minutes``; then tabulates
held-out accuracy against training time, the final test accuracy with its 95%
interval over tasks, meta-steps, seconds per step, CPU time and peak resident
memory (``wait4``'s ``ru_maxrss`` of each process, written to ``resources.json``
in its run folder). Running the three at once gives each the same share of a
loaded machine; the CPU seconds say what each got.

    python benchmarks/imaml_wallclock.py --minutes 60 --out-dir runs/wallclock
    python benchmarks/imaml_wallclock.py --minutes 20 --out-dir runs/k100 -- --inner-steps 100
    python benchmarks/imaml_wallclock.py --tabulate runs/wallclock     # the table of finished runs again

Everything after ``--`` goes to every run's command line. The table is printed
and written to ``<out-dir>/summary.json`` and ``summary.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MODES = {"implicit": "iMAML", "unrolled": "MAML", "first_order": "FOMAML"}
COMMON = ["--dataset", "omniglot", "--ways", "5", "--shots", "1", "--split", "random", "--meta-batch", "8",
          "--steps", "100000", "--eval-every", "250", "--log-every", "50", "--checkpoint-every", "250",
          "--eval-tasks", "100", "--final-tasks", "600", "--no-progress", "--device", "cpu"]


def launch(out_dir: Path, minutes: float, extra: list[str]) -> None:
    """Start one process per mode, wait for all, and record each one's CPU time and peak memory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running = {}
    for mode in MODES:
        command = [sys.executable, "-m", "bilevel", "imaml", *COMMON, "--max-minutes", str(minutes),
                   "--mode", mode, "--out-dir", str(out_dir / mode), *extra]
        log = open(out_dir / f"{mode}.log", "w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        running[process.pid] = (mode, log, process)
    while running:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        mode, log, process = running.pop(pid)
        log.close()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, by wait4
        resources = {"exit_status": process.returncode, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                     "peak_rss_mib": usage.ru_maxrss / 1024}
        (out_dir / mode).mkdir(exist_ok=True)  # a run that failed at once made no folder
        (out_dir / mode / "resources.json").write_text(json.dumps(resources, indent=2) + "\n")
        if resources["exit_status"] != 0:
            print(f"{MODES[mode]} exited with status {resources['exit_status']}: see {out_dir / f'{mode}.log'}",
                  file=sys.stderr)


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize(out_dir: Path, marks: list[float]) -> list[dict[str, Any]]:
    """One row per finished run: accuracy at the last evaluation before each of ``marks`` (minutes)."""
    rows = []
    for mode, name in MODES.items():
        run = out_dir / mode
        if not (run / "final.json").exists():
            print(f"{name}: no final.json in {run} (not finished)", file=sys.stderr)
            continue
        final = json.loads((run / "final.json").read_text())
        evals = [(r["seconds"] / 60, r["step"], r["eval"]["acc_after"]) for r in _records(run) if "eval" in r]
        at = {}
        for mark in marks:
            before = [acc for minute, _, acc in evals if minute <= mark]
            at[f"{mark:g} min"] = before[-1] if before else None
        last = _records(run)[-1]
        resources = json.loads((run / "resources.json").read_text()) if (run / "resources.json").exists() else {}
        test = final["test"]
        rows.append({"method": name, "mode": mode, "meta_steps": final["meta_steps"],
                     "train_minutes": last["seconds"] / 60, "seconds_per_step": last["seconds"] / last["step"],
                     "held_out": at, "curve": evals, "test_acc": test["acc_after"], "test_ci95": test["acc_after_ci95"],
                     "test_tasks": test["tasks"], "protocol": test.get("protocol"),
                     "inner_steps": final["config"]["inner_steps"], **resources})
    return rows


def table(rows: list[dict[str, Any]], marks: list[float]) -> str:
    head = ["method", "inner steps", "meta-steps", "s/step", *[f"{m:g} min" for m in marks],
            "final test (95%)", "CPU min", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        held = [f"{100 * v:.1f}%" if v is not None else "" for v in r["held_out"].values()]
        cpu = f"{r['cpu_seconds'] / 60:.0f}" if "cpu_seconds" in r else ""
        rss = f"{r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else ""
        lines.append("| " + " | ".join([r["method"], str(r["inner_steps"]), str(r["meta_steps"]),
                                        f"{r['seconds_per_step']:.2f}", *held,
                                        f"{100 * r['test_acc']:.1f}% +- {100 * r['test_ci95']:.1f}",
                                        cpu, rss]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        minutes, _, acc = zip(*r["curve"])
        line, = ax.plot(minutes, [100 * a for a in acc], marker=".",
                        label=f"{r['method']} ({r['inner_steps']} inner steps)")
        ax.errorbar([r["train_minutes"]], [100 * r["test_acc"]], yerr=[100 * r["test_ci95"]], color=line.get_color(),
                    marker="s", capsize=3)
    ax.set(xlabel="training minutes (one thread each, run side by side)",
           ylabel="held-out accuracy after adaptation (%)",
           title="Omniglot 5-way 1-shot, random split\n(dots: 100 tasks; squares: final test, 600 tasks, 95%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="training wall-clock per method")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/wallclock"))
    parser.add_argument("--tabulate", type=Path, help="only tabulate the finished runs in this folder")
    parser.add_argument("--marks", type=float, nargs="+", help="minutes at which to read the curves")
    args = parser.parse_args(own)
    out_dir = args.tabulate or args.out_dir
    if args.tabulate is None:
        launch(out_dir, args.minutes, extra)
    marks = args.marks or [args.minutes * f for f in (0.25, 0.5, 0.75, 1.0)]
    rows = summarize(out_dir, marks)
    print(table(rows, marks))
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        plot(rows, out_dir / "summary.png")


if __name__ == "__main__":
    main()
