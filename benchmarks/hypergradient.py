"""Benchmark the iMAML meta-gradient: ours against torchopt, higher, jaxopt and plain torch.

Every implementation computes the mean over a meta-batch of tasks of the iMAML
meta-gradient of :mod:`_tasks` (sinusoid MLP, well-posed and ill-posed, and conv4): ``K`` inner gradient steps,
then ``(I + H/lam)^{-1} grad L_test`` by exactly ``--cg`` CG steps from zero
(implicit), or reverse mode through the ``K`` steps (unrolled MAML).

All implementations of one (problem, K, meta-batch) run in one fresh subprocess:
each is built and called once (its first call), then they are timed interleaved,
call by call in a rotating order, for the same number of rounds (at least 3, and
until each has ``--min-time`` seconds of calls): the median per call is reported,
and ratios between rows are measured under the same machine load. ``--isolated``
runs each implementation in its own process instead, for its peak memory.

Implementations:

* ``ours-implicit``: ``bilevel.hypergradient`` with ``CG(maxiter=cg, rtol=0)``, the
  meta-batch vectorized with ``torch.func.vmap``; ``ours-implicit-graph``: the same
  replayed as one CUDA graph (``bilevel.CUDAGraphed``; CUDA only);
  ``ours-implicit-compiled``: the same compiled whole by ``torch.compile`` (its first
  call is the compilation); ``ours-implicit-compiled-steps``: compiled in two pieces
  (``--compile-chunk`` inner steps, called K / chunk times, and the implicit part), so
  the compilation does not grow with K; ``ours-implicit-compiled-pieces``: one inner step,
  one operator application and the outer gradients compiled apart, the library's CG eager
  on the compiled operator (neither graph grows with K or the CG iterations);
  ``ours-implicit-loop``: a Python loop over tasks; ``ours-implicit-compiled-loop``: that
  loop with each task's hypergradient compiled (one compilation for all tasks); ``ours-unrolled``:
  ``mode="unrolled"``, vmapped;
* ``torch-implicit`` / ``torch-unrolled``: hand-written autograd loops over tasks;
* ``torchopt-implicit``, ``higher-unrolled``, ``jaxopt-implicit`` (jit): the peers,
  when installed (the ``bench`` extra);
* ``floor``: ``K`` inner gradients + ``cg`` Hessian-vector products + 1 query gradient,
  each a separate vmapped call, timed apart and added up.

Each meta-gradient is compared (relative 2-norm error) with a float64 reference at
the same ``K`` (``err_same_k``: the same algorithm, checks the implementation) and
with the converged meta-gradient (``err_converged``: inner problem minimized, linear
system solved to 1e-10; checks the answer). Peak memory (``--isolated`` only) is the
subprocess's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` (jax:
``peak_bytes_in_use``) on a GPU.

JSON lines go to ``results/hypergradient.jsonl`` and a Markdown table to
``results/hypergradient.md``.

    python benchmarks/hypergradient.py --quick            # CI-sized, under a minute
    python benchmarks/hypergradient.py --problems sinusoid --steps 5 10 20 40 80
    python benchmarks/hypergradient.py --problems conv --steps 5 80 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

from _rss import status_mib

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"

IMPLS = {  # name -> (kind, module the implementation needs)
    "ours-implicit": ("implicit", "bilevel"),
    "ours-implicit-graph": ("implicit", "bilevel"),
    "ours-implicit-compiled": ("implicit", "bilevel"),
    "ours-implicit-compiled-steps": ("implicit", "bilevel"),
    "ours-implicit-compiled-pieces": ("implicit", "bilevel"),
    "ours-implicit-loop": ("implicit", "bilevel"),
    "ours-implicit-compiled-loop": ("implicit", "bilevel"),
    "ours-unrolled": ("unrolled", "bilevel"),
    "torch-implicit": ("implicit", "torch"),
    "torch-unrolled": ("unrolled", "torch"),
    "torchopt-implicit": ("implicit", "torchopt"),
    "higher-unrolled": ("unrolled", "higher"),
    "jaxopt-implicit": ("implicit", "jaxopt"),
    "floor": ("floor", "bilevel"),
}
QUICK_IMPLS = ["ours-implicit", "ours-implicit-loop", "ours-unrolled", "torch-implicit", "floor"]


# ------------------------------------------------------------------ the worker

def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def _build(cfg: dict, impl: str):
    """``(call, block)`` for one implementation; ``block(out)`` waits for the device."""
    import torch

    import _reference as R
    from _tasks import make_problem_data, to_torch

    theta_np, data_np = make_problem_data(cfg["problem"], cfg["tasks"], cfg["seed"])
    problem, steps, cg = cfg["problem"], cfg["steps"], cfg["cg"]
    if impl == "jaxopt-implicit":
        from _peers import jaxopt_imaml
        return jaxopt_imaml.make(problem, theta_np, data_np, steps, cg, cfg["device"])

    theta, data = to_torch(theta_np, data_np, torch.float32, cfg["device"])

    def block(out):
        if cfg["device"].startswith("cuda"):
            torch.cuda.synchronize()
        return out

    if impl.startswith("ours-"):
        import _ours
        chunk = math.gcd(steps, cfg.get("compile_chunk", 1))
        return _ours.make(impl[len("ours-"):], problem, theta, data, steps, cg, chunk), block
    if impl == "torch-implicit":
        return (lambda: R.implicit(problem, theta, data, steps, cg)), block
    if impl == "torch-unrolled":
        return (lambda: R.unrolled(problem, theta, data, steps)), block
    if impl == "torchopt-implicit":
        from _peers import torchopt_imaml
        return torchopt_imaml.make(problem, theta, data, steps, cg), block
    if impl == "higher-unrolled":
        from _peers import higher_imaml
        return higher_imaml.make(problem, theta, data, steps, cg), block
    if impl == "floor":
        import _ours
        return _ours.cost_floor(problem, theta, data, steps, cg), block
    raise ValueError(f"unknown implementation {impl!r}: choose from {sorted(IMPLS)}")


def _timed(call: Callable[[], object], block: Callable[[object], object]) -> tuple[float, object]:
    """Seconds of one call (device work included) and its result."""
    start = time.perf_counter()
    out = block(call())
    return time.perf_counter() - start, out


def interleave(timers: dict[str, Callable[[], float]], min_time: float, max_time: float,
               min_rounds: int = 3) -> dict[str, list[float]]:
    """Call every timer once per round, in a rotating order, until each has at least
    ``min_rounds`` calls and ``min_time`` seconds of them (or a round ends past ``max_time``
    seconds in all): every implementation gets the same number of calls, spread over the
    same stretch of machine load."""
    names = list(timers)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for rounds in itertools.count():
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timers[name]())
        enough = rounds + 1 >= min_rounds and min(sum(t) for t in times.values()) >= min_time
        if enough or (rounds + 1 >= min_rounds and time.perf_counter() - start >= max_time):
            return times


def _rss_mib() -> float:
    """Peak RSS of this process's address space (``VmHWM``), else ``ru_maxrss`` off Linux."""
    try:
        return status_mib("VmHWM")
    except RuntimeError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gpu_peak(cfg: dict, impls: list[str], reset: bool = False) -> float | None:
    if not cfg["device"].startswith("cuda"):
        return None
    if impls == ["jaxopt-implicit"]:
        import jax
        stats = jax.devices("gpu")[0].memory_stats() or {}
        return None if reset else stats.get("peak_bytes_in_use", 0) / 2 ** 20
    import torch
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return torch.cuda.max_memory_allocated() / 2 ** 20


