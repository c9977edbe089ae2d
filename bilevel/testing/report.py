"""What :func:`~bilevel.testing.check_hypergradient` found, and how it prints."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bilevel.pytree import PyTree
from bilevel.solvers import SolveResult, Status

__all__ = ["Comparison", "HypergradientReport"]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The checked hypergradient against one reference.

    Passes when ``abs_error <= atol + rtol * ref_norm`` (``abs_error = ||g - r||``),
    or when it is not ``enforced`` (a reference that could not converge), or when
    it was ``skipped`` (not applicable; ``detail`` says why).
    """

    reference: str
    abs_error: float | None
    ref_norm: float | None
    rtol: float
    atol: float
    enforced: bool = True
    detail: str = ""

    @property
    def skipped(self) -> bool:
        return self.abs_error is None

    @property
    def rel_error(self) -> float | None:
        """``||g - r|| / ||r||`` (``inf`` when the reference is zero and ``g`` is not)."""
        if self.abs_error is None or self.ref_norm is None:
            return None
        if self.ref_norm == 0.0:
            return 0.0 if self.abs_error == 0.0 else math.inf
        return self.abs_error / self.ref_norm

    @property
    def within_tolerance(self) -> bool:
        if self.abs_error is None or self.ref_norm is None:
            return True
        return self.abs_error <= self.atol + self.rtol * self.ref_norm

    @property
    def passed(self) -> bool:
        return self.within_tolerance or not self.enforced

    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        if self.within_tolerance:
            return "ok"
        return "FAIL" if self.enforced else "differs"


@dataclasses.dataclass(frozen=True)
class HypergradientReport:
    """Result of a hypergradient check; ``str(report)`` is a readable table.

    Attributes:
        problem: name of the checked problem or function.
        mode, solver: how the checked hypergradient was computed.
        grad: the checked hypergradient (in the check's dtype).
        outer_loss: ``f(phi, theta)`` at the checked inner solution.
        inner_residual: ``||G(phi, theta)||`` at the inner solution the checked
            hypergradient used (``nan`` when no optimality condition is known).
        reference_residual: ``||G||`` at the Newton-polished reference solution.
        residual_tol: bound on ``inner_residual`` (``None``: not checked).
        solve: the adjoint solve's diagnostics (implicit mode), else ``None``.
        comparisons: one :class:`Comparison` per reference.
        references: the reference gradients by name (finite differences give the
            directional derivatives along ``fd_directions`` when not every coordinate is probed).
    """

    problem: str
    mode: str
    solver: str
    grad: PyTree
    outer_loss: float
    inner_residual: float
    reference_residual: float
    residual_tol: float | None
    solve: SolveResult | None
    comparisons: tuple[Comparison, ...]
    references: dict[str, Any]

    @property
    def residual_ok(self) -> bool:
        if self.residual_tol is None or math.isnan(self.inner_residual):
            return True
        return self.inner_residual <= self.residual_tol

    @property
    def passed(self) -> bool:
        return self.residual_ok and all(c.passed for c in self.comparisons)

    def comparison(self, reference: str) -> Comparison:
        """The comparison with ``reference`` (``"finite_differences"``, ``"unrolled"``, ``"direct"``)."""
        for c in self.comparisons:
            if c.reference == reference:
                return c
        raise KeyError(f"no comparison with {reference!r}; have {[c.reference for c in self.comparisons]}")

    def failures(self) -> list[str]:
        """One line per failed criterion."""
        out = []
        if not self.residual_ok:
            out.append(f"inner residual {self.inner_residual:.2e} > residual_tol {self.residual_tol:.1e}")
        for c in self.comparisons:
            if not c.passed:
                out.append(f"{c.reference}: relative error {c.rel_error:.2e} > rtol {c.rtol:.1e}")
        return out

    def hints(self) -> list[str]:
        """Likely causes of the failures, from which checks disagree."""
        if self.passed:
            return []
        by_name = {c.reference: c for c in self.comparisons}
        failed = {name for name, c in by_name.items() if not c.passed}
        direct_ok = "direct" in by_name and by_name["direct"].within_tolerance and not by_name["direct"].skipped
        out = []
        if not self.residual_ok:
            out.append("the inner solution is not a root of the optimality condition: solve_inner stops too "
                       "early, or optimality() is not the condition solve_inner solves")
        if "direct" in failed and self.residual_ok:
            if self.solve is not None and not bool(self.solve.converged.all()):
                status = Status(int(self.solve.status.reshape(-1)[0])).name
                out.append(f"the adjoint solve did not converge ({status}): raise maxiter, or use a solver "
                           "that fits d_phi G (CG: SPD; MINRES: symmetric; GMRES/BiCGSTAB: general)")
            else:
                out.append("the adjoint solve returned an inaccurate solution: tighten the solver's rtol, or "
                           "use a solver that fits the structure of d_phi G")
        if "finite_differences" in failed and direct_ok and self.residual_ok:
            out.append("the implicit hypergradient is self-consistent but is not the derivative of the outer "
                       "loss: optimality() or outer_objective() misses a dependence on the outer parameters "
                       "(a detached tensor, a term left out), or the inner problem is not smooth here")
        if "unrolled" in failed and direct_ok:
            out.append("unrolled differentiation through inner_update disagrees: inner_update is not the "
                       "iteration whose fixed points are the roots of optimality()")
        if not out:
            out.append("compare the references above: the ones that agree with each other are likely right")
        return out

    def table(self) -> str:
        status = "passed" if self.passed else "FAILED"
        lines = [f"hypergradient check of {self.problem} (mode={self.mode}, solver={self.solver}): {status}"]
        res_line = f"  inner residual ||G(phi, theta)||  {self.inner_residual:.2e}"
        if self.residual_tol is not None and not math.isnan(self.inner_residual):
            res_line += f"  (tolerance {self.residual_tol:.1e}){'' if self.residual_ok else '  FAIL'}"
        lines.append(res_line)
        lines.append(f"  reference inner residual         {self.reference_residual:.2e}")
        lines.append(f"  outer loss                       {self.outer_loss:.6e}")
        if self.solve is not None:
            lines.append(f"  adjoint solve                    {describe_solve(self.solve)}")
        lines.append(f"  {'reference':<20}{'rel. error':>12}{'rtol':>10}  {'result':<8} detail")
        for c in self.comparisons:
            err = "-" if c.rel_error is None else f"{c.rel_error:.2e}"
            lines.append(f"  {c.reference:<20}{err:>12}{c.rtol:>10.1e}  {c.verdict():<8} {c.detail}".rstrip())
        lines += [f"  likely cause: {h}" for h in self.hints()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def describe_solve(solve: SolveResult) -> str:
    """``"CONVERGED after 7 iterations, residual 1.2e-12"`` (worst system of a batch)."""
    status = solve.status.reshape(-1)
    worst = int(status.argmax())
    name = Status(int(status[worst])).name
    its = int(solve.iterations.reshape(-1)[worst])
    res = float(solve.residual_norm.reshape(-1)[worst])
    return f"{name} after {its} iterations, residual {res:.1e}"
