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