def worker(cfg: dict) -> list[dict]:
    """Run the implementations ``cfg["impls"]`` on one (problem, K, meta-batch) in this process,
    interleaved call by call, and return one row each.

    Each is built and called once (its first call, compilation or tracing included), then
    :func:`interleave` times them side by side. The floor's three parts are called in turn
    within its round, and the round's floor is ``K t_grad + cg t_hvp + t_query``. Peak
    memory is reported only for a process that ran one implementation.
    """
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    impls = cfg["impls"]
    built = {impl: _build(cfg, impl) for impl in impls}
    rss_base = _rss_mib()
    _gpu_peak(cfg, impls, reset=True)
    rows: dict[str, dict] = {impl: {"impl": impl} for impl in impls}
    outs: dict[str, object] = {}
    timers: dict[str, Callable[[], float]] = {}
    for impl, (call, block) in built.items():
        if impl == "floor":
            inner_grad, hvp, query = call
            for part in call:
                block(part())

            def floor_round(parts=(inner_grad, hvp, query), block=block, row=rows[impl]) -> float:
                grad_s, hvp_s, query_s = (_timed(part, block)[0] for part in parts)
                row.setdefault("parts", []).append((grad_s, hvp_s, query_s))
                return cfg["steps"] * grad_s + cfg["cg"] * hvp_s + query_s

            timers[impl] = floor_round
            rows[impl]["first_s"] = None
        else:
            rows[impl]["first_s"], outs[impl] = _timed(call, block)

            def timer(call=call, block=block, impl=impl) -> float:
                seconds, outs[impl] = _timed(call, block)
                return seconds

            timers[impl] = timer
    times = interleave(timers, cfg["min_time"], cfg["max_time"])
    grads = {}
    for impl, row in rows.items():
        row.update(time_s=statistics.median(times[impl]), best_s=min(times[impl]), calls=len(times[impl]))
        if impl == "floor":
            parts = row.pop("parts")
            row.update({f"{name}_s": statistics.median(p[i] for p in parts)
                        for i, name in enumerate(("grad", "hvp", "query"))})
            continue
        out = outs[impl]
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        grads[impl] = np.concatenate([np.asarray(leaf.detach().cpu() if hasattr(leaf, "detach") else leaf,
                                                 dtype=np.float64).ravel() for leaf in leaves])
        if impl.startswith("ours-"):
            import _ours
            row["solve_status"] = _ours.solve_statuses(built[impl][0])
    np.savez(cfg["grad_out"], **grads)
    alone = len(impls) == 1
    for row in rows.values():
        row.update(rss_base_mib=round(rss_base, 1) if alone else None,
                   rss_peak_mib=round(_rss_mib(), 1) if alone else None,
                   gpu_peak_mib=_gpu_peak(cfg, impls) if alone else None)
    return list(rows.values())


