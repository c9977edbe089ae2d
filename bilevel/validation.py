"""Errors that name the arguments: what a problem's objectives were given when torch refused them.

A shape or dtype the objectives cannot use (an ``initial_inner`` of the wrong length,
outer parameters of the wrong shape, integer targets where a loss wants floats) makes
torch raise deep inside a solve, with a message about its own tensors ("size
mismatch", "expected Double"). :func:`arguments_named` turns such an error into a
:class:`~bilevel.BilevelError` that lists each argument's shapes and dtypes beside
torch's message, and says what to check.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from torch import Tensor
from torch.utils import _pytree as pytree

from bilevel.errors import BilevelError, ConvergenceError
from bilevel.pytree import PyTree

__all__ = ["arguments_named", "describe"]

_ABOUT_ARGUMENTS = re.compile(r"size|shape|dimension|dtype|scalar type|same type|index .* out of bounds|"
                              r"expected .*(Float|Double|Long|Half|Int)", re.IGNORECASE)
"""torch's messages about the shapes, sizes and dtypes of its arguments: the errors worth naming them for."""

SHOWN_LEAVES = 6
"""An argument's description lists at most this many tensors."""


def describe(tree: Any) -> str:
    """``dtype shape`` of each tensor of ``tree``, with its key where it has one."""
    if tree is None:
        return "None"
    flat, _ = pytree.tree_flatten_with_path(tree)
    items = []
    for path, leaf in flat:
        key = pytree.keystr(path)
        what = (f"{str(leaf.dtype).replace('torch.', '')} {tuple(leaf.shape)}" if isinstance(leaf, Tensor)
                else type(leaf).__name__)
        items.append(f"{key} {what}".strip() if key else what)
    if len(items) > SHOWN_LEAVES:
        items = items[:SHOWN_LEAVES] + [f"... {len(items) - SHOWN_LEAVES} more"]
    return ", ".join(items)


def _has_integer_tensors(tree: Any) -> bool:
    return any(isinstance(t, Tensor) and not t.is_floating_point() and not t.is_complex()
               for t in pytree.tree_leaves(tree))


@contextlib.contextmanager
def arguments_named(problem: Any, outer: PyTree, data: Any, init: PyTree | None) -> Iterator[None]:
    """Re-raise a ``RuntimeError`` or ``IndexError`` about shapes, sizes or dtypes from the
    problem's code as a :class:`~bilevel.BilevelError` naming the arguments (torch's message
    kept, the original chained). Other errors, the library's own included, pass through."""
    try:
        yield
    except (RuntimeError, IndexError) as error:
        if isinstance(error, (ConvergenceError, NotImplementedError)) or not _ABOUT_ARGUMENTS.search(str(error)):
            raise
        name = type(problem).__name__
        start = "init" if init is not None else f"{name}.initial_inner's result"
        hints = [f"that {start} has the inner parameters' structure and shapes",
                 "that outer has the shape the objectives expect"]
        if _has_integer_tensors(data):
            hints.append("that integer tensors in data are used where integers belong (class labels), and "
                         "converted with .to(outer's dtype) where they meet the parameters (regression targets)")
        lines = [f"{name}'s objectives could not use the arguments they were given: {error}",
                 f"  outer: {describe(outer)}"]
        if init is not None:
            lines.append(f"  init: {describe(init)}")
        elif getattr(problem, "defines_initial_inner", False):
            try:
                lines.append(f"  {start}: {describe(problem.initial_inner(outer, data))}")
            except Exception:  # the start itself is what failed
                pass
        lines.append(f"  data: {describe(data)}")
        lines.append("check " + "; ".join(hints))
        raise BilevelError("\n".join(lines)) from error
