"""Exceptions and warnings raised by bilevel. Each message names the problem and the fix."""

from __future__ import annotations


class BilevelError(ValueError):
    """Bad input: mismatched structures, shapes, devices or dtypes, non-scalar objectives."""


class ConvergenceError(RuntimeError):
    """The inner problem or the adjoint linear solve did not converge (``on_failure="raise"``)."""


class ConvergenceWarning(UserWarning):
    """The inner problem or the adjoint linear solve did not converge (``on_failure="warn"``)."""


class NonFiniteError(FloatingPointError):
    """NaN or Inf in the inner solution, the adjoint solve or the hypergradient."""


class BilevelWarning(UserWarning):
    """A result that is valid but probably not what was meant (e.g. a first-order hypergradient
    that dropped every dependence on the inner solution)."""


class CheckpointError(OSError):
    """A checkpoint file that is empty, truncated, altered or not a bilevel checkpoint; the message
    names the file and the way out (the previous checkpoint kept beside it, or starting over)."""
