"""Hypothesis strategies for bilevel problems with known hypergradients.

Every strategy draws only small integers, bounded floats and a seed, and
builds its tensors deterministically from them (:mod:`bilevel.testing.families`),
so a failing example shrinks to a small, readable counterexample such as
``ridge_case(features=1, samples=1, seed=0, outer=[0.0], dtype=torch.float64)``.

Example::

    from hypothesis import given
    from bilevel.testing import strategies as bst

    @given(bst.problems(families=("ridge", "saddle")))
    def test_direct_solve(case):
        grad = bilevel.hypergradient(case.problem, case.outer, case.data, solver=Direct()).grad
        torch.testing.assert_close(grad, case.expected())
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor

from bilevel.testing.families import FAMILIES, ProblemCase

__all__ = [
    "LinearOperatorCase", "OPERATOR_KINDS", "batch_sizes", "contraction_problems", "linear_operators",
    "logistic_problems", "outer_points", "problem_batches", "problems", "quadratic_problems",
    "ridge_problems", "saddle_problems", "seeds",
]

OPERATOR_KINDS = ("spd", "indefinite", "nonsymmetric")


def seeds(max_seed: int = 2**16) -> st.SearchStrategy[int]:
    """Seeds of the deterministic tensor builders (shrink towards 0)."""
    return st.integers(0, max_seed)


def batch_sizes(max_size: int = 4) -> st.SearchStrategy[int]:
    """Meta-batch sizes ``1 .. max_size`` (shrink towards 1)."""
    return st.integers(1, max_size)


def outer_points(dim: int, bound: float = 1.0) -> st.SearchStrategy[list[float]]:
    """Outer points as lists of ``dim`` floats in ``[-bound, bound]`` (shrink towards 0).

    Lists rather than tensors, so that a counterexample prints as numbers;
    ``torch.tensor(point, dtype=...)`` makes the tensor.
    """
    coordinate = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32)
    return st.lists(coordinate, min_size=dim, max_size=dim)


@st.composite
def ridge_problems(draw: st.DrawFn, max_features: int = 4, max_samples: int = 8,
                   dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Ridge regression with per-feature L2 (closed-form hypergradient)."""
    features = draw(st.integers(1, max_features))
    samples = draw(st.integers(1, max_samples))
    return FAMILIES["ridge"](features, samples, draw(seeds()), draw(outer_points(features)), dtype)


