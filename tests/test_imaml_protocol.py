"""iMAML settings that choose what trains and how it is scored: the Omniglot variants, the
evaluation protocol (queries, batch-norm groups, rotations, lam), Adam's eps and schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bilevel.problems.imaml.config import SINUSOID, Config
from bilevel.problems.imaml.experiment import build, protocol
from bilevel.problems.imaml.job import baseline_config
from bilevel.problems.imaml.train import meta_lr


def fake_omniglot(characters: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(characters, 20, 28, 28), dtype=np.uint8)
    return images, images[: characters // 2]


def test_omniglot_defaults_to_the_reference_variant_and_the_formula_is_one_flag_away():
    reference = Config(dataset="omniglot").resolved()
    assert (reference.prox_schedule, reference.damping, reference.lam, reference.solver) == ("last_step", 22.0, 2.0,
                                                                                           "cg")
    formula = Config(dataset="omniglot", variant="formula").resolved()
    assert (formula.prox_schedule, formula.damping) == ("every_step", 0.0)
    mixed = Config(dataset="omniglot", damping=5.0).resolved()  # a flag given overrides its preset value
    assert (mixed.prox_schedule, mixed.damping) == ("last_step", 5.0)
    assert Config(dataset="omniglot", mode="first_order").resolved().damping == 0.0
    with pytest.raises(ValueError, match="variant must be one of"):
        Config(variant="paper").resolved()


def test_the_sinusoid_main_job_uses_the_measured_settings_and_maml_at_its_usual_setting_beside_it():
    job = Config().resolved()
    for key, value in SINUSOID.items():
        assert getattr(job, key) == value, key
    assert (job.prox_schedule, job.damping, job.baseline) == ("every_step", 0.0, "maml")
    maml = baseline_config(job)
    assert (maml.mode, maml.lam, maml.inner_steps, maml.inner_lr, maml.inner_optimizer) == ("unrolled", 0.0, 10, 0.02,
                                                                                           "gd")
    assert (maml.steps, maml.seed, maml.meta_batch, maml.baseline) == (job.steps, job.seed, job.meta_batch, "none")
    assert maml.out_dir.endswith("baseline_maml")
    assert Config(mode="unrolled").resolved().baseline == "none"


def test_evaluation_protocol_options_reach_the_test_sampler_and_are_named():
    images = fake_omniglot()
    config = Config(dataset="omniglot", ways=3, channels=4, eval_queries=2, eval_rotations=True, eval_lam=0.0,
                    split="random").resolved()
    exp = build(config, images)
    tasks = exp.test_tasks.sample(np.random.default_rng(0), 2)
    assert tuple(tasks.query_x.shape[:2]) == (2, 3 * 2) and exp.test_tasks.rotations
    assert exp.train_tasks.queries == 5 and exp.query_forward is not None
    assert protocol(config) == ("3-way 1-shot, 2 queries per class scored with batch norm over class-balanced "
                                "groups of 1 per class, adapted by 16 gd steps with lam 0, rotated and unrotated "
                                "test classes, random split")
    together = Config(dataset="omniglot", ways=3, eval_bn="queries").resolved()
    assert build(together, images).query_forward is None
    assert "all 15 queries at once" in protocol(together) and "held-out alphabets" in protocol(together)
    with pytest.raises(ValueError, match=r"eval_queries \(3\) must be a multiple of it"):
        Config(dataset="omniglot", shots=2, eval_queries=3).resolved()
    assert protocol(Config().resolved()).startswith(
        "10 support and 10 query points, adapted by 100 newton_cg steps with lam 3, silu network")


def test_adam_eps_and_the_cosine_schedule():
    config = Config(steps=100, meta_lr=0.01, lr_schedule="cosine", adam_eps=1e-3).resolved()
    assert [meta_lr(config, s) for s in (0, 50)] == [0.01, pytest.approx(0.005)]
    assert meta_lr(config, 100) == pytest.approx(0.0, abs=1e-12)
    assert meta_lr(Config(steps=100).resolved(), 70) == 1e-3
    assert math.isclose(meta_lr(config, 25), 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    for bad, message in ((dict(adam_eps=0.0), "adam_eps must be positive"),
                         (dict(lr_schedule="step"), "lr_schedule must be one of"),
                         (dict(eval_bn="none"), "eval_bn must be one of")):
        with pytest.raises(ValueError, match=message):
            Config(**bad).resolved()


def test_the_report_of_a_classification_run_gives_accuracy_chance_and_the_protocol(tmp_path):
    from bilevel.problems.imaml.job import report

    config = Config(dataset="omniglot", ways=5, out_dir=str(tmp_path)).resolved()
    (tmp_path / "final.json").write_text("{}")
    test = {"tasks": 600, "acc_after": 0.935, "acc_after_ci95": 0.005, "acc_before": 0.2, "acc_before_ci95": 0.01,
            "protocol": protocol(config)}
    final = {"config": config.to_dict(), "meta_steps": 30000, "test": test,
             "solver_outcomes": {"warnings": 0, "adjoint": {"solves": 10, "status": {"converged": 9,
                                 "max_iterations": 1}, "converged": 9, "converged_fraction": 0.9,
                                 "mean_iterations": 4.5, "indefinite": 0}}}
    lines = report(final, config).splitlines()
    assert lines[0] == "iMAML on omniglot, 30000 meta-steps"  # the run loop names the files last
    assert lines[1] == f"protocol: {protocol(config)}"
    assert "after adaptation      93.5 +- 0.5" in lines[3] and "before adaptation     20.0 +- 1.0" in lines[4]
    assert lines[5].endswith("chance                20.0")
    assert "(cg, at most 5 iterations, the solver's default rtol on the true residual): 9 of 10 converged (90.0%)" \
        in lines[6] and "max_iterations 1" in lines[6]
