"""Classify what a call through the public API did with a case: the reliability fuzz's judge.

Every call ends in one of six outcomes. The first three are honest; the last
three break the library's promise and must never happen:

============== ================================================================
``CORRECT``     returned a finite result within tolerance of the known answer
                (or, with no known answer, returned without complaint)
``CLEAR_ERROR`` raised an error of the library (:class:`~bilevel.BilevelError`,
                :class:`~bilevel.ConvergenceError`, :class:`~bilevel.NonFiniteError`)
                or a ``TypeError``/``ValueError`` raised by the library's own code
``REPORTED``    returned, and said it failed: a warning of the library, or a
                solve status other than ``CONVERGED``
``SILENT_WRONG`` returned a finite, unreported result outside the tolerance
``SILENT_NAN``  returned NaN or Inf without raising or reporting
``RAW_CRASH``   raised anything else (an error from inside torch, an
                ``AttributeError``, a ``zlib.error``...)
============== ================================================================
"""

from __future__ import annotations

import enum
import os
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

import bilevel
from bilevel.errors import BilevelError, BilevelWarning, ConvergenceError, ConvergenceWarning, NonFiniteError
from bilevel.pytree import tree_leaves

__all__ = ["TRANSFORMS", "Outcome", "Verdict", "classify", "derivative_through", "is_library_frame",
           "linear_reference"]

_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) for m in (bilevel, bilevel.solvers))
_LIBRARY_ERRORS = (BilevelError, ConvergenceError, NonFiniteError)
_LIBRARY_WARNINGS = (ConvergenceWarning, BilevelWarning)


class Outcome(enum.Enum):
    CORRECT = "correct"
    CLEAR_ERROR = "clear error"
    REPORTED = "reported"
    SILENT_WRONG = "silent wrong"
    SILENT_NAN = "silent NaN"
    RAW_CRASH = "raw crash"

    @property
    def honest(self) -> bool:
        """True for the outcomes the library promises: correct, a clear error, or a report."""
        return self in (Outcome.CORRECT, Outcome.CLEAR_ERROR, Outcome.REPORTED)


@dataclass(frozen=True)
class Verdict:
    """An outcome with what led to it (shown when a fuzz case fails)."""

    outcome: Outcome
    detail: str
    value: Any = None


def is_library_frame(filename: str) -> bool:
    """Whether a traceback frame's file belongs to the library (``bilevel`` or ``bilevel.solvers``)."""
    path = os.path.abspath(filename)
    return any(path.startswith(d + os.sep) for d in _LIBRARY_DIRS)


def _raised_by_library(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and is_library_frame(frames[-1].filename)


def _reported_status(value: Any) -> bool:
    if isinstance(value, bilevel.solvers.SolveResult):
        solve = value
    elif isinstance(value, bilevel.HypergradientResult):
        solve = value.solve
    else:
        return False
    return solve is not None and not bool(torch.all(solve.converged))


def _leaves(value: Any) -> list[Tensor]:
    if isinstance(value, bilevel.HypergradientResult):
        return [t for t in tree_leaves(value.grad) if isinstance(t, Tensor)]
    if isinstance(value, bilevel.solvers.SolveResult):
        return [value.x]
    return [t for t in tree_leaves(value) if isinstance(t, Tensor) and t.is_floating_point()]


def classify(call: Callable[[], Any], expected: Callable[[Any], Tensor | None] | None = None, *,
             rtol: float = 1e-6, atol: float = 1e-9) -> Verdict:
    """Run ``call()`` and classify what it did.

    Args:
        call: the call through the public API.
        expected: maps the returned value to ``(got, want)`` tensors to compare, or
            ``None`` when only finiteness can be judged; omit for a case that must fail.
        rtol, atol: ``|got - want| <= atol + rtol |want|`` entrywise counts as correct.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = call()
        except _LIBRARY_ERRORS as e:
            return Verdict(Outcome.CLEAR_ERROR, f"{type(e).__name__}: {e}")
        except (TypeError, ValueError) as e:
            if _raised_by_library(e):
                return Verdict(Outcome.CLEAR_ERROR, f"{type(e).__name__}: {e}")
            return Verdict(Outcome.RAW_CRASH, f"{type(e).__name__} from outside the library: {e}")
        except Exception as e:  # noqa: BLE001 - every other exception is the finding
            return Verdict(Outcome.RAW_CRASH, f"{type(e).__name__}: {e}")
    reported = any(issubclass(w.category, _LIBRARY_WARNINGS) for w in caught) or _reported_status(value)
    if reported:
        return Verdict(Outcome.REPORTED, "; ".join(str(w.message)[:200] for w in caught), value)
    if any(not bool(torch.isfinite(t).all()) for t in _leaves(value)):
        return Verdict(Outcome.SILENT_NAN, "NaN/Inf returned without an error or a report", value)
    if expected is None:
        return Verdict(Outcome.CORRECT, "returned finite, unreported", value)
    pair = expected(value)
    if pair is None:
        return Verdict(Outcome.CORRECT, "returned finite, unreported", value)
    got, want = pair
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    if bool((err <= bound).all()):
        return Verdict(Outcome.CORRECT, f"max error {float(err.max()) if err.numel() else 0.0:.2e}", value)
    return Verdict(Outcome.SILENT_WRONG, f"max error {float(err.max()):.3e} beyond atol {atol} + rtol {rtol}",
                   value)


TRANSFORMS = ("jacrev", "jacfwd", "vmap(grad)", "jvp")
"""The ``torch.func`` routes :func:`derivative_through` takes to a function's derivative."""


def derivative_through(transform: str, fn: Callable[[Tensor], Tensor], x: Tensor, direction: Tensor) -> Tensor:
    """The derivative of ``fn: R^m -> R^n`` at ``x`` as a user takes it through ``transform``.

    ``"jacrev"``, ``"jacfwd"``: the Jacobian ``J`` (``n x m``). ``"vmap(grad)"``: the same
    Jacobian row by row, ``vmap`` over the points (``x`` repeated) and the cotangents ``e_i``
    of ``grad(lambda x, e: fn(x) @ e)``, so the forward call is batched too. ``"jvp"``:
    ``J @ direction``. :func:`linear_reference` gives the matching closed form.
    """
    if transform == "jacrev":
        return torch.func.jacrev(fn)(x)
    if transform == "jacfwd":
        return torch.func.jacfwd(fn)(x)
    if transform == "vmap(grad)":
        n = fn(x).shape[-1]
        basis = torch.eye(n, dtype=x.dtype, device=x.device)
        return torch.func.vmap(torch.func.grad(lambda point, e: fn(point) @ e))(x.expand(n, *x.shape), basis)
    if transform == "jvp":
        return torch.func.jvp(fn, (x,), (direction,))[1]
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def linear_reference(transform: str, jacobian: Tensor, direction: Tensor) -> Tensor:
    """What :func:`derivative_through` must return for a function with Jacobian ``jacobian``."""
    return jacobian @ direction if transform == "jvp" else jacobian

