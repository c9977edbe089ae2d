"""``bilevel prox``: the restoration problem's hypergradient three ways, against finite differences and
unrolling, the adjoint statuses, and the command end to end with resume."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import bilevel
from bilevel.problems.prox import ProxRestoration, filter_bank, gaussian_kernel, load_images
from bilevel.problems.prox import cli
from bilevel.solvers import CG, GMRES, MINRES, BiCGSTAB, Status
from bilevel.testing import check_hypergradient

D = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Small FFTs: one thread is fastest, and fair to the others on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def instance():
    """Two 10x10 shapes, blurred and noisy; the tv bank (ADMM state: 5 x 200 unknowns, Newton-checkable)."""
    images = load_images("shapes", n_train=2, n_test=1, size=10, blur_sigma=0.7, noise=0.05, seed=1, dtype=D)
    problem = ProxRestoration(gaussian_kernel(0.7, dtype=D), filter_bank("tv", dtype=D), eps=0.05, tol=1e-13,
                              max_iter=20000)
    theta = {"log_weights": torch.tensor([-3.0, -2.5], dtype=D)}
    return problem, theta, images


def _mse_of(clean):
    return lambda x, theta, y: (x - clean).pow(2).mean()


@pytest.mark.parametrize("solver", [CG(rtol=1e-10), MINRES(rtol=1e-10)], ids=["cg", "minres"])
def test_optimality_hypergradient_matches_finite_differences(instance, solver):
    problem, theta, images = instance
    report = check_hypergradient(problem, theta, (images.train_clean, images.train_observed), solver=solver,
                                 references=("finite_differences", "direct"))
    assert report.passed and Status(int(report.solve.status)) == Status.CONVERGED


def test_learned_filters_hypergradient_matches_finite_differences(instance):
    problem, theta, images = instance
    learned = {**theta, "filters": problem.bank + 0.1 * torch.randn(problem.bank.shape, dtype=D,
                                                                   generator=torch.Generator().manual_seed(0))}
    report = check_hypergradient(problem, learned, (images.train_clean, images.train_observed),
                                 references=("finite_differences",))
    assert report.passed and report.grad["filters"].abs().max() > 0


@pytest.mark.parametrize("solver", [GMRES(rtol=1e-10), BiCGSTAB(rtol=1e-10)], ids=["gmres", "bicgstab"])
def test_proximal_gradient_fixed_point_matches_finite_differences(instance, solver):
    problem, theta, images = instance
    solution = problem.pg_solution(solver)
    report = check_hypergradient(solution, theta, (images.train_observed,), outer_loss=_mse_of(images.train_clean))
    assert report.passed and solution.forward_iterations < problem.inner_steps


def test_admm_fixed_point_matches_finite_differences(instance):
    problem, theta, images = instance
    solution = problem.admm_solution(GMRES(rtol=1e-10))
    clean = images.train_clean
    report = check_hypergradient(solution, theta, (images.train_observed,),
                                 outer_loss=lambda s, th, y: (s["x"] - clean).pow(2).mean())
    assert report.passed and set(report.references) >= {"finite_differences", "direct"}


def test_three_implicit_ways_and_unrolling_agree_at_convergence(instance):
    problem, theta, images = instance
    data = (images.train_clean, images.train_observed)
    implicit = bilevel.hypergradient(problem, theta, data, solver=CG(rtol=1e-12)).grad["log_weights"]
    live = {"log_weights": theta["log_weights"].clone().requires_grad_()}
    pg = torch.autograd.grad((problem.pg_solution(GMRES(rtol=1e-12))(live, data[1]) - data[0]).pow(2).mean(),
                             live["log_weights"])[0]
    admm = torch.autograd.grad((problem.admm_solution(GMRES(rtol=1e-12))(live, data[1])["x"] - data[0])
                               .pow(2).mean(), live["log_weights"])[0]
    unrolled = ProxRestoration(problem.blur, problem.bank, eps=problem.eps, max_iter=2500)
    through_steps = bilevel.hypergradient(unrolled, theta, data, mode="unrolled").grad["log_weights"]
    short = ProxRestoration(problem.blur, problem.bank, eps=problem.eps, max_iter=50)
    early = bilevel.hypergradient(short, theta, data, mode="unrolled", on_failure="ignore").grad["log_weights"]
    for other in (pg, admm):
        torch.testing.assert_close(other, implicit, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(through_steps, implicit, rtol=1e-6, atol=1e-12)
    assert (early - implicit).norm() > 1e-3 * implicit.norm()  # 50 steps are far from converged


def test_adjoint_failures_are_reported_with_their_status(instance):
    problem, theta, images = instance
    live = {"log_weights": theta["log_weights"].clone().requires_grad_()}
    for solver, status in ((CG(rtol=1e-10), Status.NONSYMMETRIC), (GMRES(maxiter=3), Status.MAX_ITERATIONS)):
        solution = problem.pg_solution(solver)
        with pytest.warns(bilevel.ConvergenceWarning, match=status.name):
            (solution(live, images.train_observed) - images.train_clean).pow(2).sum().backward()
        assert Status(int(solution.last_solve.status)) == status
    with pytest.raises(bilevel.ConvergenceError, match="MAX_ITERATIONS"):
        state = problem.admm_solution(GMRES(maxiter=2), on_failure="raise")(live, images.train_observed)
        (state["x"] - images.train_clean).pow(2).sum().backward()


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bilevel")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prox", *argv])
    return args.func(args)


def records(folder) -> list[dict]:
    with open(folder / "metrics.jsonl") as fh:
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in fh]


TINY = ["--size", "12", "--n-train", "2", "--n-test", "2", "--grid", "3", "--grid-low", "-6", "--grid-high", "-4",
        "--filters", "tv", "--lr", "0.2", "--no-progress", "--checkpoint-every", "2", "--device", "cpu"]


@pytest.mark.parametrize("how", ["optimality", "pg", "admm", "unrolled"])
def test_command_runs_end_to_end(tmp_path, capsys, how):
    extra = ["--max-iter", "300", "--on-failure", "ignore"] if how == "unrolled" else []
    assert run([*TINY, *extra, "--mode", how, "--steps", "3", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "final.json").read_text())
    assert "held-out PSNR" in capsys.readouterr().out  # the closing report reads; the figures stay in files
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_mse"] < rows[0]["train_mse"]
    expected = ["-"] if how == "unrolled" else ["CONVERGED"]
    assert summary["adjoint_statuses"] == expected and all(r["adjoint_status"] for r in rows) != (how == "unrolled")
    assert summary["learned_test_psnr"] > summary["observed_test_psnr"]
    with pytest.raises(FileExistsError, match="--resume"):
        run([*TINY, "--mode", how, "--steps", "3", "--out-dir", str(tmp_path)])


def test_resume_continues_exactly_and_refuses_other_settings(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run([*TINY, "--mode", "pg", "--steps", "4", "--out-dir", str(straight)]) == 0
    assert run([*TINY, "--mode", "pg", "--steps", "2", "--out-dir", str(resumed)]) == 0
    with pytest.raises(ValueError, match="--eps"):
        run(["--out-dir", str(resumed), "--steps", "4", "--resume", "--eps", "0.1"])
    assert run(["--out-dir", str(resumed), "--steps", "4", "--resume", "--no-progress"]) == 0
    assert records(resumed) == records(straight)
