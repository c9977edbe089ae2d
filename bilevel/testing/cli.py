"""``bilevel check TARGET``: check a user's hypergradient from the command line.

``TARGET`` is ``module.path:OBJECT`` or ``path/to/file.py:OBJECT``; module paths
are resolved from the current directory as with ``python -m``. ``OBJECT`` is one of:

1. a **factory** ``OBJECT(seed)`` returning ``(problem, outer, data)``: called once
   per point with ``seed = --seed + i``, so the factory chooses each point (and
   may draw new data too);
2. a **factory** ``OBJECT()`` with no parameters returning ``(problem, outer, data)``;
3. a **tuple** ``(problem, outer, data)``;
4. a **BilevelProblem instance** with an attribute ``example_outer`` (the outer
   point) and optionally ``example_data`` (default ``None``).

For 2-4, point 0 is ``outer`` itself and point ``i > 0`` is ``outer`` plus
``--spread`` times standard normal noise (seeded by ``--seed``). ``problem``
is a :class:`~bilevel.BilevelProblem`. Each point is checked with
:func:`bilevel.testing.check_hypergradient` for every ``--mode`` (and, in implicit
mode, every ``--solver``), and one table row is printed per reference. The
exit status is 0 when every check passes, 1 when any fails, 2 when the target
cannot be loaded.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

from bilevel.solvers import SOLVERS

__all__ = ["load_target", "main", "register", "run"]


class TargetError(Exception):
    """The target could not be loaded or does not follow the protocol."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check", help="check a problem's hypergradient against finite differences, unrolling and a direct solve",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:OBJECT", help="e.g. examples/ridge_check.py:make_problem")
    parser.add_argument("--points", type=int, default=3, help="outer points to check (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the points and probes (default 0)")
    parser.add_argument("--spread", type=float, default=0.5,
                        help="std of the random offsets around the given outer point (default 0.5)")
    parser.add_argument("--mode", default="implicit",
                        help="comma-separated modes: implicit, unrolled, truncated, first_order (default implicit)")
    parser.add_argument("--solver", default="cg",
                        help=f"comma-separated adjoint solvers for implicit mode: {', '.join(SOLVERS)} (default cg)")
    parser.add_argument("--references", default="finite_differences,unrolled,direct",
                        help="comma-separated references (default: all three)")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (default 1e-6)")
    parser.add_argument("--atol", type=float, default=1e-10, help="absolute tolerance (default 1e-10)")
    parser.add_argument("--residual-tol", type=float, default=1e-8,
                        help="bound on the inner residual ||G|| (default 1e-8)")
    parser.add_argument("--eps", type=float, default=1e-5, help="finite-difference step (default 1e-5)")
    parser.add_argument("--solver-rtol", type=float, default=1e-10,
                        help="rtol of the iterative adjoint solvers (default 1e-10)")


def main(argv: list[str] | None = None) -> int:
    """``python -m bilevel.testing.cli TARGET ...``: the same as ``bilevel check``."""
    parser = argparse.ArgumentParser(prog="bilevel check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _import(module_part: str) -> Any:
    path = Path(module_part)
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        if not path.is_file():
            raise TargetError(f"no such file: {module_part}")
        name = f"_bilevel_check_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TargetError(f"cannot load {module_part} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as err:
        raise TargetError(f"cannot import {module_part!r}: {err}; give a module path importable from the "
                          "current directory, or a file path ending in .py") from err


def load_target(spec: str) -> Any:
    """The object named by ``MODULE:OBJECT`` or ``FILE.py:OBJECT`` (dots in OBJECT walk attributes)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise TargetError(f"target must look like MODULE:OBJECT or path/to/file.py:OBJECT, got {spec!r}")
    obj = _import(module_part)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{module_part} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _triple(value: Any, where: str) -> tuple[Any, Any, Any]:
    from bilevel import BilevelProblem

    if not (isinstance(value, (tuple, list)) and len(value) == 3 and isinstance(value[0], BilevelProblem)):
        raise TargetError(f"{where} must be (problem, outer, data) with problem a BilevelProblem, "
                          f"got {type(value).__name__}")
    return tuple(value)  # type: ignore[return-value]


def _takes_seed(fn: Callable[..., Any]) -> bool:
    """A parameter named ``seed``, or a required positional one."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seed" or (p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
               for p in params)


def point_source(obj: Any, seed: int, spread: float) -> Callable[[int], tuple[Any, Any, Any]]:
    """``i -> (problem, outer, data)`` for the i-th point, following the protocol above."""
    import torch

    from bilevel import BilevelProblem
    from bilevel.pytree import tree_map

    if isinstance(obj, BilevelProblem):
        if not hasattr(obj, "example_outer"):
            raise TargetError(f"the {type(obj).__name__} instance needs an attribute example_outer (and "
                              "optionally example_data), or export a factory returning (problem, outer, data)")
        outer = obj.example_outer() if callable(obj.example_outer) else obj.example_outer
        base = (obj, outer, getattr(obj, "example_data", None))
    elif isinstance(obj, (tuple, list)):
        base = _triple(obj, "the target")
    elif callable(obj) and _takes_seed(obj):
        return lambda i: _triple(obj(seed + i), f"{getattr(obj, '__name__', 'the factory')}(seed)")
    elif callable(obj):
        base = _triple(obj(), f"{getattr(obj, '__name__', 'the factory')}()")
    else:
        raise TargetError(f"the target is a {type(obj).__name__}; expected a factory, a (problem, outer, data) "
                          "tuple or a BilevelProblem instance with example_outer")

    def at(i: int) -> tuple[Any, Any, Any]:
        problem, outer, data = base
        if i == 0:
            return problem, outer, data
        g = torch.Generator().manual_seed(seed * 7919 + i)
        noise = lambda t: t + spread * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)  # noqa: E731
        return problem, tree_map(noise, outer), data

    return at


