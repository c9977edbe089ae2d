"""Jacobians through ``implicit_root`` by ``torch.func.jacrev``/``jacfwd``: the cost of vmap.

Under ``jacrev`` every row of the Jacobian is one adjoint solve, vmapped; the
solver stops once every row has converged. Cases:

  * ridge64  -- ridge regression with 64 features and one L2 weight each (SPD
    Hessian), 200 rows; the Jacobian ``dw*/dlam`` (64 x 64);
  * digits   -- multinomial logistic regression on scikit-learn's digits (jaxopt's
    implicit-differentiation example): 64 features x 10 classes, one L2 weight; the
    Jacobian of the 640 weights w.r.t. the weight (jacrev) -- skipped without sklearn.

Each is compared with the same Jacobian from dense algebra (``torch.linalg.solve``
on the materialized Hessian), timed interleaved call by call in one process (best
of ``--repeat``), and with the answers' relative difference. Prints a Markdown
table and appends JSON lines to results/vmap_jacobian.jsonl.

    python benchmarks/vmap_jacobian.py [--repeat 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

import bilevel

RESULTS = Path(__file__).resolve().parent.parent / "results"
F64 = torch.float64


def ridge_case() -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], dict]:
    g = torch.Generator().manual_seed(0)
    m, n = 200, 64
    X, y = torch.randn(m, n, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64)
    lam = torch.zeros(n, dtype=F64)

    def inner(w, lam):
        return 0.5 * (X @ w - y).pow(2).mean() + 0.5 * (lam.exp() * w * w).sum()

    @bilevel.implicit_root(torch.func.grad(inner))
    def ridge(lam):
        return torch.linalg.solve(X.T @ X / m + torch.diag(lam.exp()), X.T @ y / m)

    def dense():
        H = X.T @ X / m + torch.diag(lam.exp())
        w = torch.linalg.solve(H, X.T @ y / m)
        return -torch.linalg.solve(H, torch.diag(lam.exp() * w))

    calls = {"n": 0}

    def counted(w, lam):
        calls["n"] += 1
        return torch.func.grad(inner)(w, lam)

    count = bilevel.implicit_root(counted)(ridge.__wrapped__)
    torch.func.jacrev(count)(lam)
    return (lambda: torch.func.jacrev(ridge)(lam)), dense, {"unknowns": n, "vjp_calls": calls["n"]}


def digits_case() -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], dict] | None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    X_np, y_np = load_digits(return_X_y=True)
    X = torch.tensor(X_np / 16.0, dtype=F64)
    Y = torch.nn.functional.one_hot(torch.tensor(y_np), 10).to(F64)
    lam = torch.tensor(1.0, dtype=F64)

    def inner(W, lam):
        return torch.nn.functional.cross_entropy(X @ W, Y) + 0.5 * lam * W.pow(2).sum()

    def fit(lam):
        W = torch.zeros(64, 10, dtype=F64)
        for _ in range(20):  # Newton on the strongly convex objective
            g = torch.func.grad(inner)(W, lam).reshape(-1)
            H = torch.func.hessian(lambda w: inner(w.reshape(64, 10), lam))(W.reshape(-1))
            W = W - torch.linalg.solve(H, g).reshape(64, 10)
        return W

    W_star = fit(lam)
    implicit = bilevel.implicit_root(torch.func.grad(inner))(lambda lam: W_star)

    def dense():
        H = torch.func.hessian(lambda w: inner(w.reshape(64, 10), lam))(W_star.reshape(-1))
        cross = torch.func.jacrev(lambda l: torch.func.grad(inner)(W_star, l).reshape(-1))(lam)
        return -torch.linalg.solve(H, cross).reshape(64, 10)

    return (lambda: torch.func.jacrev(implicit)(lam)), dense, {"unknowns": 640}


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "vmap_jacobian.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"ridge64": ridge_case(), "digits": digits_case()}
    rows = []
    print("| case | unknowns | implicit jacrev (s) | dense (s) | ratio | max rel. difference |")
    print("|---|---|---|---|---|---|")
    for name, case in cases.items():
        if case is None:
            print(f"| {name} | skipped: scikit-learn not installed | | | | |")
            continue
        ours, dense, info = case
        best_ours = best_dense = float("inf")
        for _ in range(args.repeat):  # interleaved, call by call
            t, got = timed(ours)
            best_ours = min(best_ours, t)
            t, want = timed(dense)
            best_dense = min(best_dense, t)
        diff = float((got - want).abs().max() / want.abs().max())
        row = {"case": name, **info, "implicit_s": best_ours, "dense_s": best_dense,
               "ratio": best_ours / best_dense, "max_rel_diff": diff, "threads": args.threads,
               "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
        rows.append(row)
        print(f"| {name} | {info['unknowns']} | {best_ours:.4f} | {best_dense:.4f} | {row['ratio']:.1f}x | "
              f"{diff:.1e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
