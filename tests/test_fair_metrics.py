"""Fairness metrics against hand-computed values."""

from __future__ import annotations

import math

import torch

from bilevel.problems.fair.metrics import accuracy, consistency, dbc, mean_ci, parity_gap


def test_metrics_on_a_hand_checked_example():
    s = torch.tensor([2.0, -1.0, 3.0, -2.0])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0])
    z = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert float(accuracy(s, y)) == 0.75
    # predictions (1, 0, 1, 0): both groups at rate 1/2
    assert float(parity_gap(s, z)) == 0.0
    assert float(parity_gap(torch.tensor([1.0, 1.0, -1.0, 1.0]), z)) == 0.5
    p = torch.sigmoid(s)
    expected = abs(float(((z - 0.5) * p).mean()))
    assert math.isclose(float(dbc(s, z)), expected, rel_tol=1e-6)


def test_consistency_is_one_for_a_smooth_classifier_and_lower_otherwise():
    x = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    assert float(consistency(torch.tensor([1.0, 1, 1, -1, -1, -1]), x, k=2)) == 1.0
    # alternating labels among close neighbours
    assert float(consistency(torch.tensor([1.0, -1, 1, -1, 1, -1]), x, k=2)) < 0.5


def test_mean_ci_drops_nan_and_shrinks_with_n():
    small = mean_ci(torch.tensor([0.0, 1.0, float("nan")]))
    assert small["n"] == 2 and small["mean"] == 0.5
    large = mean_ci(torch.tensor([0.0, 1.0] * 50))
    assert large["ci95"] < small["ci95"]
    assert math.isclose(large["ci95"], 1.96 * float(torch.tensor([0.0, 1.0] * 50).std()) / 10, rel_tol=1e-6)