# ------------------------------------------------------------------ the parent

def _versions() -> dict[str, str]:
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchopt", "higher", "jax", "jaxopt"):
        if find_spec(name) is not None:
            from importlib.metadata import version
            out[name] = version(name)
    return out


def _hardware(device: str, threads: int) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    return f"{model}, {os.cpu_count()} cores, {threads} thread(s)"


def run_group(cfg: dict, timeout: float) -> list[dict]:
    """Run :func:`worker` in a fresh interpreter; a failure becomes one row per implementation
    with ``error``. Each returned row carries its float64 meta-gradient under ``grad``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(cfg, grad_out=str(Path(tmp) / "grads.npz"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=_thread_env(cfg["threads"]), cwd=HERE)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
            error = None if proc.returncode == 0 and lines else \
                (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
        if error:
            return [{"impl": impl, "error": error} for impl in cfg["impls"]]
        rows = json.loads(lines[-1])
        import numpy as np
        with np.load(cfg["grad_out"]) as grads:
            for row in rows:
                if row["impl"] in grads:
                    row["grad"] = grads[row["impl"]]
        return rows


class References:
    """float64 reference meta-gradients (CPU), computed once per configuration."""

    def __init__(self, seed: int, converged_max_tasks: int):
        self.seed, self.converged_max_tasks = seed, converged_max_tasks
        self.cache: dict[tuple, object] = {}

    def _problem(self, problem: str, tasks: int):
        import torch

        from _tasks import make_problem_data, to_torch
        return to_torch(*make_problem_data(problem, tasks, self.seed), torch.float64, "cpu")

    def same_k(self, kind: str, problem: str, tasks: int, steps: int, cg: int):
        import _reference as R
        key = (kind, problem, tasks, steps, cg if kind == "implicit" else None)
        if key not in self.cache:
            theta, data = self._problem(problem, tasks)
            grad = (R.implicit(problem, theta, data, steps, cg) if kind == "implicit"
                    else R.unrolled(problem, theta, data, steps))
            self.cache[key] = grad.numpy()
        return self.cache[key]

    def converged(self, problem: str, tasks: int):
        import _reference as R
        if tasks > self.converged_max_tasks:
            return None, None
        key = ("converged", problem, tasks)
        if key not in self.cache:
            theta, data = self._problem(problem, tasks)
            grad, info = R.converged(problem, theta, data)
            self.cache[key] = (grad.numpy(), info)
        return self.cache[key]


def _rel(a, b) -> float | None:
    import numpy as np
    if a is None or b is None:
        return None
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _label(problem: str) -> str:
    """The problem's name, marked when its inner problem is ill-posed (``H + lam I`` indefinite)."""
    from _tasks import SPECS
    return problem if SPECS[problem].well_posed else f"{problem} (ill-posed)"


