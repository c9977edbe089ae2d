"""``bilevel.testing``: check that a hypergradient is right.

- :func:`check_hypergradient` compares a problem's hypergradient with finite
  differences, unrolled differentiation and a dense direct solve, in float64,
  and raises ``AssertionError`` with a readable table when they disagree.
- :func:`property_check` runs that check at outer points drawn by hypothesis.
- :mod:`bilevel.testing.strategies` (needs ``hypothesis``) draws problem
  families with known hypergradients, outer points, linear operators and
  batch sizes; :mod:`bilevel.testing.families` holds those problems.
- ``bilevel check MODULE:OBJECT`` runs the checks from the command line.

See ``docs/checking.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

from bilevel.testing.check import REFERENCES, check_hypergradient, solver_name
from bilevel.testing.precision import cast, double
from bilevel.testing.property import property_check
from bilevel.testing.report import Comparison, HypergradientReport

__all__ = [
    "Comparison", "HypergradientReport", "REFERENCES", "cast", "check_hypergradient", "double",
    "property_check", "solver_name", "strategies",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":  # imported on first use: it needs hypothesis
        return importlib.import_module("bilevel.testing.strategies")
    raise AttributeError(f"module 'bilevel.testing' has no attribute {name!r}")
