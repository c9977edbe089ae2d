"""The run loop every training command shares, on a toy instance, and the flag vocabulary of the five
commands: each takes every shared flag, with its config's default, and hides the older spellings."""

from __future__ import annotations

import argparse
import json
import os
import signal
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from bilevel import checkpoint
from bilevel.cli import build_parser
from bilevel.runner import Command, Preempted, run
from bilevel.runner.flags import SHARED, config_defaults
from bilevel.runs import read_records


@dataclass(frozen=True)
class ToyConfig:
    steps: int = 6
    lr: float = 0.5
    log_every: int = 2
    checkpoint_every: int = 2
    max_minutes: float | None = None
    device: str | None = "cpu"
    out_dir: str = "runs/toy"
    progress: bool = False


class Toy:
    """Gradient descent on ``x^2 / 2`` from 1, with a pending sum of the steps not logged yet: its state
    must carry that sum for a run stopped between two logs to resume exactly."""

    signal_at: int | None = None  # the step during which the process sends itself SIGTERM

    def __init__(self, config: ToyConfig, run) -> None:
        self.config, self.x, self.pending = config, torch.tensor(1.0, dtype=torch.float64), 0.0

    def step(self, index: int) -> None:
        if index == Toy.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.x = self.x - self.config.lr * self.x * (1 + 0.1 * index)
        self.pending += float(self.x)

    def record(self, step: int, last: bool, seconds: float) -> dict[str, Any]:
        pending, self.pending = self.pending, 0.0
        return {"x": float(self.x), "window_sum": pending}

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x, self.pending = state["x"], state["pending"]

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"x": float(self.x), "logged": len(records)}

    def report(self, final: dict[str, Any]) -> list[str]:
        return [f"toy: x = {final['x']:.6g}"]


TOY = Command("toy", Toy, frozenset({"steps", "max_minutes"}))


def test_a_run_writes_its_files_and_reports(tmp_path, capsys):
    final = run(TOY, ToyConfig(), out_dir=tmp_path)
    assert json.loads((tmp_path / "final.json").read_text()) == {**final, "config": final["config"]}
    assert final["logged"] == 3 and final["config"]["lr"] == 0.5 and "out_dir" not in final["config"]
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [2, 4, 6]
    assert checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 6
    printed = capsys.readouterr().out
    assert "toy: x = " in printed and f"files in {tmp_path}: checkpoint.prev.pt, checkpoint.pt" in printed


def test_sigterm_mid_window_checkpoints_that_step_and_resume_ends_as_uninterrupted(tmp_path, monkeypatch):
    straight = run(TOY, ToyConfig(), out_dir=tmp_path / "straight", report=False)
    monkeypatch.setattr(Toy, "signal_at", 2)  # during the third step: between the logs of steps 2 and 4
    with pytest.raises(Preempted) as stopped:
        run(TOY, ToyConfig(), out_dir=tmp_path / "split", report=False)
    assert stopped.value.status == 128 + signal.SIGTERM and stopped.value.step == 3
    assert f"--out-dir {tmp_path / 'split'} --resume" in str(stopped.value)
    assert checkpoint.load(tmp_path / "split" / "checkpoint.pt")["step"] == 3  # the last completed step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
    monkeypatch.setattr(Toy, "signal_at", None)
    resumed = run(TOY, ToyConfig(), out_dir=tmp_path / "split", resume=True, report=False)
    assert resumed == straight
    assert read_records(tmp_path / "split" / "metrics.jsonl") == read_records(tmp_path / "straight" / "metrics.jsonl")


def test_resume_restores_the_settings_and_refuses_a_changed_one_unless_resumable(tmp_path):
    run(TOY, ToyConfig(steps=4), out_dir=tmp_path, report=False)
    with pytest.raises(ValueError, match=r"--lr 0.25 \(the run has 0.5\)"):
        run(TOY, ToyConfig(steps=4, lr=0.25), out_dir=tmp_path, resume=True, given={"lr": "--lr"})
    # a field not given takes the run's value; a resumable one may change
    final = run(TOY, ToyConfig(steps=6, lr=0.25), out_dir=tmp_path, resume=True, given={"steps": "--steps"},
                report=False)
    assert final["config"]["lr"] == 0.5 and final["logged"] == 3


def test_max_minutes_stops_at_a_log_step_as_the_last_one_and_resume_goes_on(tmp_path):
    final = run(TOY, ToyConfig(max_minutes=1e-9), out_dir=tmp_path, report=False)
    assert final["logged"] == 1 and checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 2
    straight = run(TOY, ToyConfig(), out_dir=tmp_path / "straight", report=False)
    assert run(TOY, ToyConfig(), out_dir=tmp_path, resume=True, report=False)["x"] == straight["x"]


