"""The meta-gradient benchmark: its rows, and our meta-gradient against the converged reference."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _tasks  # noqa: E402
import hypergradient  # noqa: E402


def test_quick_run_interleaves_implementations_in_one_process(tmp_path):
    out = tmp_path / "hg.jsonl"
    rows = hypergradient.main(["--quick", "--impls", "ours-implicit", "floor", "--min-time", "0.05",
                               "--converged-max-tasks", "0", "--out", str(out), "--device", "cpu"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in written] == ["ours-implicit", "floor"] == [r["impl"] for r in rows]
    for r in written:
        assert "error" not in r, r
        assert (r["problem"], r["tasks"], r["steps"], r["cg"]) == ("sinusoid", 4, 5, 5)
        assert r["time_s"] >= r["best_s"] > 0 and r["rss_peak_mib"] is None
    ours, floor = written
    assert ours["calls"] == floor["calls"] >= 3  # interleaved: the same number of calls each
    # At K = 5 the sinusoid's I + H/lam is indefinite: our CG stops there and says so
    # (the textbook CG of the reference goes on), so the two differ.
    assert ours["solve_status"] == {"NEGATIVE_CURVATURE": 4}
    assert ours["err_same_k"] > 0.1 and ours["err_converged"] is None
    assert "err_same_k" not in floor  # the floor times separate calls; it has no gradient to check
    assert floor["time_s"] > 5 * floor["grad_s"] > 0
    table = out.with_suffix(".md").read_text()
    assert table.count("| sinusoid (ill-posed) | 4 | 5 |") == 2 and "ours-implicit: " in table and "x floor" in table


def test_isolated_run_reports_peak_memory(tmp_path):
    out = tmp_path / "hg.jsonl"
    (row,) = hypergradient.main(["--quick", "--isolated", "--impls", "floor", "--min-time", "0.01",
                                 "--converged-max-tasks", "0", "--out", str(out), "--device", "cpu"])
    assert "error" not in row and row["isolated"]
    assert row["rss_peak_mib"] >= row["rss_base_mib"] > 0


def test_interleave_gives_every_timer_the_same_number_of_calls():
    order: list[str] = []

    def timer(name: str, seconds: float):
        return lambda: order.append(name) or seconds

    times = hypergradient.interleave({"a": timer("a", 0.01), "b": timer("b", 0.5)}, min_time=0.05,
                                     max_time=10.0)
    assert len(times["a"]) == len(times["b"]) == 5  # until the cheaper one has 0.05 s
    assert order[:4] == ["a", "b", "b", "a"]  # the order rotates every round


@pytest.fixture
def well_posed_sinusoid(monkeypatch):
    """lam = 50 makes I + H/lam positive definite and K gradient steps contract (rate ~0.9)."""
    spec = dataclasses.replace(_tasks.SPECS["sinusoid"], lam=50.0, alpha=0.005)
    monkeypatch.setitem(_tasks.SPECS, "sinusoid", spec)


@pytest.mark.usefixtures("well_posed_sinusoid")
@pytest.mark.parametrize("impl", ["ours-implicit", "ours-implicit-loop"])
def test_ours_matches_converged_reference_when_inner_and_cg_converge(impl, tmp_path):
    cfg = {"impls": [impl], "problem": "sinusoid", "tasks": 2, "steps": 300, "cg": 30, "device": "cpu",
           "threads": 1, "seed": 0, "min_time": 0.0, "max_time": 0.0, "grad_out": str(tmp_path / "g.npz")}
    (row,) = hypergradient.worker(cfg)
    grad = np.load(cfg["grad_out"])[impl]
    refs = hypergradient.References(seed=0, converged_max_tasks=2)
    converged, info = refs.converged("sinusoid", 2)
    assert info["inner_grad_norm"] < 1e-6 and info["cg_rel_residual"] < 1e-8
    assert np.linalg.norm(grad - converged) / np.linalg.norm(converged) < 1e-4
    # Positive definite: no breakdown. With rtol=0 only an exactly zero residual converges; the
    # float32 recurrence can reach it where the true residual cannot (INACCURATE).
    assert set(row["solve_status"]) <= {"CONVERGED", "MAX_ITERATIONS", "INACCURATE"}
    same_k = refs.same_k("implicit", "sinusoid", 2, 300, 30)
    assert np.linalg.norm(grad - same_k) / np.linalg.norm(same_k) < 1e-4


def test_chunking_rows_agree_and_measure_memory(tmp_path):
    import chunking

    out = tmp_path / "chunking.jsonl"
    assert chunking.main(["--problems", "sinusoid", "--tasks", "3", "--variants", "all", "2", "loop",
                          "--repeats", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    grads = [r for r in rows if r["part"] == "meta_gradient"]
    assert [r["variant"] for r in grads] == ["all", "2", "loop"]
    for r in grads:
        assert r["time_s"] > 0 and r["rel_diff"] < 1e-4 and 50 < r["peak_mib"] < 4096
    assert {r["op"] for r in rows if r["part"] == "conv_layer"} == {"forward", "gradient", "hvp"}
    with pytest.raises(SystemExit):
        chunking.main(["--variants", "0"])


def test_default_path_times_ours_beside_an_earlier_revision_and_marks_ill_posed_rows(tmp_path):
    import default_path

    out = tmp_path / "default_path.jsonl"
    rows = default_path.main(["--problems", "sinusoid-pd", "sinusoid", "--impls", "ours", "hand", "--before", "HEAD",
                              "--min-time", "0.01", "--min-rounds", "2", "--out", str(out)])
    assert [(r["problem"], r["impl"]) for r in rows] == [(p, i) for p in ("sinusoid-pd", "sinusoid")
                                                         for i in ("ours", "hand", "before")]
    ours, hand, before = rows[:3]
    assert ours["calls"] == hand["calls"] == before["calls"] >= 2  # interleaved: the same number of calls
    assert ours["products_per_solve"] == before["products_per_solve"] == 6  # 5 CG products + the closing one
    assert hand["products_per_solve"] is None and hand["x_hand"] == 1.0 and hand["diff_vs_hand"] == 0.0
    assert ours["well_posed"] and ours["diff_vs_hand"] < 1e-4  # positive definite: the same answer
    table = out.with_suffix(".md").read_text()
    assert "| sinusoid-pd | 5 | ours |" in table and "| sinusoid (ill-posed) | 5 | ours |" in table
