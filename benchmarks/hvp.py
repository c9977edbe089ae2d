"""Cost of a Hessian-vector product relative to a gradient, on the two iMAML networks.

For the inner objective ``g(phi) = L_train(phi) + lam/2 ||phi - theta||^2`` of one task
(:mod:`_tasks`), times (median over ``--min-time`` seconds, one thread by default):

* ``grad``: ``torch.func.grad(g)(phi)``, the unit;
* ``linearize``: ``torch.func.vjp(grad g, phi)``, building the reusable linearization;
* ``hvp-vjp-reused``: one call of that linearization (reverse-over-reverse): what each
  CG iteration of ``bilevel.hypergradient`` costs;
* ``hvp-vjp-fresh``: linearize and apply, every time;
* ``hvp-jvp``: ``torch.func.jvp(grad g, (phi,), (v,))`` (forward-over-reverse);
* ``hvp-autograd``: ``torch.autograd.grad`` through a retained double-backward graph.

Prints a Markdown table and appends JSON lines to results/hvp.jsonl.

    python benchmarks/hvp.py [--problems sinusoid conv] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _tasks import SPECS, make_problem_data, proximal, task_loss, to_torch

RESULTS = Path(__file__).resolve().parent.parent / "results"


def methods(problem: str, device: str) -> dict:
    """Zero-argument callables for each way of computing ``grad g`` or ``H v``."""
    theta_np, data_np = make_problem_data(problem, 1)
    theta, (xs, ys, _, _) = to_torch(theta_np, data_np, torch.float32, device)
    xs, ys = xs[0], ys[0]
    lam = SPECS[problem].lam

    def objective(phi):
        return task_loss(problem, phi, xs, ys) + proximal(phi, theta, lam)

    grad_fn = torch.func.grad(objective)
    phi = tuple(t + 0.01 * torch.randn_like(t) for t in theta)
    v = tuple(torch.randn_like(t) for t in theta)
    _, linearization = torch.func.vjp(grad_fn, phi)
    leaves = tuple(p.detach().requires_grad_() for p in phi)
    graph = torch.autograd.grad(objective(leaves), leaves, create_graph=True)
    return {
        "grad": lambda: grad_fn(phi),
        "linearize": lambda: torch.func.vjp(grad_fn, phi),
        "hvp-vjp-reused": lambda: linearization(v)[0],
        "hvp-vjp-fresh": lambda: torch.func.vjp(grad_fn, phi)[1](v)[0],
        "hvp-jvp": lambda: torch.func.jvp(grad_fn, (phi,), (v,))[1],
        "hvp-autograd": lambda: torch.autograd.grad(graph, leaves, v, retain_graph=True),
    }


def median_time(fn, device: str, min_time: float, min_calls: int = 5) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    while len(times) < min_calls or sum(times) < min_time:
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_agreement(problem: str, device: str) -> float:
    """Largest relative difference between the HVP methods (they must agree)."""
    fns = methods(problem, device)
    outs = [torch.cat([t.reshape(-1) for t in fns[name]()])
            for name in ("hvp-vjp-reused", "hvp-vjp-fresh", "hvp-jvp", "hvp-autograd")]
    return max(float((o - outs[0]).norm() / outs[0].norm()) for o in outs[1:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["sinusoid", "conv"], choices=sorted(SPECS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "hvp.jsonl")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)

    rows = []
    for problem in args.problems:
        fns = methods(problem, device)
        times = {name: median_time(fn, device, args.min_time) for name, fn in fns.items()}
        agreement = check_agreement(problem, device)
        for name, t in times.items():
            rows.append({"problem": problem, "method": name, "time_s": t, "x_grad": t / times["grad"],
                         "max_rel_diff_between_hvps": agreement, "device": device, "threads": args.threads,
                         "torch": torch.__version__})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| problem | method | time | x gradient |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['method']} | {r['time_s'] * 1e3:.3f} ms | {r['x_grad']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
