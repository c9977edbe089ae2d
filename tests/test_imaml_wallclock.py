"""The equal-wall-clock table of ``benchmarks/imaml_wallclock.py``, from run folders written here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import imaml_wallclock  # noqa: E402


def _run(folder: Path, evals: list[tuple[int, float, float]], test: float, resources: dict | None) -> None:
    """A finished run: evaluations ``(step, minutes, accuracy)`` in its log, and its test result."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "seconds": 60 * m, "query_loss": 1.0, "eval": {"acc_after": a}})
             for s, m, a in evals]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = {"meta_steps": evals[-1][0], "config": {"inner_steps": 16},
             "test": {"acc_after": test, "acc_after_ci95": 0.01, "tasks": 600, "protocol": "p"}}
    (folder / "final.json").write_text(json.dumps(final))
    if resources is not None:
        (folder / "resources.json").write_text(json.dumps(resources))


def test_reads_each_curve_at_the_last_evaluation_before_each_mark(tmp_path, capsys):
    _run(tmp_path / "implicit", [(10, 4.0, 0.5), (20, 9.0, 0.6), (30, 14.5, 0.7)], 0.71,
         {"cpu_seconds": 600.0, "peak_rss_mib": 700.0})
    _run(tmp_path / "first_order", [(25, 6.0, 0.55), (50, 12.0, 0.65)], 0.66, None)
    # unrolled did not finish: no final.json
    (tmp_path / "unrolled").mkdir()
    rows = imaml_wallclock.summarize(tmp_path, [5.0, 10.0, 15.0])
    assert "MAML: no final.json" in capsys.readouterr().err
    imaml, fomaml = rows
    assert (imaml["method"], fomaml["method"]) == ("iMAML", "FOMAML")
    assert imaml["held_out"] == {"5 min": 0.5, "10 min": 0.6, "15 min": 0.7}
    assert fomaml["held_out"] == {"5 min": None, "10 min": 0.55, "15 min": 0.65}
    assert imaml["seconds_per_step"] == 60 * 14.5 / 30 and imaml["peak_rss_mib"] == 700.0
    table = imaml_wallclock.table(rows, [5.0, 10.0, 15.0]).splitlines()
    assert table[2] == "| iMAML | 16 | 30 | 29.00 | 50.0% | 60.0% | 70.0% | 71.0% +- 1.0 | 10 | 700 MiB |"
    assert table[3] == "| FOMAML | 16 | 50 | 14.40 |  | 55.0% | 65.0% | 66.0% +- 1.0 |  |  |"
