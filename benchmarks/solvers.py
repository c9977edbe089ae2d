"""Benchmark the linear solvers against scipy.sparse.linalg.

Systems:
  * poisson   -- 2-D Poisson (5-point Laplacian, Dirichlet) on a 32x32 grid, SPD;
  * nn-hessian -- Hessian of a small MLP's loss, matrix-free via torch.func
    (forward-over-reverse hvp), plus a ridge that makes it SPD;
  * convdiff  -- 2-D convection-diffusion (central differences), nonsymmetric;
  * batch64   -- 64 independent random SPD systems (n=100): one batched call
    versus solving them one at a time (ours and scipy, both looped).

Our solvers get matrix-free matvecs (stencils, hvp); scipy gets its natural
input: a CSR matrix for the grids and a LinearOperator around the same hvp for
the Hessian. Iterations count inner iterations (scipy's callback calls; GMRES
with callback_type="pr_norm"). Time is wall-clock per system, best of
``--repeat``. Residuals are the true ``||b - A x|| / ||b||``.

Prints a Markdown table and appends JSON lines to results/solvers.jsonl.

    python benchmarks/solvers.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch

from bilevel.solvers import CG, GMRES, MINRES, BiCGSTAB, Direct, Neumann

RTOL = 1e-6
RESTART = 30
F64 = torch.float64


# ------------------------------------------------------------------- systems

def poisson_csr(m: int) -> sp.csr_matrix:
    T = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(m, m))
    eye = sp.identity(m)
    return (sp.kron(eye, T) + sp.kron(T, eye)).tocsr()


def stencil(m: int, center: float, west: float, east: float, south: float,
            north: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Matrix-free 5-point operator on an m x m grid, zero Dirichlet boundary.

    Unknown ``(i, j)`` sits at index ``i * m + j``; "west/east" couple ``j -+ 1``,
    "south/north" couple ``i -+ 1``.
    """
    def apply(v: torch.Tensor) -> torch.Tensor:
        u = v.reshape(*v.shape[:-1], m, m)
        p = torch.nn.functional.pad(u, (1, 1, 1, 1))
        out = (center * u + west * p[..., 1:-1, :-2] + east * p[..., 1:-1, 2:]
               + south * p[..., :-2, 1:-1] + north * p[..., 2:, 1:-1])
        return out.reshape(v.shape)
    return apply


def convdiff_coefficients(m: int, wind: tuple[float, float]) -> dict[str, float]:
    """-Laplace(u) + w . grad(u), h = 1/(m+1), central differences, scaled by h^2."""
    h = 1.0 / (m + 1)
    wx, wy = wind
    return {"center": 4.0, "west": -1.0 - wx * h / 2, "east": -1.0 + wx * h / 2,
            "south": -1.0 - wy * h / 2, "north": -1.0 + wy * h / 2}


def convdiff_csr(m: int, c: dict[str, float]) -> sp.csr_matrix:
    eye = sp.identity(m)
    along_j = sp.diags([c["west"], c["east"]], [-1, 1], shape=(m, m))
    along_i = sp.diags([c["south"], c["north"]], [-1, 1], shape=(m, m))
    return (c["center"] * sp.identity(m * m) + sp.kron(eye, along_j)
            + sp.kron(along_i, eye)).tocsr()


