"""A function decorated with :func:`bilevel.implicit_root`, seen as a bilevel problem.

Convention: the decorated function is called ``fn(outer, *args)`` and the outer
loss ``outer_loss(phi, outer, *args)``, where ``args`` is ``data`` when it is a
tuple, ``(data,)`` for any other value, and ``()`` for ``None``. The checked
hypergradient is what the user gets: autograd through ``fn``, i.e. through the
decorator's implicit backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.errors import BilevelError
from bilevel.problem import BilevelProblem, scalar_objective
from bilevel.pytree import PyTree, tree_map
from bilevel.solvers import SolveResult

__all__ = ["RootFunction", "call_args"]


def call_args(data: Any) -> tuple[Any, ...]:
    """The positional arguments after ``outer``: ``data`` as a tuple."""
    if data is None:
        return ()
    return tuple(data) if isinstance(data, tuple) else (data,)


class RootFunction(BilevelProblem):
    """Bilevel problem whose inner solver is an ``implicit_root``-decorated ``fn``.

    ``solve_inner`` runs the undecorated solver (``fn.__wrapped__``, keeping the
    solution of a ``has_aux=True`` function); ``optimality`` is the condition passed
    here (or ``fn.optimality`` when the decorator exposes it).
    """

    def __init__(self, fn: Callable[..., PyTree], outer_loss: Callable[..., Tensor],
                 optimality: Callable[..., PyTree] | None = None):
        if not callable(outer_loss):
            raise BilevelError("checking a function needs outer_loss=callable(phi, outer, *args) returning "
                               "the scalar outer loss")
        self.fn = fn
        self.solve = getattr(fn, "__wrapped__", fn)
        self.loss = scalar_objective(outer_loss, "outer_loss")
        self.condition = optimality if optimality is not None else getattr(fn, "optimality", None)
        self.residual_tol = None

    @property
    def name(self) -> str:
        return getattr(self.solve, "__qualname__", type(self.solve).__name__)

    @property
    def has_optimality(self) -> bool:
        return self.condition is not None

    def solve_inner(self, outer: PyTree, data: Any, init: PyTree) -> PyTree:
        with torch.no_grad():
            out = self.solve(outer, *call_args(data))
        if getattr(self.fn, "has_aux", False):  # (solution, aux): the aux takes no part
            out = out[0]
        return tree_map(torch.Tensor.detach, out)

    def initial_inner(self, outer: PyTree, data: Any) -> PyTree:
        return self.solve_inner(outer, data, None)

    def optimality(self, inner: PyTree, outer: PyTree, data: Any) -> PyTree:
        if self.condition is None:
            raise BilevelError(f"{self.name}: pass optimality=G(phi, outer, *args) to check_hypergradient")
        return self.condition(inner, outer, *call_args(data))

    def outer_objective(self, inner: PyTree, outer: PyTree, data: Any) -> Tensor:
        return self.loss(inner, outer, *call_args(data))

    def differentiate(self, outer: PyTree, data: Any) -> tuple[PyTree, PyTree, Tensor, SolveResult | None]:
        """``(grad, phi, loss, solve)``: autograd through the decorated function, as a user runs it."""
        leaves, spec = pytree.tree_flatten(outer)
        live = [t.detach().requires_grad_(True) for t in leaves]
        outer_live = pytree.tree_unflatten(live, spec)
        phi = self.fn(outer_live, *call_args(data))
        if getattr(self.fn, "has_aux", False):
            phi = phi[0]
        loss = self.loss(phi, outer_live, *call_args(data))
        grads = torch.autograd.grad(loss, live, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(live, grads)]
        solve = getattr(self.fn, "last_solve", None)
        return (pytree.tree_unflatten(grads, spec), tree_map(torch.Tensor.detach, phi), loss.detach(),
                solve if isinstance(solve, SolveResult) else None)
