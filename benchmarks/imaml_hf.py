"""iMAML-HF on Omniglot: does the inner solve reach the implicit function theorem's premise, and at what cost?

For one meta-batch of Omniglot tasks at a meta-initialization (the conv4 network's seeded
random init, or a checkpoint's ``theta``), each inner solver adapts every task to the
proximal objective ``F(phi) = L_support(phi) + lam/2 ||phi - theta||^2`` and the adjoint
system ``(H + lam I) v = grad L_query`` is solved by CG. Reported per configuration, with
the same tasks for every row:

* ``grad F``: mean and largest ``||grad F(phi_i)||`` over the tasks (0 at a solution);
* ``adjoint``: tasks whose CG solve met ``||b - A v|| <= 1e-2 ||b||`` on the true residual;
* ``s/step``: seconds of one meta-gradient (all tasks, one after the other), and the ratio
  to the 16 plain gradient steps of iMAML-GD (``gd16``) measured in the same process.

Rows: ``gd16`` (the paper's iMAML-GD: 16 steps of 0.1 on ``F``) and the library's inner solvers
to an inner gradient norm of ``--inner-tol``, each with ReLU (the papers' network) and SiLU.
Runs on the CPU with one thread; results are appended to ``benchmarks/results/imaml_hf.jsonl``.

    python benchmarks/imaml_hf.py --ways 5 --tasks 8
    python benchmarks/imaml_hf.py --ways 20 --tasks 4 --solvers gd16 lbfgs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import bilevel
from bilevel.problems.imaml import models
from bilevel.problems.imaml.omniglot import load_omniglot
from bilevel.problems.imaml.problem import IMAMLProblem, cross_entropy
from bilevel.problems.imaml.tasks import OmniglotTasks
from bilevel.solvers import CG, Status
from bilevel.solvers.minimize import LBFGS, NewtonCG

ADJOINT_RTOL = 1e-2


def problems(name: str, forward, lam: float, tol: float, maxiter: int) -> IMAMLProblem:
    if name == "gd16":
        return IMAMLProblem(forward, cross_entropy, lam=lam, inner_lr=0.1, inner_steps=16)
    solver = {"lbfgs": LBFGS(rtol=0.0, atol=tol, maxiter=maxiter),
              "newton_cg": NewtonCG(rtol=0.0, atol=tol, maxiter=maxiter, cg_maxiter=20,
                                    globalization="trust_region")}[name]
    return IMAMLProblem(forward, cross_entropy, lam=lam, inner_optimizer=solver)


def measure(problem: IMAMLProblem, theta, tasks, cg_maxiter: int) -> dict:
    solver = CG(rtol=ADJOINT_RTOL, maxiter=cg_maxiter)
    grads, converged, iterations, seconds = [], 0, [], 0.0
    for i in range(tasks.support_x.shape[0]):
        task = type(tasks)(*(t[i] for t in tasks))
        start = time.perf_counter()
        result = bilevel.hypergradient(problem, theta, task, solver=solver, on_failure="ignore")
        seconds += time.perf_counter() - start
        grads.append(float(result.inner_residual))
        converged += int(result.solve.status) == int(Status.CONVERGED)
        if result.inner_solve is not None:
            iterations.append(int(result.inner_solve.iterations))
    return {"grad_F_mean": float(np.mean(grads)), "grad_F_max": float(np.max(grads)),
            "adjoint_converged": converged, "tasks": len(grads), "seconds": seconds,
            "inner_iterations_mean": float(np.mean(iterations)) if iterations else 16.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--inner-tol", type=float, default=1e-2)
    parser.add_argument("--inner-maxiter", type=int, default=500)
    parser.add_argument("--cg-maxiter", type=int, default=20)
    parser.add_argument("--solvers", nargs="+", default=["gd16", "lbfgs", "newton_cg"])
    parser.add_argument("--activations", nargs="+", default=["relu", "silu"])
    parser.add_argument("--checkpoint", help="a bilevel imaml checkpoint.pt whose theta is the meta-initialization")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/imaml_hf.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)

    train, _ = load_omniglot().split(scheme="random")
    tasks = OmniglotTasks(train, args.ways, 1, 5, rotations=True).sample(np.random.default_rng(args.seed), args.tasks)
    if args.checkpoint:
        theta = torch.load(args.checkpoint, weights_only=False)["theta"]
    else:
        theta = models.conv4_init(args.ways, generator=torch.Generator().manual_seed(args.seed))

    rows = []
    for activation in args.activations:
        forward = models.forward_with(models.conv4_forward, activation)
        for name in args.solvers:
            row = measure(problems(name, forward, args.lam, args.inner_tol, args.inner_maxiter), theta, tasks,
                          args.cg_maxiter)
            rows.append({"ways": args.ways, "activation": activation, "solver": name, **row})
    base = {r["activation"]: r["seconds"] for r in rows if r["solver"] == "gd16"}

    print(f"Omniglot {args.ways}-way 1-shot, {args.tasks} tasks, lam {args.lam:g}, inner tol {args.inner_tol:g}, "
          f"CG <= {args.cg_maxiter} iterations to rtol {ADJOINT_RTOL:g}, 1 thread")
    print(f"{'network':8s} {'inner solver':12s} {'iters':>6s} {'grad F mean':>12s} {'max':>9s} "
          f"{'adjoint ok':>10s} {'s/step':>8s} {'x gd16':>7s}")
    for r in rows:
        ratio = r["seconds"] / base[r["activation"]] if r["activation"] in base else float("nan")
        print(f"{r['activation']:8s} {r['solver']:12s} {r['inner_iterations_mean']:6.0f} {r['grad_F_mean']:12.3e} "
              f"{r['grad_F_max']:9.2e} {r['adjoint_converged']:>4d}/{r['tasks']:<5d} {r['seconds']:8.2f} "
              f"{ratio:7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**r, "lam": args.lam, "inner_tol": args.inner_tol, "cg_maxiter": args.cg_maxiter,
                                "seed": args.seed, "checkpoint": args.checkpoint}) + "\n")


if __name__ == "__main__":
    main()
