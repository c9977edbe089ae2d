"""Cost of a Hessian-vector product relative to a gradient, on the two iMAML networks.

For the inner objective ``g(phi) = L_train(phi) + lam/2 ||phi - theta||^2`` of one task
(:mod:`_tasks`), times (medians of calls interleaved one by one in one process, the same
number for every method, one thread by default):

* ``grad``: ``torch.func.grad(g)(phi)``, the unit;
* ``grad-autograd``: ``torch.autograd.grad`` on a fresh leaf (what
  :func:`bilevel.adjoint.gradient` runs outside the transforms);
* ``linearize``: ``torch.func.vjp(grad g, phi)``, building the reusable linearization;
* ``hvp-vjp-reused``: one call of that linearization (reverse-over-reverse): what each
  CG iteration of ``bilevel.hypergradient`` costs;
* ``hvp-vjp-fresh``: linearize and apply, every time;
* ``hvp-jvp``: ``torch.func.jvp(grad g, (phi,), (v,))`` (forward-over-reverse);
* ``hvp-autograd``: ``torch.autograd.grad`` through a retained double-backward graph;
* ``hvp-core-auto`` / ``hvp-core-functional``: one product of the linearization of
  :func:`bilevel.adjoint.linearize` (``"auto"``: the retained autograd graph, both halves
  ``(d_phi G)^T v`` and ``(d_theta G)^T v``; ``"functional"``: ``torch.func.vjp``), what
  each CG iteration of ``bilevel.hypergradient`` costs;
* ``hvp-vmapped-functional``: that ``torch.func.vjp`` product for ``--tasks`` tasks under
  ``torch.func.vmap`` (the autograd graph does not compose with ``vmap``), per task.

Prints a Markdown table and appends JSON lines to results/hvp.jsonl.

    python benchmarks/hvp.py [--problems sinusoid conv] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable

import torch

from bilevel.adjoint import linearize
from bilevel.problem import checked_condition

from _ours import ImamlProblem
from _tasks import SPECS, make_problem_data, proximal, task_loss, to_torch
from hypergradient import interleave

RESULTS = Path(__file__).resolve().parent.parent / "results"


def methods(problem: str, device: str, tasks: int = 4) -> dict[str, Callable[[], object]]:
    """Zero-argument callables for each way of computing ``grad g`` or ``H v``."""
    theta_np, data_np = make_problem_data(problem, tasks)
    theta, data = to_torch(theta_np, data_np, torch.float32, device)
    task = tuple(d[0] for d in data)
    xs, ys = task[0], task[1]
    lam = SPECS[problem].lam

    def objective(phi):
        return task_loss(problem, phi, xs, ys) + proximal(phi, theta, lam)

    def autograd_grad():
        leaves = tuple(p.detach().requires_grad_() for p in phi)
        with torch.enable_grad():
            return torch.autograd.grad(objective(leaves), leaves)

    grad_fn = torch.func.grad(objective)
    gen = torch.Generator(device).manual_seed(0)
    phi = tuple(t + 0.01 * torch.randn(t.shape, generator=gen, device=device) for t in theta)
    v = tuple(torch.randn(t.shape, generator=gen, device=device) for t in theta)
    _, linearization = torch.func.vjp(grad_fn, phi)
    leaves = tuple(p.detach().requires_grad_() for p in phi)
    graph = torch.autograd.grad(objective(leaves), leaves, create_graph=True)
    condition = checked_condition(ImamlProblem(problem, 0), task)
    core = {how: linearize(condition, phi, theta, task, how)[1] for how in ("auto", "functional")}

    def vmapped_products(phis, vs, tasks_data):
        _, fn = torch.func.vjp(lambda p: checked_condition(ImamlProblem(problem, 0), tasks_data)(p, theta), phis)
        return fn(vs)[0]

    batch_phi = tuple(p.expand(tasks, *p.shape).clone() for p in phi)
    batch_v = tuple(t.expand(tasks, *t.shape).clone() for t in v)
    vmapped = torch.func.vmap(vmapped_products)
    return {
        "grad": lambda: grad_fn(phi),
        "grad-autograd": autograd_grad,
        "linearize": lambda: torch.func.vjp(grad_fn, phi),
        "hvp-vjp-reused": lambda: linearization(v)[0],
        "hvp-vjp-fresh": lambda: torch.func.vjp(grad_fn, phi)[1](v)[0],
        "hvp-jvp": lambda: torch.func.jvp(grad_fn, (phi,), (v,))[1],
        "hvp-autograd": lambda: torch.autograd.grad(graph, leaves, v, retain_graph=True),
        "hvp-core-auto": lambda: core["auto"](v)[0],
        "hvp-core-functional": lambda: core["functional"](v)[0],
        "hvp-vmapped-functional": lambda: vmapped(batch_phi, batch_v, data),
    }


def timers(fns: dict[str, Callable[[], object]], device: str) -> dict[str, Callable[[], float]]:
    """Each method as a timer for :func:`hypergradient.interleave` (device work included)."""
    import time

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - start
        return run

    for fn in fns.values():
        fn()
    return {name: timed(fn) for name, fn in fns.items()}


def check_agreement(problem: str, device: str) -> float:
    """Largest relative difference between the HVP methods (they must agree)."""
    fns = methods(problem, device)
    outs = [torch.cat([t.reshape(-1) for t in fns[name]()])
            for name in ("hvp-vjp-reused", "hvp-vjp-fresh", "hvp-jvp", "hvp-autograd", "hvp-core-auto",
                         "hvp-core-functional")]
    outs.append(torch.cat([t[0].reshape(-1) for t in fns["hvp-vmapped-functional"]()]))
    return max(float((o - outs[0]).norm() / outs[0].norm()) for o in outs[1:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["sinusoid", "conv"], choices=sorted(SPECS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per method, at least")
    parser.add_argument("--tasks", type=int, default=4, help="tasks of the vmapped product")
    parser.add_argument("--out", type=Path, default=RESULTS / "hvp.jsonl")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)

    rows = []
    for problem in args.problems:
        fns = methods(problem, device, args.tasks)
        runs = interleave(timers(fns, device), args.min_time, 10 * args.min_time * len(fns), min_rounds=5)
        times = {name: statistics.median(t) / (args.tasks if name == "hvp-vmapped-functional" else 1)
                 for name, t in runs.items()}
        agreement = check_agreement(problem, device)
        for name, t in times.items():
            rows.append({"problem": problem, "method": name, "time_s": t, "x_grad": t / times["grad"],
                         "x_grad_autograd": t / times["grad-autograd"],
                         "calls": len(runs[name]),
                         "max_rel_diff_between_hvps": agreement, "device": device, "threads": args.threads,
                         "torch": torch.__version__})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| problem | method | time | x torch.func.grad | x autograd gradient |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['method']} | {r['time_s'] * 1e3:.3f} ms | {r['x_grad']:.2f} "
              f"| {r['x_grad_autograd']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