def mlp_hessian(hidden: int, seed: int = 0):
    """hvp of a 2-layer tanh MLP's regression loss at random parameters, flattened."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 8, generator=gen, dtype=F64)
    y = torch.randn(256, 1, generator=gen, dtype=F64)
    shapes = [(8, hidden), (hidden,), (hidden, 1), (1,)]
    sizes = [math.prod(s) for s in shapes]
    theta = torch.randn(sum(sizes), generator=gen, dtype=F64) * 0.5

    def loss(flat: torch.Tensor) -> torch.Tensor:
        W1, b1, W2, b2 = (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))
        return ((torch.tanh(X @ W1 + b1) @ W2 + b2 - y) ** 2).mean()

    grad = torch.func.grad(loss)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (theta,), (v,))[1]

    H = torch.func.hessian(loss)(theta)
    eig = torch.linalg.eigvalsh(H)
    ridge = max(0.0, -float(eig[0])) + 1e-3 * float(eig[-1])
    return hvp, ridge, float(eig[-1]) + ridge


# ------------------------------------------------------------------ measuring

def timed(fn: Callable[[], object], repeat: int) -> tuple[object, float]:
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def scipy_solve(name: str, A, b: np.ndarray, maxiter: int) -> tuple[np.ndarray, int]:
    count = [0]

    def callback(_):
        count[0] += 1

    if name == "CG":
        x, _ = sla.cg(A, b, rtol=RTOL, maxiter=maxiter, callback=callback)
    elif name == "MINRES":
        x, _ = sla.minres(A, b, rtol=RTOL, maxiter=maxiter, callback=callback)
    elif name == "BiCGSTAB":
        x, _ = sla.bicgstab(A, b, rtol=RTOL, maxiter=maxiter, callback=callback)
    elif name == "GMRES":
        x, _ = sla.gmres(A, b, rtol=RTOL, restart=RESTART, maxiter=-(-maxiter // RESTART),
                         callback=callback, callback_type="pr_norm")
    elif name == "Direct":
        dense = A if isinstance(A, np.ndarray) else A @ np.eye(A.shape[0])
        x = sla.spsolve(A, b) if sp.issparse(A) else np.linalg.solve(dense, b)
    else:
        raise ValueError(name)
    return x, count[0]


def rel_residual(apply: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                 b: np.ndarray) -> float:
    return float(np.linalg.norm(b - apply(x)) / np.linalg.norm(b))


def run_system(system: str, matvec, A_scipy, b: torch.Tensor, solvers: dict,
               repeat: int, maxiter: int) -> list[dict]:
    rows = []
    b_np = b.numpy()
    apply_np = A_scipy.matvec if isinstance(A_scipy, sla.LinearOperator) else A_scipy.dot
    for name, solver in solvers.items():
        res, t = timed(lambda: solver(matvec, b), repeat)
        row = {"system": system, "solver": name, "n": b.shape[-1], "batch": 1,
               "iterations": int(res.iterations), "time_s": t,
               "residual": float(res.residual_norm) / float(torch.linalg.vector_norm(b)),
               "status": res.failures()[0].split(" ")[0] if res.failures() else "CONVERGED"}
        if name in ("CG", "MINRES", "GMRES", "BiCGSTAB", "Direct"):
            (x, its), ts = timed(lambda: scipy_solve(name, A_scipy, b_np, maxiter), repeat)
            row.update(scipy_iterations=its, scipy_time_s=ts,
                       scipy_residual=rel_residual(apply_np, x, b_np))
        rows.append(row)
    return rows


def run_batch(n: int, count: int, repeat: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(count):
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        mats.append(Q @ np.diag(np.logspace(0, 3, n)) @ Q.T)
    A = torch.tensor(np.stack(mats), dtype=F64)
    b = torch.tensor(rng.standard_normal((count, n)), dtype=F64)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return (A @ v.unsqueeze(-1)).squeeze(-1)

    solver = CG(rtol=RTOL)
    bnorm = torch.linalg.vector_norm(b, dim=-1)
    res, t_batched = timed(lambda: solver(matvec, b), repeat)
    looped, t_looped = timed(
        lambda: [solver(lambda v, i=i: A[i] @ v, b[i]) for i in range(count)], repeat)
    scipy_out, t_scipy = timed(
        lambda: [scipy_solve("CG", mats[i], b[i].numpy(), 10 * n) for i in range(count)],
        repeat)
    scipy_res = max(rel_residual(mats[i].dot, x, b[i].numpy())
                    for i, (x, _) in enumerate(scipy_out))
    common = {"system": f"batch{count}", "n": n, "scipy_time_s": t_scipy / count,
              "scipy_iterations": float(np.mean([its for _, its in scipy_out])),
              "scipy_residual": scipy_res}
    return [
        {**common, "solver": "CG (batched)", "batch": count, "time_s": t_batched / count,
         "iterations": float(res.iterations.double().mean()),
         "residual": float((res.residual_norm / bnorm).max()),
         "status": "CONVERGED" if res.all_converged else "FAILED"},
        {**common, "solver": "CG (one by one)", "batch": 1, "time_s": t_looped / count,
         "iterations": float(np.mean([int(r.iterations) for r in looped])),
         "residual": max(float(r.residual_norm) / float(bnorm[i])
                         for i, r in enumerate(looped)),
         "status": "CONVERGED" if all(r.all_converged for r in looped) else "FAILED"},
    ]


def markdown(rows: list[dict]) -> str:
    head = ("| system | solver | n | iters | time/system | rel. residual | status "
            "| scipy iters | scipy time/system | scipy rel. residual |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        scipy = ("—", "—", "—")
        if "scipy_time_s" in r:
            scipy = (f"{r['scipy_iterations']:g}", f"{r['scipy_time_s'] * 1e3:.2f} ms",
                     f"{r['scipy_residual']:.1e}")
        lines.append(f"| {r['system']} | {r['solver']} | {r['n']} | {r['iterations']:g} "
                     f"| {r['time_s'] * 1e3:.2f} ms | {r['residual']:.1e} | {r['status']} "
                     f"| {' | '.join(scipy)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids, one repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="results/solvers.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m = 16 if args.quick else 32
    repeat = 1 if args.quick else 3
    hidden = 12 if args.quick else 24
    rows = []

    n = m * m
    poisson = stencil(m, 4.0, -1.0, -1.0, -1.0, -1.0)
    b = torch.ones(n, dtype=F64)
    rows += run_system("poisson", poisson, poisson_csr(m), b, {
        "CG": CG(rtol=RTOL), "MINRES": MINRES(rtol=RTOL),
        "GMRES": GMRES(rtol=RTOL, restart=RESTART), "BiCGSTAB": BiCGSTAB(rtol=RTOL),
        "Neumann": Neumann(alpha=1 / 8, rtol=RTOL, maxiter=2000), "Direct": Direct()},
        repeat, 10 * n)

    hvp, ridge, lam_max = mlp_hessian(hidden)
    nh = 8 * hidden + hidden + hidden + 1
    b = torch.randn(nh, generator=torch.Generator().manual_seed(1), dtype=F64)

    def hvp_np(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v).reshape(-1))
        return (hvp(t) + ridge * t).numpy()

    H_op = sla.LinearOperator((nh, nh), matvec=hvp_np, dtype=np.float64)
    rows += run_system("nn-hessian", hvp, H_op, b, {
        "CG": CG(rtol=RTOL, ridge=ridge), "MINRES": MINRES(rtol=RTOL, ridge=ridge),
        "GMRES": GMRES(rtol=RTOL, restart=RESTART, ridge=ridge),
        "BiCGSTAB": BiCGSTAB(rtol=RTOL, ridge=ridge),
        "Neumann": Neumann(alpha=1 / lam_max, rtol=RTOL, maxiter=300, ridge=ridge),
        "Direct": Direct(ridge=ridge)}, repeat, 10 * nh)

    coeffs = convdiff_coefficients(m, (40.0, 20.0))
    b = torch.ones(n, dtype=F64)
    rows += run_system("convdiff", stencil(m, **coeffs), convdiff_csr(m, coeffs), b, {
        "GMRES": GMRES(rtol=RTOL, restart=RESTART), "BiCGSTAB": BiCGSTAB(rtol=RTOL),
        "Direct": Direct()}, repeat, 10 * n)

    rows += run_batch(40 if args.quick else 100, 64, repeat)

    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**r, "quick": args.quick, "threads": args.threads,
                                "torch": torch.__version__, "when": stamp}) + "\n")


if __name__ == "__main__":
    main()
