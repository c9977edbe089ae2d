"""The adjoint operator of the implicit function theorem, as a matvec for the linear solvers.

:func:`linearize` builds the vector-Jacobian product of the optimality condition
``G(phi, theta)`` once at the solution; :class:`AdjointOperator` applies it. Two
ways to linearize, equal up to rounding:

* ``"functional"``: ``torch.func.vjp`` (reverse-over-reverse through the functional
  transforms). It composes with ``torch.func.vmap`` and every other transform.
* ``"autograd"``: ``G`` recorded on a plain autograd graph (``phi`` and ``theta`` as
  fresh leaves) and each product one ``torch.autograd.grad`` through it with the
  graph retained: the double-backward Hessian-vector product of hand-written
  PyTorch. It needs readable values outside every ``torch.func`` transform, and it
  runs the derivative formulas of the eager kernels (e.g. ``silu_backward``) where
  the functional transforms run decompositions into elementwise operations:
  ``benchmarks/hvp.py`` measures both.

:func:`gradient`, the default optimality condition ``grad_phi g(phi, theta)``, makes
the same choice for one gradient: ``torch.autograd.grad`` where it applies (about
half the time of ``torch.func.grad`` on a convolutional network on a CPU), else
``torch.func.grad``.

``"auto"`` (the default) uses the autograd graph where it applies (no ``torch.func``
transform active, no CUDA-graph capture or compilation, no input already on an
autograd graph, every output of ``G`` depending on the inputs), else
``torch.func.vjp``; ``"functional"`` always uses ``torch.func.vjp``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.pytree import PyTree, ravel, tree_leaves, tree_map

__all__ = ["AdjointOperator", "gradient", "grads_and_value", "linearize", "LINEARIZATIONS"]

Linearization = Literal["auto", "functional"]
LINEARIZATIONS = ("auto", "functional")
VJP = Callable[[PyTree], tuple[Any, ...]]


def _transformed() -> bool:
    """True under a ``torch.func`` transform, ``torch.compile`` tracing or CUDA-graph capture."""
    return (torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))


def _tensors(*trees: Any) -> list[Tensor] | None:
    """The tensors of ``trees``, or ``None`` when a leaf is neither a tensor nor a plain Python
    value (an object such as a module could hold tensors on an autograd graph out of sight)."""
    leaves = [leaf for tree in trees for leaf in pytree.tree_leaves(tree)]
    if not all(leaf is None or isinstance(leaf, (Tensor, bool, int, float, complex, str)) for leaf in leaves):
        return None
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def autograd_applies(inner: PyTree, outer: PyTree, data: Any) -> bool:
    """True where a plain autograd graph on fresh leaves can stand in for ``torch.func.vjp``:
    no transform is active, and every tensor of ``inner``, ``outer`` and ``data`` is in sight
    and off any autograd graph (whose history fresh leaves would cut)."""
    tensors = _tensors(inner, outer, data)
    return tensors is not None and not _transformed() and not any(t.requires_grad for t in tensors)


def _fresh_leaves(tree: PyTree) -> tuple[list[Tensor], Any]:
    """The tensors of ``tree`` detached as new autograd leaves, and the structure to rebuild it."""
    leaves, spec = pytree.tree_flatten(tree)
    return [t.detach().requires_grad_() for t in leaves], spec


def _split(grads: tuple[Tensor, ...], inner_spec: Any, outer_spec: Any) -> tuple[PyTree, PyTree]:
    """Gradients for the inner leaves followed by the outer ones, as the two pytrees."""
    n = inner_spec.num_leaves
    return pytree.tree_unflatten(list(grads[:n]), inner_spec), pytree.tree_unflatten(list(grads[n:]), outer_spec)


def gradient(objective: Callable[[PyTree, PyTree, Any], Tensor], inner: PyTree, outer: PyTree,
             data: Any) -> PyTree:
    """``grad_phi objective(phi, outer, data)`` at ``phi = inner``, as ``torch.func.grad`` gives it:
    by ``torch.autograd.grad`` outside the transforms, else by ``torch.func.grad``.

    On the autograd path each tensor of ``inner`` enters as a fresh leaf, or as an alias
    (``view_as``) when it is on a graph already, so the result is the partial derivative in
    this argument alone; it stays on the graph (``create_graph``) exactly when some input is.
    """
    tensors = _tensors(inner, outer, data)
    if tensors is None or _transformed():
        return torch.func.grad(objective)(inner, outer, data)
    tracked = any(t.requires_grad for t in tensors)
    with torch.enable_grad():
        leaves, spec = pytree.tree_flatten(inner)
        leaves = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in leaves]
        value = objective(pytree.tree_unflatten(leaves, spec), outer, data)
        grads = torch.autograd.grad(value, leaves, create_graph=tracked, allow_unused=True,
                                    materialize_grads=True)
    return pytree.tree_unflatten(list(grads), spec)


def grads_and_value(objective: Callable[[PyTree, PyTree, Any], Tensor], inner: PyTree, outer: PyTree,
                    data: Any) -> tuple[tuple[PyTree, PyTree], Tensor]:
    """``((d_inner f, d_outer f), f)`` for ``f = objective(inner, outer, data)``, as
    ``torch.func.grad_and_value(objective, argnums=(0, 1))`` gives them: by one
    ``torch.autograd.grad`` on fresh leaves where :func:`autograd_applies`, else by it."""
    if not autograd_applies(inner, outer, data):
        return torch.func.grad_and_value(objective, argnums=(0, 1))(inner, outer, data)
    with torch.enable_grad():
        inner_leaves, inner_spec = _fresh_leaves(inner)
        outer_leaves, outer_spec = _fresh_leaves(outer)
        value = objective(pytree.tree_unflatten(inner_leaves, inner_spec),
                          pytree.tree_unflatten(outer_leaves, outer_spec), data)
        grads = torch.autograd.grad(value, inner_leaves + outer_leaves, allow_unused=True, materialize_grads=True)
    return _split(grads, inner_spec, outer_spec), value.detach()


def _autograd_vjp(condition: Callable[[PyTree, PyTree], PyTree], inner: PyTree,
                  outer: PyTree) -> tuple[PyTree, VJP] | None:
    """``(G, vjp_fn)`` on a retained autograd graph, or ``None`` when an output of ``G`` does
    not depend on the inputs (autograd cannot differentiate it)."""
    with torch.enable_grad():
        inputs, inner_spec = _fresh_leaves(inner)
        outer_inputs, outer_spec = _fresh_leaves(outer)
        residual = condition(pytree.tree_unflatten(inputs, inner_spec), pytree.tree_unflatten(outer_inputs, outer_spec))
    outputs = tree_leaves(residual)
    if not all(t.requires_grad for t in outputs):
        return None

    def vjp_fn(cotangent: PyTree) -> tuple[PyTree, PyTree]:
        grads = torch.autograd.grad(outputs, inputs + outer_inputs, tree_leaves(cotangent), retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        return _split(grads, inner_spec, outer_spec)

    return tree_map(torch.Tensor.detach, residual), vjp_fn


def linearize(condition: Callable[[PyTree, PyTree], PyTree], inner: PyTree, outer: PyTree, data: Any,
              how: Linearization = "auto") -> tuple[PyTree, VJP]:
    """``(G(inner, outer), vjp_fn)`` with ``vjp_fn(v) = ((d_phi G)^T v, (d_theta G)^T v)``,
    linearized ``how`` (see the module docstring)."""
    if how != "functional" and autograd_applies(inner, outer, data):
        built = _autograd_vjp(condition, inner, outer)
        if built is not None:
            return built
    return torch.func.vjp(condition, inner, outer)


class AdjointOperator:
    """``v -> (d_phi G)^T v`` on flat vectors, from the VJP of ``G`` linearized once at the solution.

    One application is one call of ``vjp_fn``, which returns the cotangents of every
    input of ``G``: the ``phi`` part is the matvec, the others (``(d_theta G)^T v``) are
    kept for the last vector applied. The iterative solvers close with the true residual
    ``b - A x``, an application at their final iterate ``x``, so the cross term
    ``(d_theta G)^T x`` of the implicit gradient comes from :meth:`cross` at no extra cost
    (a fresh VJP when the solver did not apply the operator at ``x`` last, e.g. ``Direct``).

    The last application is recognized by the identity of ``x``, which holds only for a
    solver that never changes a vector in place after applying the operator to it: pass
    ``reuse_last=True`` only for such solvers (the library's iterative solvers).
    """

    def __init__(self, vjp_fn: VJP, unravel: Callable[[Tensor], PyTree],
                 reuse_last: bool):
        self._vjp_fn, self._unravel, self._reuse_last = vjp_fn, unravel, reuse_last
        self._last: tuple[Tensor, tuple[Any, ...]] | None = None

    def __call__(self, v: Tensor) -> Tensor:
        to_phi, *to_others = self._vjp_fn(self._unravel(v))
        self._last = (v, tuple(to_others))
        return ravel(to_phi)[0]

    def cross(self, x: Tensor) -> tuple[Any, ...]:
        """The cotangents ``(d_theta G)^T x`` of every input of ``G`` but ``phi``."""
        if self._reuse_last and self._last is not None and self._last[0] is x:
            return self._last[1]
        return tuple(self._vjp_fn(self._unravel(x))[1:])
