"""Health checks of iMAML meta-training: failing adjoint solves, loss spikes, NaN, the final summary."""

from __future__ import annotations

import json
import warnings

import pytest

from bilevel.problems.imaml.config import Config
from bilevel.problems.imaml.monitor import MIN_HISTORY, Monitor, TrainingWarning, summarize
from bilevel.problems.imaml.train import METRICS, train

TINY = dict(meta_batch=4, inner_steps=3, log_every=2, eval_every=4, checkpoint_every=2, eval_tasks=8,
            final_tasks=8, progress=False, baseline="none")


def window(step: int, converged: int, failed: int) -> dict:
    return {"step": step, "solve_status": {"converged": converged, "max_iterations": failed, "negative_curvature": 0},
            "adjoint_converged": converged, "solve_iterations": 5.0}


def test_most_solves_failing_warns_with_counts_at_1_2_4_8_failing_windows():
    monitor = Monitor()
    warned = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(1, 11):
            if monitor.check(10 * k - 9, [1.0] * 10, {**window(10 * k, converged=3, failed=7), "query_loss": 1.0}):
                warned.append(k)
        healthy = {**window(110, converged=6, failed=4), "query_loss": 1.0}
        assert not monitor.check(111, [1.0] * 10, healthy)
    assert warned == [1, 2, 4, 8]
    assert all(issubclass(w.category, TrainingWarning) for w in caught) and len(caught) == 4
    first = str(caught[0].message)
    assert first.startswith("step 10: 7 of 10 adjoint solves missed the tolerance")
    assert "max_iterations 7" in first and "negative_curvature" not in first  # counts by status, zeros left out
    assert "8 such window(s) so far" in str(caught[-1].message)


def steady(monitor: Monitor, windows: int) -> None:
    for k in range(windows):
        assert monitor.check(4 * k + 1, [1.0] * 4, {"step": 4 * k + 4, "query_loss": 1.0}) == []


def test_a_loss_spike_names_its_step_and_a_diverging_window_says_so():
    monitor = Monitor(spike_factor=10.0)
    steady(monitor, MIN_HISTORY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [spike] = monitor.check(21, [1.0, 1.2, 35.0, 0.9], {"step": 24, "query_loss": 9.5})
        [diverging] = monitor.check(25, [50.0, 80.0, 120.0, 1.0], {"step": 28, "query_loss": 62.75})
    assert spike.startswith("step 23: the query loss spiked: 35 against a running median of 1 ")
    assert "1 of 4 steps" in spike
    assert diverging.startswith("step 27: the query loss is diverging: 120")


def test_no_spike_is_called_before_enough_history():
    monitor = Monitor(spike_factor=2.0)
    steady(monitor, MIN_HISTORY - 1)
    assert monitor.check(21, [1.0, 100.0, 1e4], {"step": 23, "query_loss": 3367.0}) == []


def test_replaying_logged_windows_restores_the_state_without_warning():
    records = [{**window(10 * k, converged=3, failed=7), "query_loss": 1.0} for k in range(1, 8)]
    straight, resumed = Monitor(), Monitor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in records:
            straight.check(r["step"] - 9, [1.0] * 10, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.replay(records)
    assert (resumed.failing_windows, list(resumed.losses)) == (straight.failing_windows, list(straight.losses))
    spike = {**window(80, converged=3, failed=7), "query_loss": 5.0}
    assert straight.check(71, [50.0] * 10, spike) == resumed.check(71, [50.0] * 10, spike)


def test_nan_loss_raises_naming_the_step_and_the_fix():
    with pytest.raises(FloatingPointError, match=r"became nan at step 12: lower --meta-lr.*armijo"):
        Monitor().check(11, [0.5, float("nan")], {"step": 12, "query_loss": float("nan")})
    with pytest.raises(ValueError, match="spike_factor must be > 1"):
        Monitor(spike_factor=1.0)


def test_summarize_adds_up_the_logged_windows():
    records = [{**window(10, 8, 2), "inner_residual": 0.5, "warnings": ["a"]},
               {**window(20, 1, 9), "inner_residual": 1.5, "solve_iterations": 10.0}]
    summary = summarize(records)
    assert summary["adjoint"] == {"solves": 20, "status": {"converged": 9, "max_iterations": 11,
                                                           "negative_curvature": 0},
                                  "converged": 9, "converged_fraction": 0.45, "mean_iterations": 7.5,
                                  "indefinite": 0}
    assert summary["inner"] == {"mean_residual": 1.0} and summary["warnings"] == 1
    assert summarize([{"step": 1, "query_loss": 1.0}]) == {"warnings": 0}


def test_a_run_whose_solves_fail_warns_logs_and_ends_with_the_solver_outcomes(tmp_path):
    config = Config(steps=4, solver="cg", cg_steps=1, solver_rtol=1e-9, out_dir=str(tmp_path), **TINY)
    with pytest.warns(TrainingWarning, match=r"step 2: \d of 8 adjoint solves missed the tolerance"):
        final = train(config)
    outcomes = final["solver_outcomes"]["adjoint"]
    assert outcomes["solves"] == 16 and outcomes["converged"] < 8
    assert outcomes["mean_iterations"] <= 1.0
    assert sum(outcomes["status"].values()) == 16
    assert json.loads((tmp_path / "final.json").read_text())["solver_outcomes"] == final["solver_outcomes"]
    logged = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert "missed the tolerance" in logged[0]["warnings"][0]
    assert final["solver_outcomes"]["warnings"] == sum(len(r.get("warnings", [])) for r in logged)


def test_a_healthy_run_logs_no_warnings_and_counts_converged_solves_on_the_true_residual(tmp_path):
    config = Config(steps=4, lam=5.0, solver="minres", cg_steps=40, solver_rtol=1e-2, out_dir=str(tmp_path), **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        final = train(config)
    outcomes = final["solver_outcomes"]
    assert outcomes["warnings"] == 0 and outcomes["adjoint"]["converged_fraction"] >= 0.5
    assert outcomes["inner"]["mean_residual"] > 0
