"""iMAML meta-training on sinusoids: learning happens, exact resume, settings checks, the CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bilevel.problems.imaml import cli
from bilevel.problems.imaml.config import SINUSOID, Config
from bilevel.problems.imaml.train import CHECKPOINT, METRICS, load_checkpoint, train

TINY = dict(meta_batch=4, inner_steps=3, log_every=2, eval_every=4, checkpoint_every=2, eval_tasks=8,
            final_tasks=8, progress=False)


def metrics(out) -> list[dict]:
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    for line in lines:
        line.pop("seconds")
    return lines


def test_meta_training_improves_post_adaptation_loss_on_held_out_tasks(tmp_path):
    config = Config(steps=60, meta_batch=8, meta_lr=3e-3, log_every=10, eval_every=60, checkpoint_every=60,
                    eval_tasks=20, final_tasks=100, out_dir=str(tmp_path), progress=False)
    final = train(config)["test"]
    assert final["loss_after"] < 0.8 * final["loss_before"]
    first = metrics(tmp_path)[0]["query_loss"]
    assert metrics(tmp_path)[-1]["query_loss"] < first
    # the default inner solve (Newton-CG on the SiLU network) solves every task's inner problem
    assert all(record["inner_residual_max"] <= 1e-4 for record in metrics(tmp_path))
    assert (tmp_path / "sinusoid_fits.png").stat().st_size > 0
    assert (tmp_path / "learning_curves.png").stat().st_size > 0


@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_resume_continues_exactly(tmp_path, mode):
    straight = Config(steps=6, mode=mode, out_dir=str(tmp_path / "straight"), **TINY)
    train(straight)
    split = Config(steps=4, mode=mode, out_dir=str(tmp_path / "split"), **TINY)
    train(split)
    with open(tmp_path / "split" / METRICS, "a") as f:  # a line logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 5, "query_loss": 0.0, "seconds": 0.0}) + "\n")
    train(Config(**{**split.__dict__, "steps": 6}), resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    for k in a["state"]["theta"]:
        assert torch.equal(a["state"]["theta"][k], b["state"]["theta"][k]), k
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "split")


def test_time_budget_stops_at_a_log_step_with_a_checkpoint_and_resume_finishes(tmp_path):
    final = train(Config(steps=50, max_minutes=1e-9, out_dir=str(tmp_path), **TINY))
    assert final["meta_steps"] == TINY["log_every"]
    assert load_checkpoint(tmp_path)["step"] == TINY["log_every"]
    assert "eval" in metrics(tmp_path)[-1]
    stopped_at = load_checkpoint(tmp_path)["seconds"]
    assert stopped_at > 0
    assert train(Config(steps=6, out_dir=str(tmp_path), **TINY), resume=True)["meta_steps"] == 6
    clock = [json.loads(line)["seconds"] for line in (tmp_path / METRICS).read_text().splitlines()]
    assert clock == sorted(clock) and clock[1] > stopped_at  # the resumed run's clock goes on from the first's
    with pytest.raises(ValueError, match="max_minutes must be positive"):
        Config(max_minutes=0).resolved()


def test_evaluation_can_adapt_with_another_proximal_strength(tmp_path):
    from bilevel.problems.imaml.experiment import build

    exp = build(Config(eval_lam=0.0).resolved())
    assert exp.problem.lam == SINUSOID["lam"] and exp.eval_problem.lam == 0.0
    assert build(Config().resolved()).eval_problem.lam == SINUSOID["lam"]
    plain = train(Config(steps=2, eval_lam=0.0, out_dir=str(tmp_path / "plain"), **TINY))["test"]
    prox = train(Config(steps=2, out_dir=str(tmp_path / "prox"), **TINY))["test"]
    assert plain["loss_before"] == prox["loss_before"] and plain["loss_after"] != prox["loss_after"]
    with pytest.raises(ValueError, match="eval_lam must be >= 0"):
        Config(eval_lam=-1.0).resolved()


@pytest.mark.parametrize("settings,message", [
    (dict(meta_batch=-1), r"whole numbers >= 1: \{'meta_batch': -1\}"),
    (dict(steps=-5), r"whole numbers >= 1: \{'steps': -5\}"),
    (dict(log_every=0), r"whole numbers >= 1: \{'log_every': 0\}"),
    (dict(cg_steps=2.5), r"whole numbers >= 1: \{'cg_steps': 2.5\}"),
    (dict(chunk_size=0), r"whole numbers >= 1: \{'chunk_size': 0\}"),
    (dict(dataset="omniglot", ways=1), "ways >= 2"),
    (dict(meta_lr=0.0), "meta_lr must be positive"),
    (dict(damping=-1.0), "damping must be >= 0"),
    (dict(device="gpu0"), "not a torch device"),
])
def test_invalid_settings_are_named_before_anything_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        Config(**settings).resolved()


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    train(Config(steps=2, out_dir=str(tmp_path), **TINY))
    with pytest.raises(ValueError, match=r"with other settings: meta_lr 0.1 \(the run has 0.001\)"):
        train(Config(steps=4, meta_lr=0.1, out_dir=str(tmp_path), **TINY), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(Config(steps=2, out_dir=str(tmp_path / "new"), **TINY), resume=True)


def test_a_checkpoint_older_than_a_setting_resumes_with_the_setting_given(tmp_path):
    train(Config(steps=2, out_dir=str(tmp_path), **TINY))
    path = tmp_path / CHECKPOINT
    payload = load_checkpoint(tmp_path)
    del payload["config"]["spike_factor"]  # written before the setting existed
    from bilevel.checkpoint import save

    save(payload, path)
    assert train(Config(steps=4, spike_factor=5.0, out_dir=str(tmp_path), **TINY), resume=True)["meta_steps"] == 4
    assert load_checkpoint(tmp_path)["config"]["spike_factor"] == 5.0


def test_config_validation():
    with pytest.raises(ValueError, match="multiples of log_every"):
        Config(log_every=3, checkpoint_every=10).resolved()
    with pytest.raises(ValueError, match="unrolled.*differentiates through gradient descent"):
        Config(mode="unrolled", inner_optimizer="nesterov").resolved()
    resolved = Config(dataset="omniglot", ways=20).resolved()
    assert (resolved.lam, resolved.inner_steps, resolved.inner_lr, resolved.meta_batch) == (2.0, 25, 0.1, 32)
    assert Config(dataset="omniglot", mode="unrolled").resolved().lam == 0.0


def test_solvers_are_made_by_name_and_an_unknown_one_is_named():
    from bilevel.problems.imaml.config import Config
    from bilevel.problems.imaml.experiment import make_solver
    from bilevel.solvers import SOLVERS

    cg = make_solver("cg", 7, 0.5)
    assert (type(cg).__name__, cg.maxiter, cg.ridge) == ("CG", 7, 0.5)
    for name, cls in SOLVERS.items():
        assert type(make_solver(name, 5, 0.0)) is cls
    with pytest.raises(ValueError, match=r"solver must be one of .*'cg'.*got 'lsqr'"):
        Config(solver="lsqr").resolved()


def test_cli_runs_a_short_sinusoid_training_with_its_maml_baseline_and_reports(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="bilevel")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["imaml", "--steps", "4", "--meta-batch", "3", "--log-every", "2", "--eval-every", "4",
                              "--checkpoint-every", "2", "--eval-tasks", "4", "--final-tasks", "4",
                              "--solver", "cg", "--damping", "0.1", "--out-dir", str(tmp_path), "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    final = json.loads((tmp_path / "final.json").read_text())
    test, maml = final["test"], final["baseline"]
    assert f"files in {tmp_path}: " in printed and "final.json" in printed
    assert f"after adaptation      {test['loss_after']:.3f} +- {test['loss_after_ci95']:.3f}" in printed
    assert f"before adaptation     {test['loss_before']:.3f}" in printed
    assert f"predicting zero       {test['loss_zero']:.3f}" in printed
    assert f"MAML baseline (10 inner steps of 0.02, lam 0, 4 meta-steps), after adaptation: " \
           f"{maml['test']['loss_after']:.3f}" in printed
    adjoint = final["solver_outcomes"]["adjoint"]
    assert f"{adjoint['converged']} of 12 converged" in printed and adjoint["solves"] == 12
    assert (tmp_path / CHECKPOINT).is_file() and (tmp_path / "baseline_maml" / CHECKPOINT).is_file()
    assert load_checkpoint(tmp_path / "baseline_maml")["config"]["mode"] == "unrolled"
    log = metrics(tmp_path)
    assert [r["step"] for r in log] == [2, 4] and sum(log[0]["solve_status"].values()) == 6
