"""The hypothesis strategies: the structure each family claims, shrinking, operators, batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import find, given, settings

from bilevel.pytree import tree_norm
from bilevel.testing import strategies as bst
from bilevel.testing.families import FAMILIES, ridge_case
from bilevel.testing.tight import flat_jacobian, spectral_radius


@settings(max_examples=15)
@given(case=bst.problems())
def test_each_family_has_the_structure_and_contraction_it_claims(case):
    problem, outer, data = case.problem, case.outer, case.data
    phi = problem.solve_inner(outer, data, problem.initial_inner(outer, data))
    J = flat_jacobian(lambda p: problem.optimality(p, outer, data), phi)
    eig = torch.linalg.eigvals(J)
    symmetric = torch.allclose(J, J.T, atol=1e-12)
    if case.structure == "spd":
        assert symmetric and float(torch.linalg.eigvalsh(J)[0]) > 0
    elif case.structure == "symmetric_indefinite":
        values = torch.linalg.eigvalsh(J)
        assert symmetric and float(values[0]) < 0 < float(values[-1])
    else:
        assert float(eig.real.min()) > 0  # I - W with ||W|| < 1
    radius = spectral_radius(lambda p: problem.inner_update(p, outer, data), phi)
    assert radius <= case.rate + 1e-9 < 1.0
    assert float(tree_norm(problem.optimality(phi, outer, data))) < 1e-10


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_problems_shrink_to_small_readable_examples(family):
    smallest = find(bst.problems(families=(family,)), lambda case: True)
    text = repr(smallest)
    assert text.startswith(f"{family}_case(") and "seed=0" in text and "tensor(" not in text
    assert all(v in (0, 1, 1.0, 0.0) for k, v in smallest.params.items() if k != "condition")


def test_a_failing_property_shrinks_to_the_boundary():
    """The smallest ridge problem with two features and a positive first coordinate."""
    case = find(bst.ridge_problems(), lambda c: c.params["features"] >= 2 and c.outer[0] > 0.5)
    assert case.params == {"features": 2, "samples": 1, "seed": 0}
    assert case.outer.tolist()[1] == 0.0


def test_builders_are_deterministic_and_cast():
    a, b = ridge_case(2, 3, 7, [0.1, 0.2]), ridge_case(2, 3, 7, [0.1, 0.2])
    assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    low = a.to(torch.float32)
    assert low.outer.dtype == torch.float32 and low.data["X"].dtype == torch.float32
    assert low.expected().dtype == torch.float64
    with pytest.raises(ValueError, match="outer point of length 2"):
        ridge_case(2, 3, 7, [0.1])


@settings(max_examples=20)
@given(op=bst.linear_operators())
def test_linear_operators_have_their_kind_and_condition(op):
    A = op.matrix
    n = A.shape[0]
    if op.kind in ("spd", "indefinite"):
        assert torch.allclose(A, A.T, atol=1e-12)
        eig = torch.linalg.eigvalsh(A)
        assert (eig > 0).all() if op.kind == "spd" else (n == 1 or (eig < 0).any() and (eig > 0).any())
    elif n > 1:
        assert not torch.allclose(A, A.T)
    assert float(torch.linalg.cond(A)) == pytest.approx(op.params["condition"], rel=1e-6)
    v = torch.ones(2, n, dtype=A.dtype)
    torch.testing.assert_close(op.matvec(v), (A @ v.T).T)


@settings(max_examples=10)
@given(cases=bst.problem_batches("saddle", max_size=3), size=bst.batch_sizes(3))
def test_problem_batches_share_shapes_and_outer_point(cases, size):
    assert 1 <= len(cases) <= 3 and 1 <= size <= 3
    for case in cases[1:]:
        assert torch.equal(case.outer, cases[0].outer)
        assert all(case.data[k].shape == cases[0].data[k].shape for k in case.data)


@given(point=bst.outer_points(4, bound=0.5))
def test_outer_points_are_bounded_lists(point):
    assert len(point) == 4 and all(-0.5 <= x <= 0.5 for x in point)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown problem families"):
        bst.problems(families=("ridge", "lasso"))
