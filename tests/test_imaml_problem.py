"""The iMAML problem: its meta-gradient against closed forms, MAML and FOMAML through the
same problem, vmapped against looped meta-batches, and the negative-curvature report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bilevel
from bilevel.problems.imaml import IMAMLProblem, SinusoidTasks, conv4_forward, conv4_init, meta_gradient
from bilevel.problems.imaml.models import forward_with, mlp_forward, mlp_init, num_params
from bilevel.problems.imaml.problem import adapt, cross_entropy, mse
from bilevel.problems.imaml.tasks import Task
from bilevel.solvers import CG, Direct, Status
from bilevel.solvers.minimize import MinimizeStatus


def small_mlp(hidden: int = 6, seed: int = 0, dtype=torch.float64):
    params = mlp_init(hidden, generator=torch.Generator().manual_seed(seed))
    return {k: v.to(dtype) for k, v in params.items()}


def sinusoid_tasks(batch: int, seed: int = 0, dtype=torch.float64) -> Task:
    tasks = SinusoidTasks(shots=5, queries=5).sample(np.random.default_rng(seed), batch)
    return Task(*(t.to(dtype) for t in tasks))


def conv_tasks(batch: int, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    ways, n = 3, 3
    images = lambda: (torch.rand(batch, ways * n, 1, 28, 28, generator=g) > 0.8).float()  # noqa: E731
    labels = torch.arange(ways).repeat_interleave(n).expand(batch, -1)
    return Task(images(), labels, images(), labels)


def flat(tree) -> torch.Tensor:
    return bilevel.ravel(tree)[0]


def test_model_sizes():
    assert num_params(mlp_init()) == 1761  # 1-40-40-1
    assert num_params(conv4_init(5)) == 112_261  # 4 x (conv 3x3 x 64 + bn) + linear head


def test_implicit_meta_gradient_is_the_papers_formula():
    """g = (I + H/lam)^{-1} grad L_test(phi), H = hess L_train(phi), at the inner solution phi."""
    problem = IMAMLProblem(mlp_forward, mse, lam=3.0, inner_lr=0.05, inner_steps=40)
    theta, task = small_mlp(), sinusoid_tasks(1).index(0)
    result = bilevel.hypergradient(problem, theta, task, solver=Direct(), on_failure="ignore")
    phi_vec, unravel = bilevel.ravel(result.inner)
    hessian = torch.func.hessian(lambda v: problem.support_loss(unravel(v), task))(phi_vec)
    g_test = torch.func.grad(lambda v: problem.query_loss(unravel(v), task))(phi_vec)
    expected = torch.linalg.solve(torch.eye(len(phi_vec), dtype=phi_vec.dtype) + hessian / 3.0, g_test)
    torch.testing.assert_close(flat(result.grad), expected, rtol=1e-8, atol=1e-10)


def test_cg_meta_gradient_approaches_the_exact_one_with_more_steps():
    problem = IMAMLProblem(mlp_forward, mse, lam=20.0, inner_lr=0.02, inner_steps=20)  # lam >> |H| : SPD
    theta, tasks = small_mlp(), sinusoid_tasks(3)
    exact = flat(meta_gradient(problem, theta, tasks, solver=Direct()).grad)
    errors = [float((flat(meta_gradient(problem, theta, tasks, solver=CG(maxiter=k, rtol=0)).grad) - exact).norm())
              for k in (1, 3, 10)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6 * float(exact.norm())


def test_unrolled_mode_with_lam_zero_is_maml():
    """One inner step: MAML's gradient is d/dtheta L_test(theta - alpha grad L_train(theta))."""
    problem = IMAMLProblem(mlp_forward, mse, lam=0.0, inner_lr=0.01, inner_steps=1)
    theta, task = small_mlp(), sinusoid_tasks(1).index(0)

    def maml_loss(t):
        g = torch.func.grad(lambda p: problem.support_loss(p, task))(t)
        return problem.query_loss({k: t[k] - 0.01 * g[k] for k in t}, task)

    expected = torch.func.grad(maml_loss)(theta)
    got = meta_gradient(problem, theta, Task(*(t[None] for t in task)), mode="unrolled").grad
    torch.testing.assert_close(got, expected)


