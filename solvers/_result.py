"""The result every linear solver returns, and the status codes it reports."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._transforms import values_hidden

T = TypeVar("T")


def register_result_pytree(cls: type[T]) -> type[T]:
    """Register a frozen dataclass as a pytree whose ``None`` fields are left out.

    ``torch.func.vmap`` accepts only tensors among its outputs; dropping the
    unset optional fields lets results with ``None`` in them leave a vmap.
    """
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten(obj: Any) -> tuple[list[Any], tuple[str, ...]]:
        present = tuple(n for n in names if getattr(obj, n) is not None)
        return [getattr(obj, n) for n in present], present

    def unflatten(children: Any, present: tuple[str, ...]) -> Any:
        return cls(**dict(zip(present, children)))

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls


SHOWN_VALUES = 8
"""Tensors of at most this many elements show their values in a result's ``repr``."""


class _Shown:
    """A string that ``repr`` writes as it is (a leaf of a shown pytree)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _number(value: Any) -> str:
    if not isinstance(value, float):
        return repr(value)
    text = f"{value:.4g}"
    return text if any(c in text for c in ".ein") else text + ".0"


def _nested(values: Any, word: Callable[[Any], str]) -> str:
    if isinstance(values, list):
        return "[" + ", ".join(_nested(v, word) for v in values) + "]"
    return word(values)


def show(value: Any, status: type[enum.IntEnum] | None = None) -> str:
    """``value`` for a ``repr``: plain numbers for a 0-d tensor, (nested) lists for a few elements,
    shape and dtype for more or for values unreadable now (vmap, CUDA-graph capture); with
    ``status``, that enum's names instead of codes. Pytrees keep their structure, and
    results inside them show as their own ``repr``."""
    def is_result(x: Any) -> bool:
        return getattr(type(x), "__repr__", None) is result_repr

    def leaf(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return _Shown(repr(t))
        if values_hidden(t) or t.numel() > SHOWN_VALUES:
            return _Shown(f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype})")
        return _Shown(_nested(t.detach().cpu().tolist(), lambda v: status(v).name if status else _number(v)))

    return repr(pytree.tree_map(leaf, value, is_leaf=is_result))


def result_repr(obj: Any) -> str:
    """``Name(field=..., ...)`` of a result dataclass, each field by :func:`show`; a field named
    ``status`` by the names of the class's ``STATUS`` enum (default :class:`Status`)."""
    codes = getattr(type(obj), "STATUS", Status)
    fields = ", ".join(f"{f.name}={show(getattr(obj, f.name), status=codes if f.name == 'status' else None)}"
                       for f in dataclasses.fields(obj))
    return f"{type(obj).__name__}({fields})"


class Status(enum.IntEnum):
    """Per-system outcome of a linear solve.

    ``CONVERGED`` exactly when the true residual, recomputed after the
    iteration, meets ``||b - A x|| <= max(rtol ||b||, atol)``; every other code
    says why not. Stored as an integer tensor in :class:`SolveResult.status` so
    that it survives ``torch.func.vmap``; convert with ``Status(int(code))``.
    """

    CONVERGED = 0
    MAX_ITERATIONS = 1
    BREAKDOWN = 2
    NEGATIVE_CURVATURE = 3
    DIVERGED = 4
    NONFINITE = 5
    INACCURATE = 6
    SINGULAR = 7
    NONSYMMETRIC = 8

    def describe(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Status.CONVERGED: "converged to the requested tolerance",
    Status.MAX_ITERATIONS: "reached maxiter before the tolerance; raise maxiter, "
    "loosen rtol/atol, or precondition (M=...)",
    Status.BREAKDOWN: "the Krylov recurrence broke down (a zero or tiny pivot); "
    "the operator may be singular: try Direct() or GMRES",
    Status.NEGATIVE_CURVATURE: "CG met non-positive curvature p^T A p <= 0: the operator "
    "is not positive definite; use MINRES (symmetric indefinite) or GMRES, or add damping",
    Status.DIVERGED: "the iteration diverged (growing terms); for the Neumann series the "
    "step alpha is too large: need spectral radius of (I - alpha A) < 1",
    Status.NONFINITE: "NaN or Inf in the right-hand side, the operator output or the iterate "
    "(the solution is NaN)",
    Status.INACCURATE: "the solver's recurrence met the tolerance but the true residual "
    "||b - A x|| does not: accuracy was lost to rounding (float32, ill-conditioning) or the "
    "operator is not the same linear map on every call; use float64, precondition (M=...), "
    "add damping (ridge=...) or loosen rtol",
    Status.SINGULAR: "the operator is singular at this precision and b is not in its range "
    "(||A|| ||x|| / ||b|| exceeds 0.01/eps): the system has no solution; regularize (ridge=...) "
    "or make the inner solution unique",
    Status.NONSYMMETRIC: "the operator is not symmetric (<u, A v> != <A u, v> on the solver's "
    "own vectors) but this solver needs a symmetric one: use GMRES or BiCGSTAB",
}


@register_result_pytree
@dataclasses.dataclass(frozen=True)
class SolveResult:
    """Solution of ``A x = b`` with per-system diagnostics.

    A registered pytree: it passes through ``torch.func.vmap`` (with the batch
    as the leading dimension of every field) and ``torch.utils._pytree``.

    Attributes:
        x: the solution, same shape as ``b``.
        converged: bool tensor of shape ``b.shape[:-1]``.
        iterations: int64 tensor, iterations each system took.
        residual_norm: the true residual ``||b - A x||_2`` per system, recomputed
            from ``x`` after the iteration (the status is decided on it).
        status: int64 tensor of :class:`Status` codes per system.
        history: residual norms per iteration, shape ``(maxiter + 1, *b.shape[:-1])``,
            when the solver was asked for it, else ``None``.
    """

    x: Tensor
    converged: Tensor
    iterations: Tensor
    residual_norm: Tensor
    status: Tensor
    history: Tensor | None = None

    __repr__ = result_repr

    def failures(self) -> list[str]:
        """Readable descriptions of every system that did not converge (host sync)."""
        return describe_failures(Status, self.status, self.iterations, self.residual_norm, "system", "residual")

    @property
    def all_converged(self) -> bool:
        """True when every system converged (host sync)."""
        return bool(torch.all(self.converged))


def describe_failures(codes: Any, status: Tensor, iterations: Tensor, norm: Tensor, unit: str,
                      norm_name: str) -> list[str]:
    """``"<unit> i: NAME after k iterations, <norm_name> r: why"`` for every entry of ``status``
    that is not ``codes.CONVERGED`` (the ``unit`` prefix only when there are several)."""
    flat = status.reshape(-1).tolist()
    out = []
    for i, (s, r, k) in enumerate(zip(flat, norm.reshape(-1).tolist(), iterations.reshape(-1).tolist())):
        if s != codes.CONVERGED:
            where = f"{unit} {i}: " if len(flat) > 1 else ""
            out.append(f"{where}{codes(s).name} after {k} iterations, {norm_name} {r:.3e}: {codes(s).describe()}")
    return out
