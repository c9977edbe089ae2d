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
``custom_root`` (Blondel et al., NeurIPS 2022). The failure policy is applied in
the backward and forward rules themselves, to the whole batch a transform hands
them (:mod:`bilevel.policy`), so it holds under ``jacrev``, ``jacfwd``, ``hessian``
and ``vmap`` as it does under ``.backward()``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.adjoint import AdjointOperator
from bilevel.errors import BilevelError
from bilevel.policy import (CallPolicy, OnFailure, failed_systems, host_checks_deferred, host_view,
                            inner_residual_failure, nan_where_failed, require_finite, solve_failure,
                            validate_on_failure)
from bilevel.pytree import PyTree, check_same_structure, ravel, tree_norm
from bilevel.solvers import IterativeSolver, LinearSolver, get_solver, poison

__all__ = ["implicit_fixed_point", "implicit_root"]


@dataclass(frozen=True)
class _Spec:
    """Everything the autograd Function needs besides tensors."""

    optimality: Callable[..., PyTree]
    solver: LinearSolver
    policy: CallPolicy  # one per call of the decorated function: it warns at most once
    residual_tol: float | None
    phi_spec: pytree.TreeSpec
    n_phi: int
    args_spec: pytree.TreeSpec  # of (args, kwargs)
    arg_leaves: tuple[Any, ...]  # non-tensor leaves kept, tensor slots None
    tensor_slots: tuple[int, ...]
    differentiable: tuple[bool, ...]  # per tensor slot: floating point
    owner: Any

    def condition(self, phi: PyTree, tensors: Sequence[Tensor]) -> PyTree:
        """``G(phi, *args, **kwargs)`` with the argument tensors ``tensors``, its structure checked."""
        leaves = list(self.arg_leaves)
        for slot, t in zip(self.tensor_slots, tensors):
            leaves[slot] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.args_spec)
        residual = self.optimality(phi, *args, **kwargs)
        check_same_structure(phi, residual, "the optimality condition's output", "the inner solution")
        return residual

    def diff_index(self) -> list[int]:
        return [i for i, d in enumerate(self.differentiable) if d]


def _condition_of(spec: _Spec, arg_tensors: Sequence[Tensor]) -> Callable[..., PyTree]:
    """``(phi, *differentiable argument tensors) -> G``, the other argument tensors held fixed."""
    diff_idx = spec.diff_index()

    def condition(p: PyTree, *diff_tensors: Tensor) -> PyTree:
        tensors = list(arg_tensors)
        for i, t in zip(diff_idx, diff_tensors):
            tensors[i] = t
        return spec.condition(p, tensors)

    return condition