def test_a_folder_holding_a_run_is_refused_and_overwrite_starts_over(tmp_path):
    run(TOY, ToyConfig(), out_dir=tmp_path, report=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(TOY, ToyConfig(), out_dir=tmp_path, report=False)
    assert run(TOY, ToyConfig(lr=0.25), out_dir=tmp_path, overwrite=True, report=False)["config"]["lr"] == 0.25


def test_tensorboard_gets_every_logged_number_under_its_tag(tmp_path, monkeypatch):
    import sys
    import types

    written: list[tuple[str, float, int]] = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (the tensorboard package is optional)
        def __init__(self, log_dir: str) -> None:
            assert log_dir == str(tmp_path / "tensorboard")

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            written.append((tag, value, step))

        def close(self) -> None:
            written.append(("closed", 0.0, 0))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run(TOY, ToyConfig(), out_dir=tmp_path, report=False, tensorboard=True)
    logged = read_records(tmp_path / "metrics.jsonl")
    assert written[:-1] == [(tag, r[tag], r["step"]) for r in logged for tag in ("x", "window_sum")]
    assert written[-1][0] == "closed"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        run(TOY, ToyConfig(), out_dir=tmp_path / "other", report=False, tensorboard=True)


# ---------------------------------------------------------------- one vocabulary

COMMANDS = {  # argv prefix -> the config class whose defaults its flags take
    ("imaml",): "bilevel.problems.imaml.config:Config",
    ("hyperopt", "l2"): "bilevel.problems.hyperparameter.config:HyperoptConfig",
    ("hyperopt", "cleaning"): "bilevel.problems.hyperparameter.config:HyperoptConfig",
    ("fair",): "bilevel.problems.fair.config:FairConfig",
    ("prox",): "bilevel.problems.prox.config:ProxConfig",
    ("nested",): "bilevel.problems.nested.train:NestedConfig",
}
SOLVER_FIELDS = {"imaml": {"solver_maxiter": "cg_steps"}}
"""Where a shared flag stores into a config field of another name."""
COMMAND_LINE_DEFAULTS = {("imaml", "--device"): None}
"""Where the command line's default differs from the library's, on purpose: ``bilevel imaml`` takes cuda
when available (None), ``Config()`` from Python the cpu."""


def _subparser(prefix: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser([prefix[0]])
    for word in prefix:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _config_class(path: str) -> type:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("prefix", COMMANDS, ids=" ".join)
def test_every_training_command_takes_every_shared_flag_with_its_configs_default(prefix):
    parser = _subparser(prefix)
    options = {option for action in parser._actions for option in action.option_strings}
    assert set(SHARED) | {"--tensorboard"} <= options, sorted(set(SHARED) - options)
    defaults = config_defaults(_config_class(COMMANDS[prefix]))
    fields = SOLVER_FIELDS.get(prefix[0], {})
    for flag in SHARED:
        if flag in ("--resume", "--overwrite", "--no-progress"):
            continue
        action = next(a for a in parser._actions if flag in a.option_strings)
        field = fields.get(flag[2:].replace("-", "_"), flag[2:].replace("-", "_"))
        assert action.dest == field, flag
        expected = COMMAND_LINE_DEFAULTS.get((prefix[0], flag), defaults[field])
        assert action.default == expected, (flag, action.default, expected)
    progress = next(a for a in parser._actions if "--no-progress" in a.option_strings)
    assert progress.dest == "progress" and defaults["progress"] is True


OLD_SPELLINGS = [
    (("imaml",), "--cg-steps", "7", "cg_steps", 7),
    (("imaml",), "--solver-steps", "7", "cg_steps", 7),
    (("hyperopt", "l2"), "--out", "somewhere", "out_dir", "somewhere"),
    (("hyperopt", "l2"), "--max-time", "120", "max_minutes", 2.0),
    (("hyperopt", "l2"), "--max-inner-iter", "7", "inner_steps", 7),
    (("hyperopt", "l2"), "--cg-maxiter", "7", "solver_maxiter", 7),
    (("hyperopt", "cleaning"), "--corruption", "0.25", "corrupt", 0.25),
    (("fair",), "--out", "somewhere", "out_dir", "somewhere"),
    (("fair",), "--k-shot", "7", "shots", 7),
    (("fair",), "--n-query", "7", "queries", 7),
    (("prox",), "--adjoint-rtol", "0.5", "solver_rtol", 0.5),
    (("prox",), "--adjoint-maxiter", "7", "solver_maxiter", 7),
    (("prox",), "--max-iter", "7", "inner_steps", 7),
    (("prox",), "--differentiation", "admm", "differentiation", "admm"),
    (("nested",), "--solver-steps", "7", "solver_maxiter", 7),
]


@pytest.mark.parametrize("prefix,old,value,field,expected", OLD_SPELLINGS)
def test_older_spellings_still_work_out_of_help_and_name_the_new_one(prefix, old, value, field, expected, capsys):
    args = build_parser([prefix[0]]).parse_args([*prefix, old, value])
    assert getattr(args, field) == expected
    assert f"{old} is deprecated; use --" in capsys.readouterr().err
    help_text = _subparser(prefix).format_help()
    assert f"{old} " not in help_text and f"{old}\n" not in help_text