@st.composite
def quadratic_problems(draw: st.DrawFn, max_dim: int = 5, max_outer_dim: int = 3,
                       conditions: Sequence[float] = (1.0, 10.0, 100.0),
                       dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Quadratic bilevel problems whose inner Hessian has a condition number from ``conditions``."""
    dim = draw(st.integers(1, max_dim))
    outer_dim = draw(st.integers(1, max_outer_dim))
    condition = draw(st.sampled_from(tuple(conditions)))
    return FAMILIES["quadratic"](dim, outer_dim, condition, draw(seeds()), draw(outer_points(outer_dim)), dtype)


@st.composite
def logistic_problems(draw: st.DrawFn, max_features: int = 4, max_samples: int = 8,
                      dtype: torch.dtype = torch.float64) -> ProblemCase:
    """L2-regularized logistic regression (reference by a tight Newton solve)."""
    features = draw(st.integers(1, max_features))
    samples = draw(st.integers(1, max_samples))
    return FAMILIES["logistic"](features, samples, draw(seeds()), draw(outer_points(features)), dtype)


@st.composite
def contraction_problems(draw: st.DrawFn, max_dim: int = 5, max_outer_dim: int = 3,
                         rhos: Sequence[float] = (0.0, 0.5, 0.9),
                         dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Linear fixed points ``phi = W phi + U theta + b``, ``||W||_2`` from ``rhos`` (closed form)."""
    dim = draw(st.integers(1, max_dim))
    outer_dim = draw(st.integers(1, max_outer_dim))
    rho = draw(st.sampled_from(tuple(rhos)))
    return FAMILIES["contraction"](dim, outer_dim, rho, draw(seeds()), draw(outer_points(outer_dim)), dtype)


@st.composite
def saddle_problems(draw: st.DrawFn, max_primal: int = 4, max_dual: int = 3, max_outer_dim: int = 3,
                    dtype: torch.dtype = torch.float64) -> ProblemCase:
    """Quadratic min-max problems with a symmetric indefinite Jacobian (closed form)."""
    primal = draw(st.integers(1, max_primal))
    dual = draw(st.integers(1, max_dual))
    outer_dim = draw(st.integers(1, max_outer_dim))
    return FAMILIES["saddle"](primal, dual, outer_dim, draw(seeds()), draw(outer_points(outer_dim)), dtype)


_STRATEGIES = {
    "ridge": ridge_problems, "quadratic": quadratic_problems, "logistic": logistic_problems,
    "contraction": contraction_problems, "saddle": saddle_problems,
}


def problems(families: Sequence[str] = tuple(_STRATEGIES), dtype: torch.dtype = torch.float64,
             ) -> st.SearchStrategy[ProblemCase]:
    """A problem from any of ``families`` (default: all), with its known hypergradient."""
    unknown = sorted(set(families) - set(_STRATEGIES))
    if unknown:
        raise ValueError(f"unknown problem families {unknown}; choose from {sorted(_STRATEGIES)}")
    return st.one_of(*[_STRATEGIES[f](dtype=dtype) for f in families])


@st.composite
def problem_batches(draw: st.DrawFn, family: str, max_size: int = 4, dtype: torch.dtype = torch.float64,
                    **options: object) -> list[ProblemCase]:
    """``1 .. max_size`` instances of one family with equal shapes and one shared outer point.

    Only the seed differs, so ``families.stack_data`` stacks their ``data`` into
    one batch for ``torch.func.vmap``. ``options`` go to the family's strategy
    (e.g. ``conditions=(1.0, 10.0)`` for ``"quadratic"``).
    """
    size = draw(batch_sizes(max_size))
    first = draw(_STRATEGIES[family](dtype=dtype, **options))
    seed_list = draw(st.lists(seeds(), min_size=size - 1, max_size=size - 1))
    build = FAMILIES[family]
    rest = [build(**{**first.params, "seed": s}, outer=first.outer.tolist(), dtype=dtype) for s in seed_list]
    return [first, *rest]


# ------------------------------------------------------------------ operators


@dataclasses.dataclass(frozen=True, repr=False)
class LinearOperatorCase:
    """A dense matrix of known structure, applied as a batched matvec.

    Attributes:
        kind: ``"spd"``, ``"indefinite"`` (symmetric, both signs) or ``"nonsymmetric"``.
        matrix: the ``(n, n)`` matrix ``A``.
        params: what it was built from (shown by ``repr``).
    """

    kind: str
    matrix: Tensor
    params: dict

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(..., n)``."""
        return v @ self.matrix.T

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"LinearOperatorCase({self.kind!r}, {args})"


def operator_matrix(kind: str, n: int, condition: float, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An ``n x n`` matrix of the given kind whose singular values span ``[1, condition]``.

    ``spd``: ``Q diag(s) Q^T``; ``indefinite``: the same with alternating signs
    (the largest eigenvalue positive, so ``n >= 2`` has both signs); ``nonsymmetric``:
    ``Q1 diag(s) Q2^T`` (nonsingular: its singular values are ``s``), never symmetric. For ``n = 1``
    the condition number is 1 whatever ``condition`` says.
    """
    if kind not in OPERATOR_KINDS:
        raise ValueError(f"kind must be one of {OPERATOR_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)

    def orthogonal() -> Tensor:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)

    s = condition ** (torch.arange(n, dtype=torch.float64) / max(n - 1, 1))
    q = orthogonal()
    if kind == "spd":
        A = (q * s) @ q.T
    elif kind == "indefinite":
        signs = torch.tensor([(-1.0) ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
        A = (q * (s * signs)) @ q.T
    else:
        # Redraw the right factor until A is visibly nonsymmetric: with equal singular
        # values, Q1 Q2^T can be a reflection, which is symmetric.
        A = (q * s) @ orthogonal().T
        while n > 1 and torch.linalg.matrix_norm(A - A.T) <= 1e-3 * torch.linalg.matrix_norm(A):
            A = (q * s) @ orthogonal().T
    return A.to(dtype)


@st.composite
def linear_operators(draw: st.DrawFn, kinds: Sequence[str] = OPERATOR_KINDS, max_dim: int = 6,
                     conditions: Sequence[float] = (1.0, 10.0, 100.0),
                     dtype: torch.dtype = torch.float64) -> LinearOperatorCase:
    """Dense linear operators of the given ``kinds`` with a condition number from ``conditions``."""
    kind = draw(st.sampled_from(tuple(kinds)))
    n = draw(st.integers(1, max_dim))
    condition = draw(st.sampled_from(tuple(conditions)))
    seed = draw(seeds())
    return LinearOperatorCase(kind, operator_matrix(kind, n, condition, seed, dtype),
                              {"n": n, "condition": condition if n > 1 else 1.0, "seed": seed})
