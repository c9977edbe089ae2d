"""The adjoint operator of the implicit function theorem, as a matvec for the linear solvers."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from bilevel.pytree import PyTree, ravel

__all__ = ["AdjointOperator"]


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

    def __init__(self, vjp_fn: Callable[[PyTree], tuple[Any, ...]], unravel: Callable[[Tensor], PyTree],
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