def table(rows: list[dict]) -> str:
    """Markdown: one line per run, with its time relative to torchopt's and the cost floor
    (peak RSS in MiB, peak GPU memory in MiB); rows of an ill-posed problem are marked."""
    base = {(r["problem"], r["tasks"], r["steps"], r["impl"]): r.get("time_s") for r in rows}
    head = ("| problem | tasks | K | implementation | time / meta-grad | calls | x torchopt | x floor | first call "
            "| peak RSS | peak GPU | err vs same K | err vs converged | CG status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        key = (r["problem"], r["tasks"], r["steps"])
        if "error" in r:
            lines.append(f"| {_label(r['problem'])} | {r['tasks']} | {r['steps']} | {r['impl']} | error: "
                         f"{r['error']} |" + " |" * 9)
            continue
        torchopt, floor = base.get(key + ("torchopt-implicit",)), base.get(key + ("floor",))
        t = r["time_s"]
        status = ", ".join(f"{k} {v}" for k, v in sorted(r.get("solve_status", {}).items())) or "—"
        lines.append(
            f"| {_label(r['problem'])} | {r['tasks']} | {r['steps']} | {r['impl']} | {_fmt_time(t)} | {r['calls']} "
            f"| {_fmt(t / torchopt if torchopt else None, '.2f')} | {_fmt(t / floor if floor else None, '.2f')} "
            f"| {_fmt_time(r.get('first_s'))} | {_fmt(r.get('rss_peak_mib'), '.0f')} "
            f"| {_fmt(r.get('gpu_peak_mib'), '.0f')} | {_fmt(r.get('err_same_k'), '.1e')} "
            f"| {_fmt(r.get('err_converged'), '.2e')} | {status} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """The issue's ratios: ours (eager, CUDA-graphed, compiled) vs torchopt, jaxopt, the cost floor; loop vs vmap."""
    by = {(r["problem"], r["tasks"], r["steps"], r["impl"]): r for r in rows if "error" not in r}
    out = []
    for (problem, tasks, steps, impl), r in sorted(by.items()):
        if impl not in ("ours-implicit", "ours-implicit-graph", "ours-implicit-compiled",
                        "ours-implicit-compiled-steps", "ours-implicit-compiled-pieces"):
            continue
        parts = []
        for other in ("torchopt-implicit", "jaxopt-implicit", "floor"):
            o = by.get((problem, tasks, steps, other))
            if o:
                parts.append(f"{r['time_s'] / o['time_s']:.2f}x {other.split('-')[0]}")
        loop = by.get((problem, tasks, steps, "ours-implicit-loop"))
        if loop:
            parts.append(f"loop over tasks {loop['time_s'] / r['time_s']:.2f}x slower")
        out.append(f"{_label(problem)} tasks={tasks} K={steps} {impl}: " + ", ".join(parts))
    return out


def _done_keys(path: Path, meta: dict) -> set[tuple]:
    keys = set()
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if all(row.get(k) == v for k, v in meta.items()) and "error" not in row:
                keys.add((row["problem"], row["tasks"], row["steps"], row["impl"]))
    return keys


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="CI size: sinusoid, K=5, 4 tasks, ours + hand-written torch + floor, 0.3 s per run")
    parser.add_argument("--problems", nargs="+", default=["sinusoid-pd", "sinusoid", "conv"],
                        choices=["sinusoid", "sinusoid-pd", "conv"])
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 40, 80], help="inner steps K")
    parser.add_argument("--tasks", nargs="+", type=int, default=[4], help="meta-batch sizes")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--cg", type=int, default=5, help="CG steps of the implicit methods")
    parser.add_argument("--compile-chunk", type=int, default=1,
                        help="inner steps per compiled call of ours-implicit-compiled-steps (its gcd with K)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed calls per implementation (default 2, 0.3 with --quick)")
    parser.add_argument("--max-time", type=float, default=60.0, help="stop timing after this many seconds")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per process (all implementations of one problem, K and meta-batch)")
    parser.add_argument("--isolated", action="store_true",
                        help="one process per implementation, for its peak memory; times are then taken at "
                             "different moments, so ratios across rows drift with the machine's load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--converged-max-tasks", type=int, default=4,
                        help="compute the converged reference only for meta-batches up to this size")
    parser.add_argument("--out", type=Path, default=RESULTS / "hypergradient.jsonl")
    parser.add_argument("--resume", action="store_true", help="skip runs already in --out (same versions)")
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []

    import torch
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.problems, args.steps, args.tasks = ["sinusoid"], [5], [4]
        args.impls = [i for i in args.impls if i in QUICK_IMPLS]
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 2.0
    available = [i for i in args.impls if find_spec(IMPLS[i][1]) is not None
                 and (device.startswith("cuda") or not i.endswith("-graph"))]
    skipped = sorted(set(args.impls) - set(available))
    if skipped:
        print(f"skipped (not installed, or CUDA only): {', '.join(skipped)}", file=sys.stderr)

    meta = {"device": device, "hardware": _hardware(device, args.threads), "versions": _versions(),
            "threads": args.threads, "cg": args.cg, "seed": args.seed}
    done = _done_keys(args.out, meta) if args.resume else set()
    refs = References(args.seed, args.converged_max_tasks)
    groups = [(p, b, k, [i for i in available if (p, b, k, i) not in done])
              for p in args.problems for b in args.tasks for k in args.steps]
    if args.isolated:
        groups = [(p, b, k, [i]) for p, b, k, impls in groups for i in impls]
    groups = [g for g in groups if g[3]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for problem, tasks, steps, impls in tqdm(groups, desc="hypergradient", file=sys.stderr):
        cfg = {"impls": impls, "problem": problem, "tasks": tasks, "steps": steps, "cg": args.cg,
               "device": device, "threads": args.threads, "seed": args.seed, "compile_chunk": args.compile_chunk,
               "min_time": args.min_time, "max_time": args.max_time}
        for row in run_group(cfg, args.timeout):
            grad = row.pop("grad", None)
            if grad is not None:
                kind = IMPLS[row["impl"]][0]
                row["err_same_k"] = _rel(grad, refs.same_k(kind, problem, tasks, steps, args.cg))
                conv, info = refs.converged(problem, tasks)
                row["err_converged"] = _rel(grad, conv)
                if info:
                    row["reference"] = info
            row = {**{k: v for k, v in cfg.items() if k not in ("impls", "min_time", "max_time")},
                   **meta, "isolated": args.isolated, **row}
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    text = table(rows)
    lines = summary(rows)
    md = args.out.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(f"{meta['hardware']}; {json.dumps(meta['versions'])}\n\n{text}\n\n" + "\n".join(lines) + "\n")
    os.replace(tmp, md)
    print(text)
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
