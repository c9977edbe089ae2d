"""NestedMAML: the implicit outer hypergradient, the weights, the command and its resume."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from bilevel import NonFiniteError
from bilevel.cli import main
from bilevel.problems.imaml import IMAMLProblem, mse
from bilevel.problems.imaml.models import Params
from bilevel.problems.imaml import OmniglotTasks
from bilevel.problems.nested import (CorruptedOmniglot, CorruptedSinusoid, NestedConfig, NestedData, NestedMAMLProblem,
                                     auroc, influence_weights, lookahead_weights, task_weights)
from bilevel.solvers import Direct, Status
from bilevel.testing import check_hypergradient
from bilevel.testing.tight import newton_polish

nested_train = importlib.import_module("bilevel.problems.nested.train")  # the module, not its train()
TINY = ["--train-tasks", "4", "--val-tasks", "2", "--test-tasks", "4", "--shots", "3", "--queries", "3",
        "--inner-steps", "2", "--solver-maxiter", "2", "--weight-every", "2", "--weight-start", "0",
        "--outer-solver-steps", "2", "--log-every", "2",
        "--checkpoint-every", "2", "--no-progress"]


def _tanh_net(params: Params, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ params["w0"].T + params["b0"]) @ params["w1"].T + params["b1"]


class _NewtonPolished(NestedMAMLProblem):
    """The middle level solved to machine precision by Newton's method."""

    def solve_inner(self, u: torch.Tensor, data: NestedData, init: Params) -> Params:
        return newton_polish(lambda theta: self.optimality(theta, u, data), init, steps=6, tol=1e-12)[0]


def _small_instance(weighting: str = "softmax", dtype: torch.dtype = torch.float32):
    """3 training tasks (1 corrupted), 2 validation tasks, a 1-3-1 tanh network; the middle level Newton-polished."""
    g = torch.Generator().manual_seed(0)
    theta0 = {"w0": torch.randn(3, 1, generator=g), "b0": torch.randn(3, generator=g),
              "w1": 0.5 * torch.randn(1, 3, generator=g), "b1": torch.zeros(1)}
    theta0 = {k: v.to(dtype) for k, v in theta0.items()}
    family = CorruptedSinusoid(shots=5, queries=5)
    rng = np.random.default_rng(0)
    data = NestedData(family.pool(rng, 3, corrupt=0.34, dtype=dtype).tasks, family.pool(rng, 2, dtype=dtype).tasks)
    # lam = 50 makes 16 inner steps exact to float64 precision, mu = 1 the middle level strongly monotone
    imaml = IMAMLProblem(_tanh_net, mse, lam=50.0, inner_lr=0.018, inner_steps=16)
    problem = _NewtonPolished(imaml, theta0, mu=1.0, adapt_solver=Direct(rtol=1e-12), weighting=weighting,
                              middle_steps=0)
    return problem, data, g


@pytest.mark.parametrize("weighting", ["softmax", "sigmoid"])
def test_implicit_outer_hypergradient_matches_finite_differences(weighting):
    problem, data, g = _small_instance(weighting)
    u = 0.3 * torch.randn(3, generator=g)
    report = check_hypergradient(problem, u, data, solver=Direct(rtol=1e-12), rtol=1e-6,
                                 references=("finite_differences", "direct"))
    assert report.passed
    fd = next(c for c in report.comparisons if c.reference == "finite_differences")
    assert fd.abs_error <= 1e-6 * fd.ref_norm
    assert report.inner_residual < 1e-8


def test_task_weights_are_nonnegative_and_sum_to_n():
    u = torch.tensor([-80.0, -3.0, 0.0, 5.0, 90.0])
    w = task_weights(u)
    assert (w >= 0).all() and torch.isclose(w.sum(), torch.tensor(5.0))
    assert torch.equal(task_weights(torch.zeros(4)), torch.ones(4))


def test_sigmoid_weights_are_independent_and_bounded():
    u = torch.tensor([-80.0, -3.0, 0.0, 5.0, 90.0])
    w = task_weights(u, "sigmoid")
    assert (w >= 0).all() and (w <= 2).all() and w[2] == 1.0
    assert torch.equal(task_weights(u[:3], "sigmoid"), w[:3])  # a weight depends on its own u only
    with pytest.raises(ValueError, match="weighting"):
        task_weights(u, "relu")


