"""``bilevel.implicit_root``: make any inner solver differentiable by the implicit function theorem.

Given ``phi*(args)`` with ``G(phi*, *args) = 0``, the vector-Jacobian product of
``phi*`` with a cotangent ``u`` is (implicit function theorem)::

    A^T v = u,   A = d_phi G(phi*, args)       # matrix-free linear solve
    u^T d phi*/d args = -(d_args G)^T v

The decorated function runs without a graph; its output enters autograd
through a ``torch.autograd.Function`` whose backward builds the linearization
of ``G`` once (``torch.func.vjp``) and solves with a :mod:`bilevel.solvers`
solver. The function composes with ``.backward()``, ``torch.func.grad`` and
``torch.func.vmap`` (the vmap rule is generated), in the spirit of jaxopt's
``custom_root`` (Blondel et al., NeurIPS 2022).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.adjoint import AdjointOperator
from bilevel.errors import BilevelError
from bilevel.policy import (OnFailure, check_inner_residual, check_solve, host_checks_deferred, require_finite,
                            validate_on_failure)
from bilevel.pytree import PyTree, check_same_structure, ravel, tree_norm
from bilevel.solvers import LinearSolver, get_solver
from bilevel.solvers._base import IterativeSolver, poison

__all__ = ["implicit_root"]


@dataclass(frozen=True)
class _Spec:
    """Everything the autograd Function needs besides tensors."""

    optimality: Callable[..., PyTree]
    solver: LinearSolver
    on_failure: OnFailure
    residual_tol: float | None
    phi_spec: pytree.TreeSpec
    n_phi: int
    args_spec: pytree.TreeSpec
    arg_leaves: tuple[Any, ...]  # non-tensor leaves kept, tensor slots None
    tensor_slots: tuple[int, ...]
    differentiable: tuple[bool, ...]  # per tensor slot: floating point
    owner: Any

    def rebuild_args(self, tensors: tuple[Tensor, ...]) -> tuple[Any, ...]:
        leaves = list(self.arg_leaves)
        for slot, t in zip(self.tensor_slots, tensors):
            leaves[slot] = t
        return pytree.tree_unflatten(leaves, self.args_spec)


class _ImplicitRoot(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(spec: _Spec, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in tensors[: spec.n_phi])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        spec = inputs[0]
        ctx.spec = spec
        ctx.save_for_backward(*output, *inputs[1 + spec.n_phi:])

    @staticmethod
    def backward(ctx: Any, *grad_phi: Tensor | None) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        phi_leaves, arg_tensors = saved[: spec.n_phi], saved[spec.n_phi:]
        phi = pytree.tree_unflatten(list(phi_leaves), spec.phi_spec)
        diff_idx = [i for i, d in enumerate(spec.differentiable) if d]

        def condition(p: PyTree, *diff_tensors: Tensor) -> PyTree:
            tensors = list(arg_tensors)
            for i, t in zip(diff_idx, diff_tensors):
                tensors[i] = t
            residual = spec.optimality(p, *spec.rebuild_args(tuple(tensors)))
            check_same_structure(p, residual, "the optimality condition's output", "the inner solution")
            return residual

        residual, vjp_fn = torch.func.vjp(condition, phi, *[arg_tensors[i] for i in diff_idx])
        cotangent = [torch.zeros_like(p) if g is None else g for p, g in zip(phi_leaves, grad_phi)]
        b, unravel = ravel(pytree.tree_unflatten(cotangent, spec.phi_spec))
        if not host_checks_deferred(b):
            require_finite(b, "the gradient arriving at the decorated function's output",
                           "the loss computed from the solution (or its data) produced NaN/Inf")

        adjoint_matvec = AdjointOperator(vjp_fn, unravel, reuse_last=isinstance(spec.solver, IterativeSolver))
        solve = spec.solver(adjoint_matvec, b)
        cross = adjoint_matvec.cross(solve.x)
        if not host_checks_deferred(b, residual, *phi_leaves):
            check_solve(solve, spec.on_failure)
            check_inner_residual(tree_norm(residual), spec.residual_tol, spec.on_failure)
            require_finite(cross, "the implicit gradient of the decorated function's arguments",
                           "d_args G produced NaN/Inf at the solution")
            if not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (b, *phi_leaves)):
                spec.owner.last_solve = solve
        grads: list[Tensor | None] = [None] * len(arg_tensors)
        for i, g in zip(diff_idx, cross):
            grads[i] = -poison(g, solve.status)
        return (None, *([None] * spec.n_phi), *grads)


def implicit_root(
    optimality: Callable[..., PyTree],
    solver: LinearSolver | str | None = None,
    *,
    on_failure: OnFailure = "warn",
    residual_tol: float | None = 1e-4,
) -> Callable[[Callable[..., PyTree]], Callable[..., PyTree]]:
    """Decorator: differentiate an inner solver's output by the implicit function theorem.

    ``optimality(phi, *args)`` must be zero at the decorated function's output
    ``phi = solve(*args)`` and return the same structure as ``phi`` (a tensor,
    tuple or dict of tensors). Gradients flow to every floating tensor in ``args``
    (nested tuples/dicts included); the solver's own steps are not recorded.

    Args:
        optimality: ``G(phi, *args)``; for a minimizer of ``g``, ``torch.func.grad(g)``.
        solver: a :mod:`bilevel.solvers` solver instance or name (``"gmres"``, ...) for
            ``(d_phi G)^T v = u``; default ``CG()`` (symmetric positive definite ``d_phi G``).
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` a non-converged solve or a
            residual ``||G(phi, *args)|| > residual_tol`` (checked in backward,
            outside vmap). NaN/Inf always raises. The last solve's diagnostics
            are kept in ``decorated.last_solve`` (outside torch.func transforms);
            ``decorated.optimality`` and ``decorated.solver`` are the arguments given here.
        residual_tol: tolerance on the optimality residual; ``None`` disables the check.

    Example::

        @implicit_root(torch.func.grad(inner_loss))
        def ridge(lam, X, y):
            return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1]), X.T @ y)

        w = ridge(lam, X, y)          # w carries the implicit gradient to lam
        outer_loss(w).backward()
    """
    validate_on_failure(on_failure)
    solver = get_solver(solver)

    def decorator(solve: Callable[..., PyTree]) -> Callable[..., PyTree]:
        @functools.wraps(solve)
        def decorated(*args: Any) -> PyTree:
            with torch.no_grad():
                phi = solve(*args)
            phi_leaves, phi_spec = pytree.tree_flatten(phi)
            if not phi_leaves or not all(isinstance(p, Tensor) for p in phi_leaves):
                raise BilevelError(f"{solve.__name__} must return a tensor or a tuple/dict of tensors, "
                                   f"got {type(phi).__name__}")
            arg_leaves, args_spec = pytree.tree_flatten(args)
            slots = tuple(i for i, a in enumerate(arg_leaves) if isinstance(a, Tensor))
            if not host_checks_deferred(args):  # host-side check; impossible under vmap or capture
                require_finite(phi, f"the output of {solve.__name__}",
                               "the inner solver diverged or was given bad input")
            spec = _Spec(
                optimality=optimality, solver=solver, on_failure=on_failure, residual_tol=residual_tol,
                phi_spec=phi_spec, n_phi=len(phi_leaves), args_spec=args_spec,
                arg_leaves=tuple(None if i in slots else a for i, a in enumerate(arg_leaves)),
                tensor_slots=slots,
                differentiable=tuple(arg_leaves[i].is_floating_point() or arg_leaves[i].is_complex() for i in slots),
                owner=decorated,
            )
            detached = [p.detach() for p in phi_leaves]
            out = _ImplicitRoot.apply(spec, *detached, *[arg_leaves[i] for i in slots])
            return pytree.tree_unflatten(list(out), phi_spec)

        decorated.optimality = optimality  # type: ignore[attr-defined]
        decorated.solver = solver  # type: ignore[attr-defined]
        decorated.last_solve = None  # type: ignore[attr-defined]
        return decorated

    return decorator