def _solver(name: str, rtol: float) -> Any:
    if name not in SOLVERS:
        raise TargetError(f"unknown solver {name!r}; choose from {', '.join(SOLVERS)}")
    cls = SOLVERS[name]
    return cls() if name == "direct" else cls(rtol=rtol)


def _configurations(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from bilevel import MODES

    out = []
    for mode in [m.strip() for m in args.mode.split(",") if m.strip()]:
        if mode not in MODES:
            raise TargetError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "implicit":
            out += [(mode, _solver(s.strip(), args.solver_rtol)) for s in args.solver.split(",") if s.strip()]
        else:
            out.append((mode, None))
    return out


def run(args: argparse.Namespace) -> int:
    from bilevel.testing.check import REFERENCES, check_hypergradient, solver_name

    try:
        configurations = _configurations(args)
        references = tuple(r.strip() for r in args.references.split(",") if r.strip())
        unknown = sorted(set(references) - set(REFERENCES))
        if unknown:
            raise TargetError(f"unknown references {unknown}; choose from {', '.join(REFERENCES)}")
        if args.points < 1:
            raise TargetError(f"--points must be >= 1, got {args.points}")
        source = point_source(load_target(args.target), args.seed, args.spread)
    except TargetError as err:
        print(f"bilevel check: {err}", file=sys.stderr)
        return 2

    header = (f"{'point':>5}  {'mode':<12}{'solver':<22}{'reference':<20}{'rel. error':>11}"
              f"{'inner res.':>11}{'iters':>7}  result")
    print(f"bilevel check {args.target}: {args.points} point(s), rtol {args.rtol:.0e}")
    print(header)
    print("-" * len(header))
    failed_reports = []
    for i in range(args.points):
        for mode, solver in configurations:
            label = solver_name(solver)
            try:
                problem, outer, data = source(i)
                report = check_hypergradient(
                    problem, outer, data, mode=mode, solver=solver, references=references, rtol=args.rtol,
                    atol=args.atol, residual_tol=args.residual_tol, eps=args.eps, seed=args.seed + i,
                    raise_exception=False)
            except Exception as err:  # a user's problem may fail in any way: report it as a failed row
                print(f"{i:>5}  {mode:<12}{label:<22}{'-':<20}{'-':>11}{'-':>11}{'-':>7}  ERROR "
                      f"{type(err).__name__}: {err}")
                failed_reports.append(f"point {i}, mode {mode}, solver {label}: {type(err).__name__}: {err}")
                continue
            iters = "-" if report.solve is None else str(int(report.solve.iterations.max()))
            for c in report.comparisons:
                err_text = "-" if c.rel_error is None else f"{c.rel_error:.2e}"
                verdict = c.verdict()
                if verdict == "ok" and not report.residual_ok:
                    verdict = "FAIL (inner residual)"
                print(f"{i:>5}  {mode:<12}{label:<22}{c.reference:<20}{err_text:>11}"
                      f"{report.inner_residual:>11.1e}{iters:>7}  {verdict}")
            if not report.passed:
                failed_reports.append(f"point {i}:\n{report.table()}")
    if failed_reports:
        print(f"\n{len(failed_reports)} check(s) FAILED:\n")
        print("\n\n".join(failed_reports))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
