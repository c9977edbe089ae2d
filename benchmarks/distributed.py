"""Distributed meta-training on one machine: time per meta-step on 1 and 2 processes, and the
collectives' own cost per step.

Two measurements, for ``--problem imaml`` (default) or ``--problem fair``:

* the command (``bilevel imaml`` on the sinusoid; ``bilevel fair --methods fair`` on the
  communities tasks, also with ``--exact``) for ``--steps`` meta-steps on 1 process and
  under ``torchrun`` on 2 (Gloo), time per step read from the run's metrics (training
  time only: imaml's evaluation is pushed past the end; fair's first 10 steps, which
  include the warm-up, are left out);
* the collectives of one step alone, on 2 Gloo processes meeting in a FileStore, median
  of ``--repeat`` calls: for imaml the all-reduce of a meta-gradient of ``P`` parameters
  and the gather of the per-task diagnostics (6 values per task), for the sinusoid MLP
  (1,761 parameters) and the 5-way Omniglot 4-layer convnet (112,261); for fair the
  all-reduce of the meta-gradient (the features' weights, the bias and ``lambda0``,
  float64) and the gather of each task's curvature, and in the exact mode the gather of
  every task's meta-gradient instead of the all-reduce.

Every process runs one thread. On a shared 2-core machine the first is a rough scaling
figure (two processes use both cores, one process one); the second is what distribution
adds per step. Prints a
Markdown table and appends JSON lines to results/distributed.jsonl.

    python benchmarks/distributed.py [--problem fair] [--steps 40] [--meta-batch 8] [--repeat 50]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"
SIZES = {"sinusoid MLP": 1761, "Omniglot 5-way convnet": 112_261}  # models.num_params of each


def step_time(processes: int, steps: int, meta_batch: int, out: Path) -> float:
    """Seconds per meta-step of a sinusoid run on ``processes`` processes (training time only)."""
    args = ["-m", "bilevel", "imaml", "--steps", str(steps), "--meta-batch", str(meta_batch),
            "--log-every", str(steps), "--eval-every", str(10 * steps), "--checkpoint-every", str(steps),
            "--eval-tasks", "4", "--final-tasks", "4", "--baseline", "none", "--device", "cpu",
            "--no-progress", "--out-dir", str(out)]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: no oversubscription under load
    subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return record["seconds"] / steps


def fair_step_time(processes: int, steps: int, meta_batch: int, out: Path, exact: bool) -> float:
    """Seconds per meta-step of ``bilevel fair --methods fair`` on ``processes`` processes, steps 10 to
    ``steps`` (the first 10 include the warm-up)."""
    args = ["-m", "bilevel", "fair", "--dataset", "communities", "--methods", "fair", "--c", "0.05",
            "--steps", str(steps), "--meta-batch", str(meta_batch), "--checkpoint-every", str(steps),
            "--episodes", "2", "--no-progress", "--out-dir", str(out), *(["--exact"] if exact else [])]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "fair_c0.05.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])


def fair_features() -> int:
    """The number of features of the communities tasks (the fair meta-gradient has 2 values more)."""
    from bilevel.problems.fair.data import load_tasks

    return load_tasks("communities")[0].x.shape[1]


def fair_collectives(ctx, repeat: int, meta_batch: int, features: int) -> dict[str, float]:
    """Median seconds of one fair step's collectives, plain and exact."""
    local = len(range(meta_batch)[ctx.shard(meta_batch)])
    grad = [torch.randn(features, dtype=torch.float64), torch.randn((), dtype=torch.float64),
            torch.randn((), dtype=torch.float64)]
    per_task = [torch.randn(local, *g.shape, dtype=torch.float64) for g in grad]
    curvature = {"curvature": torch.rand(local, dtype=torch.float64)}
    calls = {"collectives per step, fair (all-reduce + gather)":
             lambda: (ctx.mean_of_sums(grad, meta_batch), ctx.gather(curvature, meta_batch)),
             "collectives per step, fair --exact (ordered mean + gather)":
             lambda: (ctx.ordered_mean(per_task, meta_batch), ctx.gather(curvature, meta_batch))}
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(repeat):
            ctx.barrier()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def collectives(rank: int, store_path: str, repeat: int, meta_batch: int, queue, features: int | None) -> None:
    """One rank: median seconds of the all-reduce and the gather of one step, per model size."""
    import torch.distributed as dist

    from bilevel import distributed

    torch.set_num_threads(1)
    ctx = distributed.init("cpu", store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                           timeout=datetime.timedelta(seconds=60))
    if features is not None:
        out = fair_collectives(ctx, repeat, meta_batch, features)
        if rank == 0:
            queue.put(out)
        distributed.shutdown(ctx)
        return
    local = len(range(meta_batch)[ctx.shard(meta_batch)])
    out = {}
    for name, size in SIZES.items():
        grad = {"w": torch.randn(size)}
        diagnostics = {"loss": torch.rand(local), "status": torch.zeros(local, dtype=torch.int64),
                       "iterations": torch.ones(local, dtype=torch.int64), "inner": torch.rand(local),
                       "adjoint": torch.rand(local), "indefinite": torch.zeros(local, dtype=torch.bool)}
        times = []
        for _ in range(repeat):
            ctx.barrier()
            start = time.perf_counter()
            ctx.mean_of_sums(grad, meta_batch)
            ctx.gather(diagnostics, meta_batch)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    if rank == 0:
        queue.put(out)
    distributed.shutdown(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("imaml", "fair"), default="imaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.jsonl")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    features = fair_features() if args.problem == "fair" else None
    with tempfile.TemporaryDirectory() as tmp:
        queue = mp.get_context("spawn").SimpleQueue()
        procs = [mp.get_context("spawn").Process(target=collectives,
                                                  args=(r, str(Path(tmp) / "store"), args.repeat, args.meta_batch,
                                                        queue, features)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        comm = queue.get()
        if args.problem == "fair":
            where = {1: "1 process, 1 thread", 2: "2 processes, 1 thread each"}
            steps = {f"meta-step, fair{' --exact' if exact else ''} ({where[n]})":
                     fair_step_time(n, args.steps, args.meta_batch, Path(tmp) / f"fair{n}{exact}", exact)
                     for exact in (False, True) for n in (1, 2)}
        else:
            steps = {"meta-step, sinusoid (1 process, 1 thread)":
                     step_time(1, args.steps, args.meta_batch, Path(tmp) / "one"),
                     "meta-step, sinusoid (2 processes, 1 thread each)":
                     step_time(2, args.steps, args.meta_batch, Path(tmp) / "two")}
    load = os.getloadavg()[0]
    rows = [*({"what": name, "seconds": t} for name, t in steps.items()),
            *({"what": name if args.problem == "fair" else f"collectives per step, {name}", "seconds": t}
              for name, t in comm.items())]
    print(f"| measurement (meta-batch {args.meta_batch}) | ms |")
    print("|---|---|")
    for row in rows:
        print(f"| {row['what']} | {1000 * row['seconds']:.2f} |")
    print(f"\nload average {load:.1f}; torch {torch.__version__}; {platform.machine()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**row, "problem": args.problem, "meta_batch": args.meta_batch, "steps": args.steps,
                                 "load": load, "torch": torch.__version__}) + "\n")


if __name__ == "__main__":
    main()
