"""The iMAML meta-gradient batched over tasks: whole, in chunks, or looped.

``meta_gradient(..., chunk_size=c)`` vmaps over ``c`` tasks at a time. Batching
trades memory for speed: a whole vmapped meta-batch holds every task's
activations at once, and ``vmap`` turns a per-task convolution into one grouped
convolution, whose speed against separate convolutions depends on the kernels
of the device. This script times the meta-gradient of the Omniglot network
(5-way 1-shot, 5 queries, ``K`` inner steps, 5 CG steps) and of the sinusoid MLP
batched whole, in chunks and as a Python loop over tasks (one
``bilevel.hypergradient`` each), interleaving the variants so that machine noise
hits them alike. It reports each one's peak memory (a fresh process's peak RSS on
a CPU, ``torch.cuda.max_memory_allocated`` on a GPU), checks that every variant
returns the same meta-gradient (up to float32 rounding, which the 5 CG steps
amplify; in float64 they agree exactly), and times one convolution layer
(forward, gradient, Hessian-vector product) vmapped against looped.

    python benchmarks/chunking.py                     # CPU, meta-batch 32, K = 5
    python benchmarks/chunking.py --device cuda --variants all 8 1 loop

Prints Markdown tables and appends JSON lines to ``results/chunking.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from _rss import status_mib

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn ``repeats`` times (after a warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _problem_and_tasks(problem: str, tasks: int, steps: int, device: torch.device):
    from bilevel.problems.imaml import IMAMLProblem, conv4_forward, conv4_init, cross_entropy, mlp_forward, mlp_init
    from bilevel.problems.imaml.problem import mse
    from bilevel.problems.imaml.tasks import Task

    g = torch.Generator().manual_seed(0)
    if problem == "conv":
        ways, shots, queries = 5, 1, 5
        prob = IMAMLProblem(conv4_forward, cross_entropy, lam=2.0, inner_lr=0.1, inner_steps=steps)
        theta = conv4_init(ways, generator=g)
        batch = Task(torch.rand(tasks, ways * shots, 1, 28, 28, generator=g),
                     torch.arange(ways).repeat(shots).expand(tasks, -1).clone(),
                     torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
                     torch.arange(ways).repeat(queries).expand(tasks, -1).clone())
    else:
        prob = IMAMLProblem(mlp_forward, mse, lam=1.0, inner_lr=0.02, inner_steps=steps)
        theta = mlp_init(generator=g)
        x = torch.rand(tasks, 20, 1, generator=g) * 10 - 5
        y = torch.sin(x) * (torch.rand(tasks, 1, 1, generator=g) * 4.9 + 0.1)
        batch = Task(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
    theta = {k: v.to(device) for k, v in theta.items()}
    batch = Task(*(t.to(device) for t in batch))
    return prob, theta, batch


def _variant(problem: str, tasks: int, steps: int, name: str, device: torch.device) -> Callable[[], dict]:
    """A zero-argument meta-gradient: ``"all"`` (one vmap over the batch), a chunk size
    (``"8"``: vmap over 8 tasks at a time) or ``"loop"`` (a Python loop over tasks, one
    ``bilevel.hypergradient`` each, averaged)."""
    import bilevel
    from bilevel.problems.imaml import meta_gradient
    from bilevel.solvers import CG

    prob, theta, batch = _problem_and_tasks(problem, tasks, steps, device)
    solver = CG(rtol=0.0, maxiter=5)
    if name == "loop":
        def looped() -> dict:
            grads = [bilevel.hypergradient(prob, theta, batch.index(i), solver=solver, on_failure="ignore").grad
                     for i in range(tasks)]
            return {k: torch.stack([g[k] for g in grads]).mean(0) for k in theta}
        return looped
    chunk = None if name == "all" else int(name)
    return lambda: meta_gradient(prob, theta, batch, solver=solver, chunk_size=chunk).grad


def _peak_memory_mib(problem: str, tasks: int, steps: int, name: str, device: torch.device) -> float:
    """Peak memory of one meta-gradient: CUDA's max allocated, or a fresh process's peak RSS on a CPU."""
    if device.type == "cuda":
        fn = _variant(problem, tasks, steps, name, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    run = subprocess.run([sys.executable, __file__, "--one", problem, str(tasks), str(steps), name],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"the memory run of {problem}/{name} failed:\n{run.stderr}")
    return float(run.stdout.split()[-1])


def meta_gradient_rows(problem: str, tasks: int, steps: int, variants: list[str], repeats: int,
                       device: torch.device) -> list[dict]:
    fns = {name: _variant(problem, tasks, steps, name, device) for name in variants}
    flat = {name: torch.cat([g.flatten() for g in fn().values()]) for name, fn in fns.items()}
    reference = flat[variants[0]]
    medians = _interleaved_medians(fns, repeats, device)
    return [{"part": "meta_gradient", "problem": problem, "tasks": tasks, "inner_steps": steps, "variant": name,
             "time_s": medians[name], "vs_first": medians[name] / medians[variants[0]],
             "peak_mib": _peak_memory_mib(problem, tasks, steps, name, device),
             "rel_diff": float((flat[name] - reference).norm() / reference.norm())} for name in variants]


def conv_layer_rows(tasks: int, repeats: int, device: torch.device) -> list[dict]:
    """One 64-to-64 3x3 stride-2 convolution on 10 images of 14x14 per task: vmapped vs looped."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, 10, 64, 14, 14, generator=g).to(device)
    w = (torch.randn(tasks, 64, 64, 3, 3, generator=g) * 0.05).to(device)

    def loss(w, x):
        return F.conv2d(x, w, stride=2, padding=1).square().sum()

    grad = torch.func.grad(loss)

    def hvp(w, x):  # reverse over reverse, as the library's Hessian-vector products
        return torch.func.grad(lambda w: (grad(w, x) * w).sum())(w)

    rows = []
    for name, fn in (("forward", loss), ("gradient", grad), ("hvp", hvp)):
        batched = torch.func.vmap(fn)
        medians = _interleaved_medians({"vmap": lambda: batched(w, x),
                                        "loop": lambda: [fn(w[i], x[i]) for i in range(tasks)]}, repeats, device)
        rows.append({"part": "conv_layer", "op": name, "tasks": tasks, "vmap_s": medians["vmap"],
                     "loop_s": medians["loop"], "vmap_over_loop": medians["vmap"] / medians["loop"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # a fresh process for one peak-memory measurement on the CPU
        problem, tasks, steps, name = argv[1:5]
        _variant(problem, int(tasks), int(steps), name, torch.device("cpu"))()
        print(status_mib("VmHWM"))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--problems", nargs="+", choices=("conv", "sinusoid"), default=["conv", "sinusoid"])
    p.add_argument("--tasks", type=int, default=32, help="meta-batch (default 32)")
    p.add_argument("--steps", type=int, default=5, help="inner steps K (default 5)")
    p.add_argument("--variants", nargs="+", default=["all", "8", "1", "loop"],
                   help="'all' (one vmap), a chunk size, or 'loop' (default: all 8 1 loop)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant (default 5)")
    p.add_argument("--out", type=Path, default=RESULTS / "chunking.jsonl")
    args = p.parse_args(argv)
    for name in args.variants:
        if name not in ("all", "loop") and not (name.isdigit() and int(name) >= 1):
            p.error(f"variant {name!r} is not 'all', 'loop' or a positive chunk size")
    device = torch.device(args.device)
    machine = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.machine()}, {os.cpu_count()} cores"}

    rows = []
    for problem in args.problems:
        rows += meta_gradient_rows(problem, args.tasks, args.steps, args.variants, args.repeats, device)
    rows += conv_layer_rows(args.tasks, args.repeats, device)

    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    print(f"{machine}\n")
    print(f"| problem | meta-batch | K | variant | time per meta-gradient | vs first | {memory} | rel. difference |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if r["part"] == "meta_gradient":
            print(f"| {r['problem']} | {r['tasks']} | {r['inner_steps']} | {r['variant']} | "
                  f"{r['time_s'] * 1e3:.1f} ms | {r['vs_first']:.2f}x | {r['peak_mib']:.0f} MiB | {r['rel_diff']:.1e} |")
    print("\n| conv layer, per-task weights | tasks | vmapped | looped | vmapped / looped |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["part"] == "conv_layer":
            print(f"| {r['op']} | {r['tasks']} | {r['vmap_s'] * 1e3:.1f} ms | {r['loop_s'] * 1e3:.1f} ms | "
                  f"{r['vmap_over_loop']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**machine, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