def test_lookahead_weights_clamp_and_normalize():
    grads = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])}
    w = lookahead_weights(grads, {"a": torch.tensor([2.0, 1.0])})
    assert torch.allclose(w, torch.tensor([2.0, 1.0, 0.0]))  # scores 2, 1, -2: clamped, scaled to sum 3
    assert torch.equal(lookahead_weights(grads, {"a": torch.tensor([-1.0, -1.0])}) >= 0, torch.ones(3, dtype=bool))
    assert torch.allclose(lookahead_weights({"a": -grads["a"].abs()}, {"a": torch.ones(2)}), torch.ones(3))


def test_a_nan_task_score_raises_instead_of_becoming_a_weight():
    grads = {"a": torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [-1.0, 0.0]])}
    with pytest.raises(NonFiniteError, match=r"batch positions \[1\]"):
        lookahead_weights(grads, {"a": torch.tensor([2.0, 1.0])})


def test_influence_weights_are_the_clamped_negated_derivative_of_the_validation_loss():
    """-dF/dw_i at w = 1, by central differences of F(theta*(w)) in float64, clamped and normalized."""
    problem, data, _ = _small_instance("softmax", torch.float64)
    theta = problem.solve_inner(torch.zeros(3, dtype=torch.float64), data, problem.theta0)  # the middle optimum
    weights, hyper = influence_weights(problem, theta, data, Direct(rtol=1e-12))
    assert problem.weighting == "softmax"  # the rule does not change the problem it is given

    def loss_at(w: torch.Tensor) -> float:
        theta_w = newton_polish(lambda th: problem.middle_gradient(th, w, problem.task_meta_gradients(th, data.train)),
                                theta, steps=6, tol=1e-13)[0]
        return float(problem.validation_loss(theta_w, data.val))

    h, one = 1e-5, torch.ones(3, dtype=torch.float64)
    basis = torch.eye(3, dtype=torch.float64)
    score = torch.tensor([-(loss_at(one + h * e) - loss_at(one - h * e)) / (2 * h) for e in basis], dtype=torch.float64)
    assert torch.allclose(-2 * hyper.grad, score, rtol=1e-5, atol=1e-9)
    expected = score.clamp(min=0) * 3 / score.clamp(min=0).sum()
    assert (score > 0).any() and torch.allclose(weights, expected, rtol=1e-5, atol=1e-9)
    assert weights.dtype == torch.float64 and (weights >= 0).all()


def test_a_meta_batch_weighs_its_tasks_by_their_pool_weights():
    problem, data, g = _small_instance("softmax")
    theta, u = problem.theta0, torch.randn(3, generator=g)
    w = task_weights(u)
    order = torch.tensor([2, 0, 1])
    batch = NestedData(type(data.train)(*(t[order] for t in data.train)), data.val, order)
    full, shuffled = problem.optimality(theta, u, data), problem.optimality(theta, u, batch)
    for k in theta:
        assert torch.allclose(full[k], shuffled[k], atol=1e-6)
    pair = NestedData(type(data.train)(*(t[1:] for t in data.train)), data.val, torch.tensor([1, 2]))
    m = problem.task_meta_gradients(theta, data.train)
    expected = problem.middle_gradient(theta, w[1:], {k: v[1:] for k, v in m.items()})
    got = problem.optimality(theta, u, pair)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in theta)


def test_auroc():
    corrupted = torch.tensor([True, True, False, False])
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), corrupted) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), corrupted) == 0.0
    assert auroc(torch.ones(4), corrupted) == 0.5


def test_pool_corrupts_the_requested_fraction():
    rng = np.random.default_rng(1)
    pool = CorruptedSinusoid(sigma=3.0, corruption="noise").pool(rng, 10, corrupt=0.5)
    assert int(pool.corrupted.sum()) == 5 and not pool.clean().corrupted.any()
    y = pool.tasks.query_y
    assert y[pool.corrupted].abs().max() > 5.0  # beyond the clean amplitude range
    assert y[~pool.corrupted].abs().max() <= 5.0