def test_first_order_mode_is_the_query_gradient_at_phi():
    problem = IMAMLProblem(mlp_forward, mse, lam=0.0, inner_lr=0.01, inner_steps=3)
    theta, tasks = small_mlp(), sinusoid_tasks(2)
    got = meta_gradient(problem, theta, tasks, mode="first_order").grad
    expected = []
    for i in range(2):
        task = tasks.index(i)
        phi = problem.solve_inner(theta, task, theta)
        expected.append(flat(torch.func.grad(lambda p: problem.query_loss(p, task))(phi)))
    torch.testing.assert_close(flat(got), torch.stack(expected).mean(0))
    with pytest.raises(ValueError, match="solver= applies only to mode='implicit'"):
        meta_gradient(problem, theta, tasks, mode="first_order", solver=CG())


@pytest.mark.parametrize("mode", ["implicit", "unrolled", "first_order"])
def test_vmapped_meta_batch_equals_a_loop_over_tasks(mode):
    """The meta-batch runs as one vmapped computation; it must equal the per-task results."""
    problem = IMAMLProblem(conv4_forward, cross_entropy, lam=2.0, inner_lr=0.1, inner_steps=2)
    theta = {k: v.double() for k, v in conv4_init(3, channels=4, generator=torch.Generator().manual_seed(0)).items()}
    tasks = conv_tasks(3)
    tasks = Task(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    batched = meta_gradient(problem, theta, tasks, mode=mode)
    kwargs = {"solver": CG(maxiter=5)} if mode == "implicit" else {}
    looped = [bilevel.hypergradient(problem, theta, tasks.index(i), mode=mode, on_failure="ignore", **kwargs)
              for i in range(3)]
    expected = torch.stack([flat(r.grad) for r in looped]).mean(0)
    torch.testing.assert_close(flat(batched.grad), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(batched.query_loss, torch.stack([r.outer_loss for r in looped]))
    if mode == "implicit":
        assert batched.status.tolist() == [int(r.solve.status) for r in looped]
    chunked = meta_gradient(problem, theta, tasks, mode=mode, chunk_size=2)
    torch.testing.assert_close(flat(chunked.grad), flat(batched.grad), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.query_loss, batched.query_loss)


def test_chunked_adaptation_equals_the_whole_batch():
    problem = IMAMLProblem(conv4_forward, cross_entropy, lam=2.0, inner_lr=0.1, inner_steps=2)
    theta = {k: v.double() for k, v in conv4_init(3, channels=4, generator=torch.Generator().manual_seed(0)).items()}
    tasks = conv_tasks(3)
    tasks = Task(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    whole, one_by_one = adapt(problem, theta, tasks), adapt(problem, theta, tasks, chunk_size=1)
    for a, b in zip(whole, one_by_one):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_negative_curvature_is_detected_and_counted():
    """A ReLU regressor far from a minimum has Hessian eigenvalues below -lam: CG reports it."""
    problem = IMAMLProblem(mlp_forward, mse, lam=0.05, inner_lr=0.01, inner_steps=2)
    theta, tasks = small_mlp(hidden=20), sinusoid_tasks(4)
    mg = meta_gradient(problem, theta, tasks)
    negative = int(mg.count(Status.NEGATIVE_CURVATURE))
    phi_vec, unravel = bilevel.ravel(theta)
    lowest = [float(torch.linalg.eigvalsh(torch.func.hessian(
        lambda v: problem.inner_objective(unravel(v), theta, tasks.index(i)))(phi_vec))[0]) for i in range(4)]
    assert negative >= 1
    assert any(ev < 0 for ev in lowest)  # the systems it flags are indefinite
    damped = meta_gradient(problem, theta, tasks, solver=CG(maxiter=5, ridge=-min(lowest) + 1.0))
    assert int(damped.count(Status.NEGATIVE_CURVATURE)) == 0  # enough damping makes them definite


def test_nesterov_inner_solver_gets_closer_to_the_inner_minimum():
    base = dict(lam=2.0, inner_lr=0.02, inner_steps=20)
    theta, task = small_mlp(hidden=20), sinusoid_tasks(1).index(0)
    gd = IMAMLProblem(mlp_forward, mse, **base)
    nesterov = IMAMLProblem(mlp_forward, mse, inner_optimizer="nesterov", **base)
    objective = [float(p.inner_objective(p.solve_inner(theta, task, theta), theta, task)) for p in (gd, nesterov)]
    assert objective[1] < objective[0] < float(gd.inner_objective(theta, theta, task))
    with pytest.raises(ValueError, match="inner_optimizer must be one of"):
        IMAMLProblem(mlp_forward, mse, inner_optimizer="adam")


def test_adaptation_lowers_the_support_loss_of_every_task():
    problem = IMAMLProblem(mlp_forward, mse, lam=0.5, inner_lr=0.01, inner_steps=10)
    theta, tasks = small_mlp(hidden=20), sinusoid_tasks(5)
    out = adapt(problem, theta, Task(tasks.support_x, tasks.support_y, tasks.support_x, tasks.support_y))
    assert bool((out.loss_after < out.loss_before).all())


def test_last_step_prox_schedule_is_plain_descent_then_one_proximal_step():
    theta = mlp_init()
    task = SinusoidTasks().sample(np.random.default_rng(0), 1).index(0)
    plain = IMAMLProblem(mlp_forward, mse, lam=0.0, inner_lr=0.02, inner_steps=7)
    last = IMAMLProblem(mlp_forward, mse, lam=2.0, inner_lr=0.02, inner_steps=7, prox_schedule="last_step")
    every = IMAMLProblem(mlp_forward, mse, lam=2.0, inner_lr=0.02, inner_steps=7)
    phi_plain, phi_last = plain.solve_inner(theta, task, theta), last.solve_inner(theta, task, theta)
    for k in theta:
        want = theta[k] + (1 - 0.02 * 2.0) * (phi_plain[k] - theta[k])
        torch.testing.assert_close(phi_last[k], want)
    moved_last = sum(((phi_last[k] - theta[k]) ** 2).sum() for k in theta)
    moved_every = sum(((every.solve_inner(theta, task, theta)[k] - theta[k]) ** 2).sum() for k in theta)
    assert moved_last > moved_every  # the pull towards theta acts once instead of at every step
    with pytest.raises(ValueError, match="prox_schedule must be one of"):
        IMAMLProblem(mlp_forward, mse, prox_schedule="sometimes")


def test_armijo_inner_solver_never_increases_the_objective_where_fixed_steps_diverge():
    """A step of 0.5 makes plain gradient descent blow up on a large-amplitude task; the
    backtracking solver starts from the same step, keeps F decreasing and ends finite."""
    theta = small_mlp(hidden=20)
    task = Task(*(t * s for t, s in zip(sinusoid_tasks(1).index(0), (1.0, 5.0, 1.0, 5.0))))
    base = dict(lam=1.0, inner_lr=0.5)
    gd = IMAMLProblem(mlp_forward, mse, inner_steps=30, **base)
    assert not float(gd.inner_objective(gd.solve_inner(theta, task, theta), theta, task)) < 1e6  # diverged
    values = [float(gd.inner_objective(theta, theta, task))]
    for k in (1, 5, 30):
        armijo = IMAMLProblem(mlp_forward, mse, inner_steps=k, inner_optimizer="armijo", **base)
        values.append(float(armijo.inner_objective(armijo.solve_inner(theta, task, theta), theta, task)))
    assert values == sorted(values, reverse=True) and values[-1] < 0.5 * values[0]


def test_armijo_steps_are_per_task_under_vmap_and_a_solved_task_stays_put():
    problem = IMAMLProblem(mlp_forward, mse, lam=1.0, inner_lr=0.05, inner_steps=8, inner_optimizer="armijo")
    theta, tasks = small_mlp(hidden=10), sinusoid_tasks(3)
    batched = torch.func.vmap(lambda t: problem.solve_inner(theta, t, theta))(tasks)
    for i in range(3):
        alone = problem.solve_inner(theta, tasks.index(i), theta)
        torch.testing.assert_close({k: v[i] for k, v in batched.items()}, alone)
    solved = IMAMLProblem(mlp_forward, mse, lam=1.0, inner_lr=0.05, inner_steps=8, inner_optimizer="armijo",
                          inner_tol=1e9)
    torch.testing.assert_close(solved.solve_inner(theta, tasks.index(0), theta), theta)
    with pytest.raises(ValueError, match="inner_optimizer must be one of"):
        IMAMLProblem(mlp_forward, mse, inner_optimizer="bfgs")


@pytest.mark.parametrize("name", ["lbfgs", "newton_cg"])
def test_library_inner_solvers_solve_the_proximal_problem_and_report_it(name):
    """With a smooth network the proximal inner problem is solved to the tolerance, per task
    under vmap, and hypergradient reports the inner solve."""
    theta, tasks = small_mlp(hidden=10), sinusoid_tasks(3)
    forward = forward_with(mlp_forward, "silu")
    problem = IMAMLProblem(forward, mse, lam=2.0, inner_steps=200, inner_optimizer=name, inner_tol=1e-4)
    phis = torch.func.vmap(lambda t: problem.solve_inner(theta, t, theta))(tasks)
    for i in range(3):
        task = tasks.index(i)
        phi = {k: v[i] for k, v in phis.items()}
        assert float(bilevel.ravel(problem.optimality(phi, theta, task))[0].norm()) <= 1e-4
        result = bilevel.hypergradient(problem, theta, task, solver="cg", on_failure="raise")
        assert MinimizeStatus(int(result.inner_solve.status)) is MinimizeStatus.CONVERGED
        assert float(result.inner_residual) <= 1e-4


def test_meta_gradient_reports_the_true_adjoint_and_inner_residuals():
    problem = IMAMLProblem(mlp_forward, mse, lam=2.0, inner_lr=0.05, inner_steps=10, inner_optimizer="armijo")
    theta, tasks = small_mlp(), sinusoid_tasks(2)
    solver = bilevel.solvers.MINRES(maxiter=3, rtol=1e-12)
    mg = meta_gradient(problem, theta, tasks, solver=solver)
    for i in range(2):
        task = tasks.index(i)
        result = bilevel.hypergradient(problem, theta, task, solver=solver, on_failure="ignore")
        phi_vec, unravel = bilevel.ravel(result.inner)
        a = torch.func.hessian(lambda v: problem.inner_objective(unravel(v), theta, task))(phi_vec)
        b = torch.func.grad(lambda v: problem.query_loss(unravel(v), task))(phi_vec)
        expected = (b - a @ result.solve.x).norm() / b.norm()
        torch.testing.assert_close(mg.adjoint_residual[i], expected)
        grad_f = torch.func.grad(lambda v: problem.inner_objective(unravel(v), theta, task))(phi_vec)
        torch.testing.assert_close(mg.inner_residual[i], grad_f.norm())
    assert int(mg.converged(1.0)) == 2 and int(mg.converged(1e-12)) == int(mg.count(Status.CONVERGED)) == 0
    assert meta_gradient(problem, theta, tasks, mode="first_order").adjoint_residual is None


def test_balanced_groups_score_queries_with_batch_norm_statistics_of_support_shaped_batches():
    from bilevel.problems.imaml.problem import balanced_groups

    ways, shots, queries = 3, 1, 2
    theta = {k: v.double() for k, v in conv4_init(ways, channels=4, generator=torch.Generator().manual_seed(0)).items()}
    x = torch.rand(ways * queries, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grouped = balanced_groups(conv4_forward, ways, shots)(theta, x)
    for g in range(queries):  # group g: query g of every class (class-major layout: index c * queries + g)
        rows = [c * queries + g for c in range(ways)]
        torch.testing.assert_close(grouped[rows], conv4_forward(theta, x[rows]))
    assert not torch.allclose(grouped, conv4_forward(theta, x))  # statistics of all 6 queries differ
    torch.testing.assert_close(balanced_groups(conv4_forward, ways, queries)(theta, x), conv4_forward(theta, x))
    with pytest.raises(ValueError, match="do not split into groups of 2 per class of 3"):
        balanced_groups(conv4_forward, ways, 2)(theta, x[:3])


def test_indefinite_systems_are_proven_for_minres_too_and_never_claimed_for_definite_ones():
    """v^T b + |v| |b - A v| < 0 proves v^T A v < 0: every task flagged has a negative eigenvalue."""
    problem = IMAMLProblem(mlp_forward, mse, lam=0.05, inner_lr=0.01, inner_steps=2)
    theta, tasks = small_mlp(hidden=20), sinusoid_tasks(8)
    phi_vec, unravel = bilevel.ravel(theta)
    flagged = []
    for solver in (bilevel.solvers.MINRES(maxiter=30), CG(maxiter=5)):
        mg = meta_gradient(problem, theta, tasks, solver=solver)
        flagged.append(mg.indefinite.tolist())
        for i in np.flatnonzero(mg.indefinite.numpy()):
            task = tasks.index(int(i))
            inner = problem.solve_inner(theta, task, theta)
            hessian = torch.func.hessian(lambda v: problem.inner_objective(unravel(v), theta, task))(
                bilevel.ravel(inner)[0])
            assert float(torch.linalg.eigvalsh(hessian)[0]) < 0
    assert any(flagged[1])  # CG meets negative curvature; MINRES solves through it, flagged only when v^T b < 0
    definite = IMAMLProblem(mlp_forward, mse, lam=50.0, inner_lr=0.01, inner_steps=2)
    assert not meta_gradient(definite, theta, tasks, solver=bilevel.solvers.MINRES(maxiter=30)).indefinite.any()
