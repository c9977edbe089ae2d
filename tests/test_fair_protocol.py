"""The protocol harness's front arithmetic (benchmarks/fair_protocol.py): matched-gap accuracy and areas."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fair_protocol  # noqa: E402


def test_accuracy_at_mixes_two_points_to_reach_a_gap():
    points = [(0.4, 0.70), (0.1, 0.60)]
    assert fair_protocol.accuracy_at(points, 0.4) == 0.70
    assert fair_protocol.accuracy_at(points, 0.25) == pytest.approx(0.65)  # halfway between the two
    assert fair_protocol.accuracy_at(points, 0.5) == 0.70  # no point above: the best one below
    assert math.isnan(fair_protocol.accuracy_at(points, 0.05))  # nothing reaches it without the constant
    assert fair_protocol.accuracy_at([*points, (0.0, 0.5)], 0.05) == pytest.approx(0.55)


def test_the_mixing_line_has_zero_area_and_a_better_front_a_positive_one():
    g0, a0, const = 0.4, 0.7, 0.5
    assert fair_protocol.area_over_mix([(g0, a0)], g0, a0, const) == pytest.approx(0.0, abs=1e-12)
    # a point 5 points above the line at half the gap: a triangle of height 0.05 over [0, g0]
    area = fair_protocol.area_over_mix([(g0, a0), (0.2, 0.65)], g0, a0, const)
    assert area == pytest.approx(0.025, abs=1e-3)
    # a dominated point changes nothing
    assert fair_protocol.area_over_mix([(g0, a0), (0.2, 0.55)], g0, a0, const) == pytest.approx(0.0, abs=1e-12)


def test_summary_pairs_methods_by_unit():
    def rec(seed, method, c, gap, acc):
        return {"seed": seed, "split": 0, "method": method, "c": c, "parity_gap": gap, "accuracy": acc,
                "constant_accuracy": 0.5}
    records = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        records += [rec(seed, "imaml", None, 0.4, 0.70 + shift), rec(seed, "maml", None, 0.4, 0.69 + shift),
                    rec(seed, "ours-dbc", 0.0, 0.2, 0.67 + shift), rec(seed, "ours-dp", 0.0, 0.2, 0.66 + shift),
                    rec(seed, "pdfm", 0.0, 0.3, 0.64 + shift), rec(seed, "tt-dbc", 0.0, 0.2, 0.62 + shift),
                    rec(seed, "tt-dp", 0.0, 0.2, 0.61 + shift)]
    summary = fair_protocol.summarize(records)
    assert summary["units"] == 2
    diff = summary["paired"]["ours - tt-dbc acc@0.5"]
    assert diff["mean"] == pytest.approx(0.05) and diff["ci95"] == pytest.approx(0.0, abs=1e-12)
    mix = summary["fronts"]["mix"]["acc@0.5"]["mean"]
    assert mix == pytest.approx(0.5 + 0.5 * 0.21)  # halfway from the constant to iMAML, per unit
