"""The full-label fairness check of benchmarks/fair_proxy.py: its two constrained fits do what they claim."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fair_proxy  # noqa: E402


def biased_rows(seed: int = 0, n: int = 200, d: int = 5):
    rng = np.random.default_rng(seed)
    z = (np.arange(n) % 2).astype(float)
    x = rng.normal(size=(n, d)) + 1.0 * z[:, None]
    y = (rng.random(n) < 1 / (1 + np.exp(-x.sum(1)))).astype(float)
    return x, y, z


def test_projected_fit_has_zero_score_covariance_and_the_free_fit_does_not():
    x, y, z = biased_rows()
    a = ((z - z.mean())[:, None] * x).mean(0)
    free = np.eye(x.shape[1])
    fair = free - np.outer(a, a) / (a @ a)
    cov = lambda s: ((z - z.mean()) * s).mean()  # noqa: E731
    assert abs(cov(fair_proxy.fit(x, y, 0.1, free))) > 0.1
    assert abs(cov(fair_proxy.fit(x, y, 0.1, fair))) < 1e-10


def test_parity_bounded_fit_respects_its_bound_and_costs_little_when_loose():
    x, y, z = biased_rows(1)
    for bound in (0.0, 0.1):
        s = fair_proxy.fit_parity_bounded(x, y, z, 0.1, bound)
        p = 1 / (1 + np.exp(-s))
        assert abs(p[z == 1].mean() - p[z == 0].mean()) <= bound + 1e-6
    free = fair_proxy.fit(x, y, 0.1, np.eye(x.shape[1]))
    loose = fair_proxy.fit_parity_bounded(x, y, z, 0.1, 1.0)
    np.testing.assert_allclose(loose, free, atol=2e-2)  # SLSQP stops at its default ftol (1e-6)
