"""The fair meta-learning harness: exact resume, evaluation records, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from bilevel import checkpoint
from bilevel.cli import main
from bilevel.problems.fair import train as train_module
from bilevel.problems.fair.data import Task
from bilevel.problems.fair.data import synthetic_tasks as make_tasks
from bilevel.problems.fair.train import Config, evaluate, train



def synthetic_tasks(count: int = 4) -> list[Task]:
    return make_tasks(count, n=30, dim=4)


@pytest.mark.parametrize("method", ["fair", "pdfm"])
def test_resume_continues_exactly(tmp_path, monkeypatch, method):
    cfg = Config(method=method, c=0.01, k_shot=6, n_query=6, meta_batch=2, steps=4, checkpoint_every=2, log_every=1,
                 inner_steps=40)
    tasks = synthetic_tasks()
    straight = train(cfg, tasks, tmp_path / "a", progress=False)

    calls = {"n": 0}
    real = train_module.sample_episodes

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # dies during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "sample_episodes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tasks, tmp_path / "b", progress=False)
    monkeypatch.setattr(train_module, "sample_episodes", real)
    resumed = train(cfg, tasks, tmp_path / "b", resume=True, progress=False)
    for a, b in zip(torch.utils._pytree.tree_leaves(straight), torch.utils._pytree.tree_leaves(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_evaluate_reports_every_metric_with_an_interval(tmp_path):
    cfg = Config(method="imaml", k_shot=6, n_query=6, meta_batch=2, steps=2, inner_steps=40)
    tasks = synthetic_tasks()
    outer = train(cfg, tasks[:3], tmp_path, progress=False)
    result = evaluate(cfg, outer, tasks[3:], episodes=4)
    for metric in ("accuracy", "dbc", "parity_gap", "soft_gap", "null_gap", "consistency"):
        summary = result["summary"][metric]
        assert summary["n"] == 4 and summary["nan"] == 0 and 0 <= summary["mean"] <= 1 and summary["ci95"] >= 0
    assert set(result["per_task"]) == {"synthetic3"}
    assert len(result["episodes"]["synthetic3"]["accuracy"]) == 4
    # the same seed gives the same episodes: iMAML's outer adapted under a test-time constraint differs
    # from plain iMAML only through the adaptation, episode by episode
    fair = evaluate(cfg, outer, tasks[3:], episodes=4, adapt_with=Config(method="fair", constraint="dp", c=0.0,
                                                                           constraint_set="task"))
    assert fair["indefinite"] == {"count": 0, "of": 4}
    again = evaluate(cfg, outer, tasks[3:], episodes=4)
    assert again["episodes"] == result["episodes"]
    assert fair["summary"]["soft_gap"]["mean"] < result["summary"]["soft_gap"]["mean"]


def test_evaluate_counts_episodes_whose_query_lacks_a_group():
    cfg = Config(method="imaml", k_shot=4, inner_steps=40)
    task = synthetic_tasks(1)[0]
    z = torch.zeros(len(task), dtype=torch.float64)
    z[0] = 1  # one row in group 1: whenever it is a support row, the query has one group only
    lone = Task("lone", task.x, task.y, z)
    result = evaluate(cfg, initial_outer_for(task), [lone], episodes=30)
    gap = result["summary"]["parity_gap"]
    assert gap["nan"] > 0 and gap["n"] + gap["nan"] == 30
    assert result["summary"]["accuracy"]["nan"] == 0


def initial_outer_for(task: Task) -> dict:
    from bilevel.problems.fair.train import initial_outer
    return initial_outer(task.x.shape[1], Config())


def test_indefinite_systems_are_warned_about_and_logged(tmp_path, monkeypatch):
    from bilevel.problems.fair.problem import FairMetaProblem, IndefiniteWarning
    monkeypatch.setattr(FairMetaProblem, "curvature", lambda self, inner, outer, data: -torch.ones((), dtype=torch.float64))
    cfg = Config(method="fair", constraint="dp", c=0.0, k_shot=6, n_query=6, meta_batch=2, steps=2, log_every=1)
    with pytest.warns(IndefiniteWarning, match="2 of 2 tasks have an indefinite"):
        train(cfg, synthetic_tasks(), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["indefinite_total"] for r in records] == [2, 4] and records[-1]["min_curvature"] == -1.0


def test_cli_writes_results_and_the_tradeoff_plot(tmp_path, shared_data, capsys):
    out = tmp_path / "run"
    code = main(["fair", "--dataset", "lsac", "--data-dir", str(shared_data), "--steps", "2", "--meta-batch", "2",
                 "--c", "0.05", "--episodes", "2", "--inner-steps", "30", "--no-progress", "--out-dir", str(out)])
    assert code == 0
    runs = [record["run"] for record in json.loads((out / "final.json").read_text())["results"]]
    assert runs == ["fair_c0.05", "imaml", "maml", "pdfm_c0.05"]
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # resuming a finished comparison reuses every result; --out, the deprecated spelling, still works
    capsys.readouterr()
    assert main(["fair", "--dataset", "lsac", "--data-dir", str(shared_data), "--steps", "2", "--c", "0.05",
                 "--meta-batch", "2", "--episodes", "2", "--no-progress", "--out", str(out), "--resume"]) == 0
    assert "--out is deprecated; use --out-dir" in capsys.readouterr().err
    assert len(json.loads((out / "final.json").read_text())["results"]) == 4


def test_constraint_set_reaches_both_constrained_methods_and_the_cli(tmp_path, shared_data):
    from bilevel.problems.fair.train import build_method
    for method in ("fair", "pdfm"):
        assert build_method(Config(method=method, constraint_set="task")).problem.constraint_set == "task"
    with pytest.raises(ValueError, match="unknown constraint_set"):
        build_method(Config(method="pdfm", constraint_set="labels"))
    out = tmp_path / "run"
    assert main(["fair", "--dataset", "communities", "--data-dir", str(shared_data), "--methods", "fair",
                 "--constraint-set", "task", "--steps", "1", "--meta-batch", "2", "--c", "0.0", "--episodes", "2",
                 "--inner-steps", "20", "--no-progress", "--out-dir", str(out)]) == 0
    config = checkpoint.load(out / "checkpoint.pt")["config"]
    assert config["constraint_set"] == "task"


def test_cli_device_errors_name_the_fix(tmp_path, capsys):
    args = ["fair", "--steps", "1", "--no-progress", "--out-dir", str(tmp_path)]
    assert main(args + ["--device", "gpu0"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda"]) == 2
        assert "no usable CUDA device" in (err := capsys.readouterr().err) and "--device cpu" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fair", "pdfm"])
def test_training_on_cuda_matches_cpu(tmp_path, method):
    from bilevel.problems.fair.data import to_device
    cfg = Config(method=method, c=0.01, k_shot=6, n_query=6, meta_batch=2, steps=3, newton_steps=20)
    tasks = synthetic_tasks()
    on_cpu = train(cfg, tasks, tmp_path / "cpu", progress=False)
    on_gpu = train(cfg, to_device(tasks, "cuda"), tmp_path / "gpu", progress=False)
    for a, b in zip(torch.utils._pytree.tree_leaves(on_cpu), torch.utils._pytree.tree_leaves(on_gpu)):
        assert b.device.type == "cuda"
        torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-8)
    cpu_eval = evaluate(cfg, on_cpu, tasks[:1], episodes=2)["summary"]["accuracy"]["mean"]
    gpu_eval = evaluate(cfg, on_gpu, to_device(tasks[:1], "cuda"), episodes=2)["summary"]["accuracy"]["mean"]
    assert abs(cpu_eval - gpu_eval) < 1e-6
