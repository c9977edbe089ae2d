"""The outer loop: hypergradient descent with HOAG's safeguards.

Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
At outer step ``k`` the inner problem is solved to ``||grad g|| <= eps_k`` and
the adjoint system to ``||A v - b|| <= eps_k``, with a tolerance that tightens
geometrically, ``eps_k = max(tol_min, tol0 * tol_decay^k)``: early steps are
cheap and inexact, later ones exact. Both solves start from the previous
step's solution (warm starts). A step ``theta - alpha * grad F`` whose
validation loss is higher than the current one is rejected and ``alpha``
halves; an accepted step lets ``alpha`` grow a little.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

from torch import Tensor

from bilevel import BilevelProblem, HypergradientResult, hypergradient
from bilevel.pytree import PyTree
from bilevel.solvers import CG, LinearSolver

__all__ = ["HOAGState", "StepInfo", "HOAG"]


@dataclasses.dataclass
class HOAGState:
    """Everything the loop needs to continue: save it with :meth:`state_dict` to resume exactly."""

    outer: Tensor
    inner: PyTree
    loss: float
    grad: Tensor
    step_size: float
    iteration: int
    adjoint: Tensor | None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "HOAGState":
        return cls(**state)


class StepInfo(NamedTuple):
    """What one outer step did."""

    accepted: bool
    candidate_loss: float
    tol: float
    inner_residual: float
    solve_iterations: int
    seconds: float


class HOAG:
    """Hypergradient descent on ``outer`` for a :class:`~bilevel.BilevelProblem` whose
    :meth:`solve_inner` honours ``problem.inner_tol``.

    Args:
        problem: the bilevel problem; its ``inner_tol`` and ``residual_tol`` are set each step.
        data: passed to the problem.
        solver: adjoint solver with ``rtol``/``atol`` fields (default ``CG(maxiter=1000)``); its
            tolerance is replaced by ``atol = eps_k`` and ``rtol`` each step.
        tol0, tol_decay, tol_min: the schedule ``eps_k = max(tol_min, tol0 * tol_decay^k)``.
        first_move: the first step moves the largest coordinate of ``outer`` by this much
            (``alpha_0 = first_move / max|grad F|``).
        grow, shrink: step size factors after an accepted / rejected step.
        on_failure: policy for non-converged solves (see :func:`bilevel.hypergradient`).
        rtol: the adjoint solve's relative tolerance beside the schedule's absolute one (default 0:
            the schedule alone).
    """

    def __init__(self, problem: BilevelProblem, data: Any, *, solver: LinearSolver | None = None,
                 tol0: float = 1e-3, tol_decay: float = 0.9, tol_min: float = 1e-8, first_move: float = 1.0,
                 grow: float = 1.5, shrink: float = 0.5, on_failure: str = "warn", rtol: float = 0.0):
        if not (0 < tol_decay <= 1 and 0 < tol_min <= tol0):
            raise ValueError(f"need 0 < tol_decay <= 1 and 0 < tol_min <= tol0, got tol_decay={tol_decay}, "
                             f"tol_min={tol_min}, tol0={tol0}")
        if not (grow >= 1 and 0 < shrink < 1 and first_move > 0):
            raise ValueError(f"need grow >= 1, 0 < shrink < 1 and first_move > 0, got grow={grow}, "
                             f"shrink={shrink}, first_move={first_move}")
        self.problem = problem
        self.data = data
        self.solver = solver if solver is not None else CG(maxiter=1000)
        self.tol0, self.tol_decay, self.tol_min = tol0, tol_decay, tol_min
        self.first_move, self.grow, self.shrink = first_move, grow, shrink
        self.on_failure = on_failure
        self.rtol = rtol

    def tolerance(self, iteration: int) -> float:
        return max(self.tol_min, self.tol0 * self.tol_decay ** iteration)

    def evaluate(self, outer: Tensor, iteration: int, init: PyTree | None = None,
                 adjoint: Tensor | None = None) -> tuple[HypergradientResult, Tensor | None]:
        """Hypergradient at ``outer`` with the tolerance of ``iteration``; returns it and the adjoint solution."""
        tol = self.tolerance(iteration)
        self.problem.inner_tol = tol
        self.problem.residual_tol = tol
        base = self.solver
        if dataclasses.is_dataclass(base) and {"rtol", "atol"} <= {f.name for f in dataclasses.fields(base)}:
            base = dataclasses.replace(base, rtol=self.rtol, atol=tol)
        result = hypergradient(self.problem, outer, self.data, solver=base, init=init,
                               adjoint_x0=adjoint, on_failure=self.on_failure)
        return result, result.solve.x.detach()

    def start(self, outer: Tensor) -> HOAGState:
        """State at the initial ``outer`` (one hypergradient evaluation)."""
        outer = outer.detach().clone()
        result, adjoint = self.evaluate(outer, 0)
        scale = float(result.grad.abs().max())
        step_size = self.first_move / scale if scale > 0 else 1.0
        return HOAGState(outer, result.inner, float(result.outer_loss), result.grad.detach(), step_size, 0,
                         adjoint)

    def step(self, state: HOAGState) -> tuple[HOAGState, StepInfo]:
        """One outer step: try ``outer - step_size * grad``; accept it if the validation loss did not rise."""
        began = time.perf_counter()
        iteration = state.iteration + 1
        candidate = state.outer - state.step_size * state.grad
        result, adjoint = self.evaluate(candidate, iteration, state.inner, state.adjoint)
        loss = float(result.outer_loss)
        accepted = loss <= state.loss
        if accepted:
            new = HOAGState(candidate, result.inner, loss, result.grad.detach(), state.step_size * self.grow,
                            iteration, adjoint)
        else:
            new = dataclasses.replace(state, step_size=state.step_size * self.shrink, iteration=iteration,
                                      adjoint=adjoint)
        solve_iterations = int(result.solve.iterations.max()) if result.solve is not None else 0
        info = StepInfo(accepted, loss, self.tolerance(iteration), float(result.inner_residual), solve_iterations,
                        time.perf_counter() - began)
        return new, info