def _report(spec: _Spec, solve: Any, residual: PyTree, rhs: Tensor, phi_leaves: Sequence[Tensor],
            derived: tuple[Tensor, ...], derived_name: str, rhs_name: str) -> tuple[Tensor, ...]:
    """Apply the failure policy to one solve of the backward or forward rule; return ``derived``
    (what was computed from the solve), NaN for the failed systems where nothing can be read.

    The values are read beneath any ``torch.func`` wrapper (:func:`~bilevel.policy.host_view`):
    under ``jacrev``, ``jacfwd`` or ``vmap`` the rule runs once for the whole batch, whose every
    member is checked. With ``on_failure="ignore"`` nothing is read under a transform (a member
    that met NaN keeps its NaN); during compilation or CUDA-graph capture nothing can be read, so
    ``"warn"`` and ``"raise"`` put NaN where a system failed.
    """
    residual_norm = tree_norm(residual)
    hidden = host_checks_deferred(rhs, *phi_leaves, solve.status)
    if hidden and spec.policy.on_failure == "ignore":
        return derived
    view = host_view((rhs, solve, residual_norm, derived))
    if view is None:
        if spec.policy.on_failure == "ignore":
            return derived
        return nan_where_failed(derived, failed_systems(solve.status, residual_norm, spec.residual_tol))
    seen_rhs, seen_solve, seen_residual, seen_derived = view
    if hidden:  # outside the transforms this was checked before the solve
        require_finite(seen_rhs, rhs_name, "the loss computed from the solution, its data or the argument tangents "
                       "produced NaN/Inf")
    spec.policy.report(solve_failure(seen_solve), inner_residual_failure(seen_residual, spec.residual_tol))
    require_finite(seen_derived, derived_name, "the optimality condition's Jacobian produced NaN/Inf at the solution")
    if not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (rhs, *phi_leaves)):
        spec.owner.last_solve = solve
    return derived


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
        ctx.save_for_forward(*inputs[1:1 + spec.n_phi], *inputs[1 + spec.n_phi:])

    @staticmethod
    def backward(ctx: Any, *grad_phi: Tensor | None) -> tuple[Tensor | None, ...]:
        """Reverse mode: ``A^T v = u``, then ``-(d_args G)^T v`` for every differentiable argument."""
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        phi_leaves, arg_tensors = saved[: spec.n_phi], saved[spec.n_phi:]
        phi = pytree.tree_unflatten(list(phi_leaves), spec.phi_spec)
        diff_idx = spec.diff_index()

        residual, vjp_fn = torch.func.vjp(_condition_of(spec, arg_tensors), phi, *[arg_tensors[i] for i in diff_idx])
        cotangent = [torch.zeros_like(p) if g is None else g for p, g in zip(phi_leaves, grad_phi)]
        b, unravel = ravel(pytree.tree_unflatten(cotangent, spec.phi_spec))
        if not host_checks_deferred(b):
            require_finite(b, "the gradient arriving at the decorated function's output",
                           "the loss computed from the solution (or its data) produced NaN/Inf")

        adjoint_matvec = AdjointOperator(vjp_fn, unravel, reuse_last=isinstance(spec.solver, IterativeSolver))
        solve = spec.solver(adjoint_matvec, b)
        cross = tuple(poison(g, solve.status) for g in adjoint_matvec.cross(solve.x))
        cross = _report(spec, solve, residual, b, phi_leaves, cross,
                        "the implicit gradient of the decorated function's arguments",
                        "the gradient arriving at the decorated function's output")
        grads: list[Tensor | None] = [None] * len(arg_tensors)
        for i, g in zip(diff_idx, cross):
            grads[i] = -g
        return (None, *([None] * spec.n_phi), *grads)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        """Forward mode: ``A dphi = -(d_args G) dargs`` with ``A = d_phi G``, solved matrix-free.

        The right-hand side is one forward-mode product of ``G`` in the arguments;
        each solver iteration applies ``A`` by one more (``torch.func.jvp`` in ``phi``).
        """
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        phi_leaves, arg_tensors = saved[: spec.n_phi], saved[spec.n_phi:]
        phi = pytree.tree_unflatten(list(phi_leaves), spec.phi_spec)
        diff_idx = spec.diff_index()
        arg_tangents = tangents[1 + spec.n_phi:]
        condition = _condition_of(spec, arg_tensors)
        primals = [arg_tensors[i] for i in diff_idx]
        directions = [torch.zeros_like(arg_tensors[i]) if arg_tangents[i] is None else arg_tangents[i]
                      for i in diff_idx]
        residual, pushed = torch.func.jvp(lambda *d: condition(phi, *d), tuple(primals), tuple(directions))
        rhs, unravel = ravel(pushed)
        if not host_checks_deferred(rhs):
            require_finite(rhs, "the tangent d_args G dargs", "the argument tangents or G's derivative hold NaN/Inf")

        def forward_matvec(v: Tensor) -> Tensor:
            return ravel(torch.func.jvp(lambda p: condition(p, *primals), (phi,), (unravel(v),))[1])[0]

        solve = spec.solver(forward_matvec, -rhs)
        (dphi,) = _report(spec, solve, residual, rhs, phi_leaves, (poison(solve.x, solve.status),),
                          "the tangent of the decorated function's output", "the tangent d_args G dargs")
        return tuple(pytree.tree_leaves(unravel(dphi)))


