"""``property_check``: run :func:`check_hypergradient` at outer points drawn by hypothesis."""

from __future__ import annotations

from typing import Any

from bilevel.pytree import PyTree

__all__ = ["property_check"]


def property_check(problem: Any, outer: Any, data: Any = None, *, max_examples: int = 20,
                   to_outer: Any = None, shrink: bool = True, **check_options: Any) -> None:
    """Check ``problem``'s hypergradient at every outer point ``outer`` draws.

    Args:
        problem: a :class:`~bilevel.BilevelProblem` or an ``implicit_root`` function
            (then pass ``outer_loss=`` and ``optimality=`` among ``check_options``).
        outer: a hypothesis strategy of outer points, e.g.
            ``bilevel.testing.strategies.outer_points(3)`` (lists of floats).
        data: the ``data`` argument, fixed across examples.
        max_examples: how many points hypothesis tries.
        to_outer: turns a drawn value into ``outer``; default: a list of floats
            becomes a float64 tensor, anything else is used as drawn.
        shrink: let hypothesis shrink a failing point to a simpler one (each try is a
            full check, so shrinking can take many checks; ``False`` reports the first).
        **check_options: passed to :func:`~bilevel.testing.check_hypergradient`.

    Raises:
        AssertionError: with the report of the failing point (the simplest one
        hypothesis found when ``shrink``); hypothesis prints the point.

    Example (inside a pytest test)::

        property_check(MyProblem(), strategies.outer_points(3), data=(X, y), max_examples=10)
    """
    import torch
    from hypothesis import HealthCheck, Phase, given, settings

    from bilevel.testing.check import check_hypergradient

    def convert(value: Any) -> PyTree:
        if to_outer is not None:
            return to_outer(value)
        if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            return torch.tensor(value, dtype=torch.float64)
        return value

    phases = tuple(p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain))

    @settings(max_examples=max_examples, deadline=None, database=None, phases=phases,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(outer)
    def run(point: Any) -> None:
        check_hypergradient(problem, convert(point), data, **check_options)

    run()
