"""``bilevel hyperopt``: files written, exact resume, and the errors of a bad resume."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bilevel import checkpoint
from bilevel.problems.hyperparameter import cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bilevel")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["hyperopt", *argv])
    return args.func(args)


def records(folder) -> list[dict]:
    with open(folder / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time",)} for r in rows]


def test_l2_run_and_exact_resume(tmp_path, shared_data, capsys):
    common = ["l2", "--dataset", "german", "--data-dir", str(shared_data), "--no-progress", "--n-train", "300",
              "--n-val", "200", "--n-test", "200", "--checkpoint-every", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run([*common, "--out-dir", str(straight), "--steps", "6"]) == 0
    assert "hyperopt l2: per-feature L2 on german, 6 outer steps" in capsys.readouterr().out
    printed = json.loads((straight / "final.json").read_text())
    rows = records(straight)
    assert [r["step"] for r in rows] == list(range(7)) and printed["final"]["step"] == 6
    assert printed["selected"] == printed["final"]  # no held-out selection set: the last step
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert {"test_loss", "test_acc", "tol", "accepted", "solve_iterations"} <= set(rows[-1])
    assert (straight / "plot.png").stat().st_size > 0

    assert run([*common, "--out-dir", str(resumed), "--steps", "3", "--no-plot"]) == 0
    with open(resumed / "metrics.jsonl", "a") as fh:  # a step logged after the last checkpoint is redone
        fh.write(json.dumps({"step": 4, "time": 0.0, "val_loss": -1.0}) + "\n")
    capsys.readouterr()
    # --out, the deprecated spelling of --out-dir, still works and says so
    assert run([*common, "--out", str(resumed), "--steps", "6", "--resume", "--no-plot"]) == 0
    assert "--out is deprecated; use --out-dir" in capsys.readouterr().err
    assert without_time(records(resumed)) == without_time(rows)
    a = checkpoint.load(straight / "checkpoint.pt")["state"]["state"]
    b = checkpoint.load(resumed / "checkpoint.pt")["state"]["state"]
    assert torch.equal(a["outer"], b["outer"]) and torch.equal(a["inner"], b["inner"])


def test_help_names_out_dir_and_hides_the_deprecated_out(capsys):
    with pytest.raises(SystemExit):
        run(["cleaning", "--help"])
    text = capsys.readouterr().out
    assert "--out-dir" in text and "--out " not in text and "--out\n" not in text


def test_held_out_selection_keeps_the_step_with_the_lowest_held_out_loss(tmp_path, shared_data, capsys):
    argv = ["l2", "--dataset", "german", "--data-dir", str(shared_data), "--no-progress", "--no-plot",
            "--n-train", "300", "--n-val", "200", "--n-test", "200", "--steps", "8", "--select-fraction", "0.25",
            "--out-dir", str(tmp_path)]
    assert run(argv) == 0
    printed = json.loads((tmp_path / "final.json").read_text())
    rows = records(tmp_path)
    best = min(rows, key=lambda r: r["select_loss"])
    assert printed["selected"]["step"] == best["step"] and printed["final"]["step"] == 8
    assert all(r["select_loss"] > 0 for r in rows)
    with pytest.raises(SystemExit):  # refused before any data is read
        run([*argv[:-1], str(tmp_path / "bad"), "--select-fraction", "1.5"])
    assert "argument --select-fraction: must be a number in [0, 1), got '1.5'" in capsys.readouterr().err


def test_selected_record_prefers_the_lowest_held_out_loss_then_the_later_step():
    from bilevel.problems.hyperparameter.experiment import selected_record

    rows = [{"step": 0, "select_loss": 0.5}, {"step": 1, "select_loss": 0.3}, {"step": 2, "select_loss": 0.3},
            {"step": 3, "select_loss": 0.4}]
    assert selected_record(rows)["step"] == 2
    assert selected_record([{"step": 0}, {"step": 1}])["step"] == 1


def test_resume_errors_name_the_fix(tmp_path, shared_data):
    common = ["l2", "--dataset", "german", "--data-dir", str(shared_data), "--no-progress", "--no-plot",
              "--out-dir", str(tmp_path), "--steps", "1"]
    with pytest.raises(FileNotFoundError, match="run once without --resume"):
        run([*common, "--resume"])
    assert run(common) == 0
    with pytest.raises(ValueError, match=r"other settings: --seed 1 \(the run has 0\)"):
        run([*common, "--resume", "--seed", "1"])


def test_a_missing_device_is_named_before_any_data_is_read(tmp_path):
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        run(["l2", "--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path), "--device", "gpu0"])


def test_cleaning_run_reports_the_separation_of_corrupted_examples(tmp_path, shared_data):
    out = tmp_path / "cleaning"
    assert run(["cleaning", "--corrupt", "0.5", "--data-dir", str(shared_data), "--n-train", "300",
                "--n-val", "200", "--n-test", "300", "--reg", "1e-2", "--steps", "3", "--no-progress",
                "--out-dir", str(out)]) == 0
    rows = records(out)
    assert len(rows) == 4 and {"auc", "precision", "recall", "test_acc"} <= set(rows[-1])
    assert rows[-1]["auc"] > 0.6 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert (out / "plot.png").exists()