def implicit_root(
    optimality: Callable[..., PyTree],
    solver: LinearSolver | str | None = None,
    *,
    has_aux: bool = False,
    on_failure: OnFailure = "warn",
    residual_tol: float | None = 1e-4,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: differentiate an inner solver's output by the implicit function theorem.

    ``optimality(phi, *args, **kwargs)`` must be zero at the decorated function's
    output ``phi = solve(*args, **kwargs)`` and return the same structure as ``phi``
    (a tensor, tuple or dict of tensors). Gradients flow to every floating tensor
    among the arguments, positional or keyword (nested tuples/dicts included); the
    solver's own steps are not recorded. Reverse mode (``.backward()``,
    ``torch.func.grad``/``vjp``/``jacrev``) solves ``A^T v = u``; forward mode
    (``torch.func.jvp``/``jacfwd``) solves ``A dphi = -(d_args G) dargs``, with
    ``A = d_phi G``. Under ``torch.func.vmap`` the solver sees the whole batch and
    stops once every member has converged.

    Args:
        optimality: ``G(phi, *args, **kwargs)``; for a minimizer of ``g``, ``torch.func.grad(g)``.
        solver: a :mod:`bilevel.solvers` solver instance or name (``"gmres"``, ...);
            default ``CG()`` (symmetric positive definite ``d_phi G``).
        has_aux: the decorated function returns ``(phi, aux)``; ``aux`` (iteration
            counts, a state) is returned as it is and takes no part in differentiation.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` a non-converged solve or a
            residual ``||G(phi, *args)|| > residual_tol``, checked when differentiating, under
            every ``torch.func`` transform too (the values are read beneath the wrappers;
            ``"warn"`` warns once per call of the decorated function). NaN/Inf raises, except
            that ``"ignore"`` reads nothing under a transform (a member that met NaN keeps its
            NaN). Where nothing can be read (``torch.compile`` tracing, CUDA-graph capture),
            ``"warn"`` and ``"raise"`` make a failed system's derivative NaN. The last
            solve's diagnostics are kept in ``decorated.last_solve`` (outside torch.func transforms);
            ``decorated.optimality``, ``decorated.solver`` and ``decorated.has_aux`` are
            the arguments given here.
        residual_tol: tolerance on the optimality residual; ``None`` disables the check.

    Example::

        @implicit_root(torch.func.grad(inner_loss))
        def ridge(lam, X, y):
            return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1]), X.T @ y)

        w = ridge(lam, X, y)          # w carries the implicit gradient to lam
        outer_loss(w).backward()
    """
    validate_on_failure(on_failure)
    if not isinstance(has_aux, bool):
        raise BilevelError(f"has_aux must be a bool, got {type(has_aux).__name__}")
    solver = get_solver(solver)

    def decorator(solve: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(solve, "__name__", type(solve).__name__)

        @functools.wraps(solve)
        def decorated(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                out = solve(*args, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise BilevelError(f"{name} must return (solution, aux) with has_aux=True, "
                                       f"got {type(out).__name__}")
                phi, aux = out
            else:
                phi, aux = out, None
            phi_leaves, phi_spec = pytree.tree_flatten(phi)
            if not phi_leaves or not all(isinstance(p, Tensor) for p in phi_leaves):
                hint = "" if has_aux else " (a solver returning (solution, aux) needs has_aux=True)"
                raise BilevelError(f"{name} must return a tensor or a tuple/dict of tensors{hint}, "
                                   f"got {type(phi).__name__}")
            arg_leaves, args_spec = pytree.tree_flatten((args, kwargs))
            slots = tuple(i for i, a in enumerate(arg_leaves) if isinstance(a, Tensor))
            # Read beneath vmap as well, unless on_failure="ignore" there (a NaN member then stays NaN).
            seen = phi if not host_checks_deferred(args, kwargs, phi) else (
                None if on_failure == "ignore" else host_view(phi))
            if seen is not None:
                require_finite(seen, f"the output of {name}", "the inner solver diverged or was given bad input")
            spec = _Spec(
                optimality=optimality, solver=solver, policy=CallPolicy(on_failure), residual_tol=residual_tol,
                phi_spec=phi_spec, n_phi=len(phi_leaves), args_spec=args_spec,
                arg_leaves=tuple(None if i in slots else a for i, a in enumerate(arg_leaves)),
                tensor_slots=slots,
                differentiable=tuple(arg_leaves[i].is_floating_point() or arg_leaves[i].is_complex() for i in slots),
                owner=decorated,
            )
            detached = [p.detach() for p in phi_leaves]
            result = pytree.tree_unflatten(list(_ImplicitRoot.apply(spec, *detached, *[arg_leaves[i] for i in slots])),
                                           phi_spec)
            return (result, aux) if has_aux else result

        decorated.optimality = optimality  # type: ignore[attr-defined]
        decorated.solver = solver  # type: ignore[attr-defined]
        decorated.has_aux = has_aux  # type: ignore[attr-defined]
        decorated.last_solve = None  # type: ignore[attr-defined]
        return decorated

    return decorator


def implicit_fixed_point(
    mapping: Callable[..., PyTree],
    solver: LinearSolver | str | None = None,
    *,
    has_aux: bool = False,
    on_failure: OnFailure = "warn",
    residual_tol: float | None = 1e-4,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: differentiate a fixed point ``z* = mapping(z*, *args, **kwargs)`` implicitly.

    The optimality condition is ``G(z) = z - T(z)``, whose Jacobian ``I - d_z T`` is
    not symmetric in general, so the default solver is ``GMRES()``; the solve
    converges when ``I - d_z T`` is nonsingular (for example ``T`` a contraction,
    as in deep equilibrium models: Bai, Kolter & Koltun, NeurIPS 2019). Everything
    else is as in :func:`implicit_root`.

    Example::

        @implicit_fixed_point(lambda z, W, x: torch.tanh(W @ z + x))
        def equilibrium(W, x):
            z = torch.zeros_like(x)
            for _ in range(100):
                z = torch.tanh(W @ z + x)
            return z
    """
    if not callable(mapping):
        raise BilevelError(f"mapping must be a callable T(z, *args), got {type(mapping).__name__}")

    def residual(z: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        return pytree.tree_map(torch.sub, z, mapping(z, *args, **kwargs))

    decorator = implicit_root(residual, "gmres" if solver is None else solver, has_aux=has_aux,
                              on_failure=on_failure, residual_tol=residual_tol)

    def wrap(solve: Callable[..., Any]) -> Callable[..., Any]:
        decorated = decorator(solve)
        decorated.mapping = mapping  # type: ignore[attr-defined]
        return decorated

    return wrap
