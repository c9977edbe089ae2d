"""The restoration problem of ``bilevel prox`` differentiated three ways, and unrolled: accuracy, memory, time.

1. Accuracy (float64, two 10x10 images, the tv bank): ``check_hypergradient``
   against central finite differences and a dense solve, for (a) ``grad E = 0``
   with CG and MINRES, (b) the proximal-gradient fixed point and (c) the ADMM
   fixed point with GMRES and BiCGSTAB; each row keeps the adjoint solve's status
   and iterations.
2. Memory and time against the forward iterations N (4 images 32x32, the fd bank,
   float64): each (way, N) point runs one hypergradient in a fresh Python
   process, which reports its peak resident memory above the level just before
   the hypergradient (``VmHWM - VmRSS`` of ``/proc/self/status``; the peak of a
   fresh process, so earlier points do not leak into it; autograd's saved-tensor
   hooks cannot count the bytes, as ``torch.func`` refuses them). The forward
   runs exactly N iterations (tolerance 0), so a small N leaves an inexact
   ``x*``: the inner residual is reported, not hidden.
3. Lines of code of the problem definition (``problems/prox/problem.py`` and
   ``operators.py``, without blank lines, comments and docstrings).

    python benchmarks/prox.py                       # all three; writes results/prox.jsonl
    python benchmarks/prox.py --iterations 50 200   # fewer memory points
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _rss import status_mib

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("optimality-cg", "pg-gmres", "admm-gmres", "unrolled-pg")


def _instance(size: int, n: int, bank: str, blur: float, seed: int):
    import torch

    from bilevel.problems.prox import ProxRestoration, filter_bank, gaussian_kernel, load_images

    d = torch.float64
    images = load_images("shapes", n_train=n, n_test=1, size=size, blur_sigma=blur, noise=0.05, seed=seed, dtype=d)
    problem = ProxRestoration(gaussian_kernel(blur, dtype=d), filter_bank(bank, dtype=d), eps=0.05, tol=1e-13,
                              max_iter=20000)
    return problem, images


def accuracy() -> list[dict]:
    """``check_hypergradient`` rows for every way and adjoint solver."""
    import torch

    from bilevel.solvers import CG, GMRES, MINRES, BiCGSTAB, Status
    from bilevel.testing import check_hypergradient

    problem, images = _instance(10, 2, "tv", 0.7, 1)
    theta = {"log_weights": torch.tensor([-3.0, -2.5], dtype=torch.float64)}
    clean, y = images.train_clean, images.train_observed
    cases = [("a: grad E = 0", CG(rtol=1e-10)), ("a: grad E = 0", MINRES(rtol=1e-10)),
             ("b: prox-gradient", GMRES(rtol=1e-10)), ("b: prox-gradient", BiCGSTAB(rtol=1e-10)),
             ("c: ADMM (x, z, u)", GMRES(rtol=1e-10)), ("c: ADMM (x, z, u)", BiCGSTAB(rtol=1e-10))]
    rows = []
    for way, solver in cases:
        began = time.perf_counter()
        if way.startswith("a"):
            report = check_hypergradient(problem, theta, (clean, y), solver=solver,
                                         references=("finite_differences", "direct"), raise_exception=False)
        else:
            solution = (problem.pg_solution if way.startswith("b") else problem.admm_solution)(solver)

            def loss(out, th, obs):
                return ((out if way.startswith("b") else out["x"]) - clean).pow(2).mean()

            report = check_hypergradient(solution, theta, (y,), outer_loss=loss, raise_exception=False)
        errors = {c.reference: c.rel_error for c in report.comparisons if not c.skipped}
        rows.append({"part": "accuracy", "way": way, "solver": type(solver).__name__, "passed": report.passed,
                     "fd_rel_error": errors["finite_differences"], "direct_rel_error": errors["direct"],
                     "adjoint_status": Status(int(report.solve.status)).name,
                     "adjoint_iterations": int(report.solve.iterations), "seconds": time.perf_counter() - began})
    return rows


def point(way: str, iterations: int) -> dict:
    """One hypergradient with ``iterations`` forward iterations, in this process."""
    import warnings

    import torch

    import bilevel
    from bilevel.solvers import Status

    torch.set_num_threads(1)
    problem, images = _instance(32, 4, "fd", 1.0, 0)
    problem.tol, problem.inner_steps = 0.0, iterations
    theta = {"log_weights": torch.full((5,), -5.0, dtype=torch.float64)}
    clean, y = images.train_clean, images.train_observed
    before = status_mib("VmRSS")
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if way in ("optimality-cg", "unrolled-pg"):
            problem.forward = "pg"
            result = bilevel.hypergradient(problem, theta, (clean, y), solver="cg" if way == "optimality-cg" else None,
                                           mode="implicit" if way == "optimality-cg" else "unrolled")
            grad, solve = result.grad["log_weights"], result.solve
        else:
            live = {"log_weights": theta["log_weights"].clone().requires_grad_()}
            solution = problem.pg_solution("gmres") if way == "pg-gmres" else problem.admm_solution("gmres")
            out = solution(live, y)
            x = out if way == "pg-gmres" else out["x"]
            (grad,) = torch.autograd.grad((x - clean).pow(2).mean(), live["log_weights"])
            solve = solution.last_solve
    seconds = time.perf_counter() - began
    return {"part": "memory", "way": way, "iterations": iterations, "peak_above_start_mib": status_mib("VmHWM") - before,
            "seconds": seconds,
            "adjoint_status": None if solve is None else Status(int(solve.status)).name,
            "adjoint_iterations": None if solve is None else int(solve.iterations),
            "warnings": sorted({str(w.message).split(":")[0] for w in caught}), "grad": grad.tolist()}


def memory(iterations: list[int]) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for way in WAYS:
        for n in iterations:
            out = subprocess.run([sys.executable, __file__, "--point", way, str(n)], capture_output=True, text=True,
                                 check=True, env=env, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def code_lines(path: Path) -> int:
    """Lines of ``path`` that hold code: not blank, not a comment, not inside a docstring."""
    source = path.read_text()
    skip = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if i not in skip and line.strip() and not line.strip().startswith("#"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    parser.add_argument("--point", nargs=2, metavar=("WAY", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "results" / "prox.jsonl"))
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]))))
        return
    import torch

    torch.set_num_threads(1)
    host = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1}
    rows = accuracy()
    print(f"{'way':20} {'solver':9} {'fd rel.err':>10} {'direct':>9} {'status':>10} {'its':>4}")
    for r in rows:
        print(f"{r['way']:20} {r['solver']:9} {r['fd_rel_error']:10.1e} {r['direct_rel_error']:9.1e} "
              f"{r['adjoint_status']:>10} {r['adjoint_iterations']:4d}")
    mem = memory(args.iterations)
    print(f"\n{'way':14} {'N':>5} {'peak MiB':>9} {'seconds':>8} {'adjoint':>10} {'its':>4}  warnings")
    for r in mem:
        print(f"{r['way']:14} {r['iterations']:5d} {r['peak_above_start_mib']:9.1f} {r['seconds']:8.2f} "
              f"{str(r['adjoint_status']):>10} {str(r['adjoint_iterations']):>4}  {'; '.join(r['warnings'])}")
    loc = {name: code_lines(ROOT / "problems" / "prox" / name) for name in ("problem.py", "operators.py")}
    print(f"\nlines of code: {loc}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for r in [*rows, *mem, {"part": "lines_of_code", **loc}]:
            fh.write(json.dumps({**r, **host}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
