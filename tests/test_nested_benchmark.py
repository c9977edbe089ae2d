"""The summary of ``benchmarks/nested.py``: gap closed, paired differences, either test score."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import nested  # noqa: E402


def _records(metric: str, values: dict[str, list[float]]) -> list[dict]:
    return [{"method": m, "seed": s, metric: v, "auroc": 0.5, "seconds": 1.0, "peak_mib": 10.0}
            for m, per_seed in values.items() for s, v in enumerate(per_seed)]


@pytest.mark.parametrize("metric", ["test_mse", "test_accuracy"])
def test_gap_closed_and_the_half_gap_difference_for_either_score(metric):
    sign = 1 if metric == "test_mse" else -1  # a lower MSE, a higher accuracy is better
    values = {"maml": [sign * 4.0, sign * 4.2], "oracle": [sign * 1.0, sign * 1.2],
              "influence": [sign * 2.0, sign * 2.2]}
    records = _records(metric, values)
    assert nested.metric_of(records) == metric
    summary, paired = nested.summarize(records, list(values))
    by = {s["method"]: s for s in summary}
    assert by["oracle"]["gap_closed"] == pytest.approx(1.0) and by["maml"]["gap_closed"] == 0.0
    assert by["influence"]["gap_closed"] == pytest.approx(2 / 3)
    assert by["influence"][metric] == pytest.approx(sign * 2.1)
    assert by["influence"][f"{metric}_ci95"] == pytest.approx(12.7062 * 0.1, rel=1e-4)  # t(0.975, 1) sd / sqrt(2)
    half = next(p for p in paired if p["difference"] == "influence - (maml + oracle)/2")
    assert half["per_seed"] == pytest.approx([sign * -0.5, sign * -0.5])  # more than half closed on both seeds