def test_flip_negates_the_query_targets_of_the_corrupted_tasks_only():
    clean = CorruptedSinusoid(corruption="flip").pool(np.random.default_rng(2), 6, corrupt=0.0).tasks
    pool = CorruptedSinusoid(corruption="flip").pool(np.random.default_rng(2), 6, corrupt=0.5)
    bad = pool.corrupted
    assert int(bad.sum()) == 3
    assert torch.equal(pool.tasks.query_y[bad], -clean.query_y[bad])
    assert torch.equal(pool.tasks.query_y[~bad], clean.query_y[~bad])
    assert torch.equal(pool.tasks.support_y, clean.support_y)


def _fake_omniglot(characters: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(characters, 20, 28, 28), dtype=np.uint8)


def test_omniglot_flip_relabels_every_query_of_the_corrupted_tasks_only():
    images = _fake_omniglot()
    clean = OmniglotTasks(images, 5, 1, 2, rotations=True).sample(np.random.default_rng(3), 6)
    pool = CorruptedOmniglot(images, 5, 1, 2).pool(np.random.default_rng(3), 6, corrupt=0.5)
    bad = pool.corrupted
    assert bad.tolist() == [True, True, True, False, False, False]
    for name in ("support_x", "support_y", "query_x"):
        assert torch.equal(getattr(pool.tasks, name), getattr(clean, name))
    assert torch.equal(pool.tasks.query_y[~bad], clean.query_y[~bad])
    shift = (pool.tasks.query_y[bad] - clean.query_y[bad]) % 5
    assert (shift != 0).all() and (shift == shift[:, :1]).all()  # every query moved, by one shift per task
    with pytest.raises(ValueError, match="ways >= 2"):
        CorruptedOmniglot(images, 1, 1, 2)


def test_settings_take_their_data_set_and_method_defaults_and_omniglot_refuses_noise():
    config = NestedConfig(dataset="omniglot", steps=7)
    defaults = nested_train.DATASET_DEFAULTS["omniglot"]
    assert config.steps == 7 and config.shots == defaults["shots"] and config.lam == defaults["lam"]
    assert NestedConfig().shots == nested_train.DATASET_DEFAULTS["sinusoid"]["shots"]
    with pytest.raises(ValueError, match="corruption='flip'"):
        NestedConfig(dataset="omniglot", corruption="noise")
    assert (NestedConfig().weight_start, NestedConfig(method="influence").weight_start) == (50, 0)
    assert NestedConfig(method="influence", weight_start=7).weight_start == 7


def test_omniglot_command_trains_and_reports_accuracy(tmp_path, capsys, monkeypatch):
    images = _fake_omniglot()

    class FakeOmniglot:
        def split(self, scheme: str):
            assert scheme == "random"
            return images, images[:6]

    monkeypatch.setattr(nested_train, "load_omniglot", lambda data_dir, cache_dir: FakeOmniglot())
    out = tmp_path / "run"
    args = ["nested", "--dataset", "omniglot", "--method", "influence", "--steps", "2", "--channels", "4",
            "--train-tasks", "4", "--meta-batch", "2", "--val-tasks", "2", "--test-tasks", "3", "--queries", "1",
            "--inner-steps", "1", "--solver-maxiter", "2", "--weight-start", "0", "--weight-every", "1",
            "--outer-solver-steps", "2", "--log-every", "1", "--checkpoint-every", "1", "--no-progress",
            "--out-dir", str(out)]
    assert main(args) == 0
    final = json.loads((out / "final.json").read_text())
    assert 0 <= final["test_accuracy"] <= 1 and final["test_accuracy_ci95"] >= 0 and np.isfinite(final["test_loss"])
    assert sum(final["outer_solves"].values()) == 2 and len(final["weights"]) == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and all("val_accuracy" in r for r in records)


