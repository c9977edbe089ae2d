"""The default path, timed: ``meta_gradient`` with its defaults beside torchopt and a hand-written loop.

Every implementation computes the mean iMAML meta-gradient of :mod:`_tasks` over a
meta-batch (``K`` inner gradient steps, then exactly ``--cg`` CG steps from zero):

* ``ours``: ``bilevel.problems.imaml.meta_gradient(problem, theta, tasks,
  solver=CG(maxiter=cg, rtol=0))``, every other argument at its default (so
  ``over_tasks="auto"``: its first four calls alternate vmap and the loop, the
  warm-up call included, and later calls take the faster);
* ``ours-vmap`` / ``ours-loop``: the same with ``over_tasks`` pinned;
* ``before``: ``ours`` against the library at the git revision ``--before`` (its
  ``bilevel``, ``solvers`` and ``problems`` folders extracted by ``git archive`` and
  imported under another package name), so that a change is measured against its
  predecessor in the same process;
* ``torchopt``: torchopt's ``custom_root`` with ``solve_cg`` (:mod:`_peers.torchopt_imaml`);
* ``hand``: the hand-written autograd loop of :mod:`_reference` (no diagnostics, and it
  uses ``d_theta G = -lam I`` instead of a cross-term product).

All rows of one (problem, K) run in this process, one thread, interleaved call by call
in a rotating order for the same number of rounds; the table gives the median time
per call and its ratio to torchopt's and the hand-written loop's (the ratios are what
carry across machines and loads). Beside the times, counted outside the timed calls:
``products``, the adjoint operator products per solve (``ours`` variants; a vmapped
solve applies the operator to every task at once: 5 CG products and one closing
product, which gives the true residual and the cross term), and ``kernels``, the ATen operations one call runs (``torch.profiler``).
Every answer is checked against the hand-written loop (relative 2-norm difference).
``--problems`` takes the benchmark problems of :mod:`_tasks`; ``sinusoid`` is
ill-posed (``H + lam I`` indefinite: CG stops at negative curvature, so its answer
differs from the textbook recurrence's) and is marked so in the table.

    python benchmarks/default_path.py                                   # conv K = 5, 80; sinusoid-pd, sinusoid K = 5
    python benchmarks/default_path.py --before 10ae71d --problems conv --steps 5 80

Rows go to ``results/default_path.jsonl`` (one JSON object per row) and the table to
``results/default_path.md``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = REPO / "results"
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import _reference as R  # noqa: E402
from _tasks import SPECS, forward, make_problem_data, to_torch  # noqa: E402
from hypergradient import _hardware, interleave  # noqa: E402

PACKAGES = {"bilevel": "", "solvers": "solvers", "problems": "problems"}  # source folder -> place in the package


def load_revision(rev: str, into: Path) -> str:
    """Import the library as it was at git revision ``rev``; returns its package name.

    ``bilevel/``, ``solvers/`` and ``problems/`` are extracted from ``git archive`` into one
    package under ``into`` (laid out as the installed ``bilevel`` is) and every reference to
    ``bilevel`` in their sources is renamed, so both versions live in one process.
    """
    sha = subprocess.run(["git", "rev-parse", "--short=10", rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    name = f"bilevel_at_{sha}"
    archive = subprocess.run(["git", "archive", sha, *PACKAGES], cwd=REPO, capture_output=True, check=True).stdout
    root = into / name
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            top, _, rest = member.name.partition("/")
            if not member.isfile() or not rest.endswith(".py"):
                continue
            target = root / PACKAGES[top] / rest
            target.parent.mkdir(parents=True, exist_ok=True)
            text = tar.extractfile(member).read().decode()
            target.write_text(re.sub(r"\bbilevel\b", name, text))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return name


def _library(package: str):
    """``(imaml problem module, solvers module, Task, AdjointOperator class)`` of one library version."""
    problem = importlib.import_module(f"{package}.problems.imaml.problem")
    solvers = importlib.import_module(f"{package}.solvers")
    tasks = importlib.import_module(f"{package}.problems.imaml.tasks")
    adjoint = importlib.import_module(f"{package}.adjoint")
    return problem, solvers, tasks.Task, adjoint.AdjointOperator


def build(problem: str, steps: int, cg: int, tasks: int, impls: list[str], before: str | None,
          device: str = "cpu"):
    """``{name: (call, adjoint operator class or None)}`` for the implementations asked for."""
    theta, data = to_torch(*make_problem_data(problem, tasks, 0), torch.float32, device)
    names = [f"p{i}" for i in range(len(theta))]
    theta_dict = dict(zip(names, theta))
    spec = SPECS[problem]

    def net(params, x):
        return forward(problem, tuple(params[n] for n in names), x)

    def ours(package: str, over_tasks: str | None):
        P, S, Task, Adjoint = _library(package)
        loss = P.cross_entropy if spec.loss == "cross_entropy" else P.mse
        prob = P.IMAMLProblem(net, loss, lam=spec.lam, inner_lr=spec.alpha, inner_steps=steps)
        batch, solver = Task(*data), S.CG(maxiter=cg, rtol=0.0)
        kwargs = {} if over_tasks is None else {"over_tasks": over_tasks}

        def call():
            grad = P.meta_gradient(prob, theta_dict, batch, solver=solver, **kwargs).grad
            return torch.cat([grad[n].reshape(-1) for n in names])

        return call, Adjoint

    out = {}
    for impl in impls:
        if impl == "ours":
            out[impl] = ours("bilevel", None)
        elif impl in ("ours-vmap", "ours-loop"):
            out[impl] = ours("bilevel", impl.split("-")[1])
        elif impl == "before":
            out[impl] = ours(before, None)
        elif impl == "torchopt":
            from _peers import torchopt_imaml
            call = torchopt_imaml.make(problem, theta, data, steps, cg)
            out[impl] = (lambda call=call: torch.cat([g.reshape(-1) for g in call()])), None
        elif impl == "hand":
            out[impl] = (lambda: R.implicit(problem, theta, data, steps, cg)), None
        else:
            raise ValueError(f"unknown implementation {impl!r}")
    return out


def count(call, adjoint_class) -> tuple[int | None, int]:
    """``(operator products per solve, ATen operations per call)`` of one untimed call."""
    products = None
    if adjoint_class is not None:  # one operator per solve (a vmapped solve applies it to every task at once)
        original_init, original_call = adjoint_class.__init__, adjoint_class.__call__
        seen = {"solves": 0, "products": 0}

        def init(self, *args, **kwargs):
            seen["solves"] += 1
            original_init(self, *args, **kwargs)

        def counted(self, v):
            seen["products"] += 1
            return original_call(self, v)

        adjoint_class.__init__, adjoint_class.__call__ = init, counted
        try:
            call()
        finally:
            adjoint_class.__init__, adjoint_class.__call__ = original_init, original_call
        products = seen["products"] / max(seen["solves"], 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    kernels = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return products, kernels


def run(problem: str, steps: int, args) -> list[dict]:
    built = build(problem, steps, args.cg, args.tasks, args.impls, args.before_package, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    outs, first = {}, {}
    for name, (call, _) in built.items():
        start = time.perf_counter()
        outs[name] = call()
        sync()
        first[name] = time.perf_counter() - start

    def timer(name):
        call = built[name][0]

        def timed() -> float:
            start = time.perf_counter()
            outs[name] = call()
            sync()
            return time.perf_counter() - start

        return timed

    times = interleave({name: timer(name) for name in built}, args.min_time, args.max_time, args.min_rounds)
    counts = {name: count(call, adjoint) for name, (call, adjoint) in built.items()} if args.count else {}
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = outs.get("hand")
    rows = []
    for name in built:
        products, kernels = counts.get(name, (None, None))
        diff = None
        if reference is not None:
            diff = float((outs[name].double() - reference.double()).norm() / reference.double().norm())
        rows.append({
            "problem": problem, "well_posed": SPECS[problem].well_posed, "steps": steps, "tasks": args.tasks,
            "impl": name, "time_s": medians[name], "calls": len(times[name]), "first_s": first[name],
            "x_torchopt": medians[name] / medians["torchopt"] if "torchopt" in medians else None,
            "x_hand": medians[name] / medians["hand"] if "hand" in medians else None,
            "products_per_solve": products, "kernels": kernels,
            "diff_vs_hand": diff,
        })
    return rows


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| problem | K | implementation | time / call | calls | x torchopt | x hand-written | "
            "products / solve | kernels | diff vs hand-written |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        problem = r["problem"] if r["well_posed"] else f"{r['problem']} (ill-posed)"
        t = r["time_s"]
        lines.append(f"| {problem} | {r['steps']} | {r['impl']} | "
                     f"{t * 1e3:.1f} ms | {r['calls']} | {_fmt(r['x_torchopt'], '.2f')} | {_fmt(r['x_hand'], '.2f')} | "
                     f"{_fmt(r['products_per_solve'], 'g')} | {_fmt(r['kernels'], 'd')} | "
                     f"{_fmt(r['diff_vs_hand'], '.1e')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["conv", "sinusoid-pd", "sinusoid"], choices=sorted(SPECS))
    parser.add_argument("--steps", nargs="+", type=int, default=None,
                        help="inner steps K (default: 5 and 80 for conv, 5 for the sinusoids)")
    parser.add_argument("--tasks", type=int, default=4, help="meta-batch size")
    parser.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    parser.add_argument("--cg", type=int, default=5, help="CG steps")
    parser.add_argument("--impls", nargs="+", default=["ours", "ours-vmap", "ours-loop", "torchopt", "hand"],
                        choices=["ours", "ours-vmap", "ours-loop", "before", "torchopt", "hand"])
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also time 'ours' at this git revision (adds the 'before' row)")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per implementation")
    parser.add_argument("--max-time", type=float, default=120.0, help="stop a (problem, K) after this many seconds")
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--no-count", dest="count", action="store_false",
                        help="skip counting operator products and kernels")
    parser.add_argument("--out", type=Path, default=RESULTS / "default_path.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.before and "before" not in args.impls:
        args.impls.append("before")
    args.impls = [i for i in args.impls if i != "torchopt" or importlib.util.find_spec("torchopt")]
    with tempfile.TemporaryDirectory() as tmp:
        args.before_package = load_revision(args.before, Path(tmp)) if args.before else None
        meta = {"hardware": _hardware(args.device, 1), "device": args.device,
                "torch": torch.__version__, "load_before": os.getloadavg(), "before": args.before}
        rows = []
        for problem in args.problems:
            steps = args.steps or ([5, 80] if SPECS[problem].net == "conv" else [5])
            for k in steps:
                for row in run(problem, k, args):
                    row.update(meta, load_after=os.getloadavg())
                    rows.append(row)
                print(table([r for r in rows if r["problem"] == problem and r["steps"] == k]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    text = table(rows)
    load = f"load average {rows[0]['load_before'][0]:.2f} before, {rows[-1]['load_after'][0]:.2f} after" if rows else ""
    args.out.with_suffix(".md").write_text(f"{meta['hardware']}, torch {torch.__version__}; {load}\n\n{text}\n")
    print(load)
    return rows


if __name__ == "__main__":
    main()
