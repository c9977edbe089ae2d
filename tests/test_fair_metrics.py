"""Fairness metrics against hand-computed values."""

from __future__ import annotations

import math

import torch

from bilevel.problems.fair.metrics import (accuracy, consistency, dbc, mean_ci, null_gap, parity_gap, soft_gap,
                                          task_metrics)


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


def test_mean_ci_counts_nan_and_shrinks_with_n():
    small = mean_ci(torch.tensor([0.0, 1.0, float("nan")]))
    assert small["n"] == 2 and small["mean"] == 0.5 and small["nan"] == 1
    large = mean_ci(torch.tensor([0.0, 1.0] * 50))
    assert large["ci95"] < small["ci95"]
    assert math.isclose(large["ci95"], 1.96 * float(torch.tensor([0.0, 1.0] * 50).std()) / 10, rel_tol=1e-6)


def test_soft_gap_is_dbc_over_the_variance_of_z_and_nan_without_a_group():
    s = torch.tensor([[2.0, -1.0, 0.5, -2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    z = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    p = torch.sigmoid(s[0])
    assert math.isclose(float(soft_gap(s, z)[0]), abs(float(p[2:].mean() - p[:2].mean())), rel_tol=1e-6)
    assert math.isclose(float(soft_gap(s, z)[0]), float(dbc(s, z)[0]) / (0.6 * 0.4), rel_tol=1e-5)
    assert math.isnan(float(soft_gap(s, z)[1])) and math.isnan(float(parity_gap(s, z)[1]))
    summary = mean_ci(parity_gap(s, z))
    assert summary["n"] == 1 and summary["nan"] == 1


def test_null_gap_is_the_mean_gap_over_permutations_of_z():
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([1.0, 1.0, -1.0, -1.0])
    z = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # the 6 ways to place the two z = 1 rows: gap 1 twice (perfectly aligned either way), 0 four times
    assert abs(float(null_gap(s, z, g, permutations=4000)) - 1 / 3) < 0.03
    assert float(parity_gap(s, z)) == 1.0
    # a large balanced query whose predictions ignore z has gap and null gap near 0 together
    s = torch.randn(4000, generator=g)
    z = (torch.arange(4000) % 2).float()
    out = task_metrics(s, torch.zeros(4000, 1), (s > 0).float(), z, g, consistency_rows=50)
    assert float(out["null_gap"]) < 0.05 and abs(float(out["excess_gap"])) < 0.05
    assert float(out["accuracy"]) == 1.0