def test_command_runs_and_learned_weights_stay_nonnegative(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["nested", "--method", "nested", "--steps", "4", "--weight-lr", "5", "--out-dir", str(out), *TINY]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["steps"] == 4 and np.isfinite(final["test_mse"]) and final["test_mse_ci95"] > 0
    weights = np.array(final["weights"])
    assert (weights >= 0).all() and np.isclose(weights.sum(), 4) and not np.allclose(weights, 1)
    assert 0.0 <= final["auroc"] <= 1.0 and final["corrupted"] == [True, True, False, False]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    # the two weight updates' adjoint solves (steps 0 and 2) are counted by status, in the log and the result
    assert sum(final["outer_solves"].values()) == 2 and records[-1]["outer_solves"] == final["outer_solves"]
    assert set(final["outer_solves"]) <= {s.name.lower() for s in Status}
    assert main(["nested", "--steps", "4", "--out-dir", str(out), *TINY]) == 2  # the folder holds a run
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("method, batch", [("nested", []), ("influence", []), ("influence", ["--meta-batch", "2"]),
                                           ("lookahead", ["--meta-batch", "2"])])
def test_resume_gives_the_uninterrupted_result(tmp_path, method, batch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    flags = ["--method", method, *TINY, "--weight-every", "3", *batch]  # influence: step 2 uses step 0's weights
    assert main(["nested", "--steps", "4", "--out-dir", str(whole), *flags]) == 0
    assert main(["nested", "--steps", "2", "--out-dir", str(split), *flags]) == 0
    assert main(["nested", "--steps", "4", "--out-dir", str(split), "--resume", "--no-progress"]) == 0
    a, b = (json.loads((d / "final.json").read_text()) for d in (whole, split))
    assert a["steps"] == b["steps"] == 4 and a["weights"] != [1.0] * 4
    solves = ("outer_solves",) if method != "lookahead" else ()
    for key in ("test_mse", "test_mse_before", "weights", "auroc", *solves):
        assert a[key] == b[key], key
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for d in (whole, split) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(strip) == 6 and strip[:3] == strip[3:]


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["nested", "--method", "uniform", "--steps", "2", "--out-dir", str(out), *TINY]) == 0
    assert main(["nested", "--steps", "4", "--corrupt", "0.25", "--out-dir", str(out), "--resume", *TINY]) == 2
    assert "--corrupt" in capsys.readouterr().err


def test_nan_in_the_task_data_is_refused_with_the_tasks_named(tmp_path, capsys, monkeypatch):
    drawn = CorruptedSinusoid.pool

    def with_a_nan(self, rng, size, corrupt=0.0, **kwargs):
        pool = drawn(self, rng, size, corrupt, **kwargs)
        if size == 2:  # the validation tasks
            pool.tasks.query_y[1, 0] = float("nan")
        return pool

    monkeypatch.setattr(CorruptedSinusoid, "pool", with_a_nan)
    out = tmp_path / "run"
    assert main(["nested", "--method", "lookahead", "--steps", "2", "--out-dir", str(out), *TINY]) == 2
    assert "NaN or Inf in the data of validation tasks [1] (1 of 2)" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("method", nested_train.METHODS)
def test_a_non_finite_meta_gradient_stops_the_run_before_it_reaches_the_parameters(method):
    config = NestedConfig(method=method, steps=2, train_tasks=4, val_tasks=2, test_tasks=2, shots=3, queries=3,
                          inner_steps=2, solver_maxiter=2, weight_start=0, weight_every=1, outer_solver_steps=2)
    run = nested_train.NestedRun(config, torch.device("cpu"))
    run.pool.tasks.support_y[3, 0] = float("nan")  # a clean task, after the data were checked
    before = {k: v.detach().clone() for k, v in run.theta.items()}
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        run.train_step()
    assert run.taken == 0 and all(torch.equal(before[k], v.detach()) for k, v in run.theta.items())


def test_a_run_that_meets_nan_ends_with_one_error_line(tmp_path, capsys, monkeypatch):
    """A meta-gradient that turns NaN mid-run (here: bad data let past the data check) is reported by the
    command as an error line with exit status 2, not a traceback."""
    drawn = CorruptedSinusoid.pool

    def with_a_nan(self, rng, size, corrupt=0.0, **kwargs):
        pool = drawn(self, rng, size, corrupt, **kwargs)
        if corrupt:  # the training pool
            pool.tasks.support_y[3, 0] = float("nan")
        return pool

    monkeypatch.setattr(CorruptedSinusoid, "pool", with_a_nan)
    monkeypatch.setattr(nested_train, "_require_finite_tasks", lambda tasks, name: None)
    assert main(["nested", "--method", "uniform", "--steps", "2", "--out-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bilevel nested: error: NaN or Inf in the meta-gradient of step 0 (uniform)")
    assert "Traceback" not in err
