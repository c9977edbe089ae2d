"""CUDAGraphed: replayed CUDA graphs give the eager results; bad input is named.

The replay tests need a GPU and are skipped without one (CI has none); they run
on the GPU machines where the CUDA numbers in docs/benchmarks.md come from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bilevel
from bilevel.problems.imaml import IMAMLProblem, conv4_forward, conv4_init, meta_gradient, mlp_forward, mlp_init, mse
from bilevel.problems.imaml.problem import cross_entropy
from bilevel.problems.imaml.sinusoid import SinusoidTasks
from bilevel.problems.imaml.tasks import Task
from bilevel.solvers import CG, GMRES, MINRES, BiCGSTAB, Direct, Neumann

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_tensors_and_unhashable_constants_are_refused_with_the_fix():
    graphed = bilevel.CUDAGraphed(lambda x, c=None: x * 2)
    with pytest.raises(bilevel.BilevelError, match=r"needs CUDA tensors.*leaf 0 is on cpu.*\.to\('cuda'\)"):
        graphed(torch.ones(2))
    with pytest.raises(bilevel.BilevelError, match="at least one CUDA tensor"):
        graphed(3.0)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        bilevel.CUDAGraphed(lambda x: x, warmup=0)


def _conv_tasks(n: int, seed: int, device: str) -> Task:
    g = torch.Generator().manual_seed(seed)
    return Task(torch.rand(n, 5, 1, 28, 28, generator=g), torch.randint(0, 5, (n, 5), generator=g),
                torch.rand(n, 25, 1, 28, 28, generator=g), torch.randint(0, 5, (n, 25), generator=g)).to(device)


@cuda
@pytest.mark.parametrize("mode", ["implicit", "unrolled", "first_order"])
def test_graphed_imaml_meta_gradient_equals_eager_on_fresh_data(mode):
    lam = 2.0 if mode == "implicit" else 0.0
    problem = IMAMLProblem(conv4_forward, cross_entropy, lam=lam, inner_lr=0.1, inner_steps=5)
    theta = {k: v.cuda() for k, v in conv4_init(5, 16).items()}
    solver = CG(maxiter=5) if mode == "implicit" else None

    def eager(theta, tasks):
        return meta_gradient(problem, theta, tasks, mode=mode, solver=solver)

    graphed = bilevel.CUDAGraphed(eager)
    for seed in range(3):  # the first call captures, the next ones replay on new tasks
        tasks = _conv_tasks(4, seed, "cuda")
        want, got = eager(theta, tasks), graphed(theta, tasks)
        for k in theta:
            torch.testing.assert_close(got.grad[k], want.grad[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.query_loss, want.query_loss)
        if mode == "implicit":
            assert torch.equal(got.status, want.status)
    assert graphed.num_graphs == 1


@cuda
def test_graphed_sinusoid_meta_gradient_tracks_changing_theta():
    problem = IMAMLProblem(mlp_forward, mse, lam=1.0, inner_lr=0.02, inner_steps=10)
    theta = {k: v.cuda() for k, v in mlp_init().items()}
    graphed = bilevel.CUDAGraphed(lambda th, tk: meta_gradient(problem, th, tk, solver=MINRES(maxiter=5)))
    rng = np.random.default_rng(0)
    for _ in range(3):
        tasks = SinusoidTasks().sample(rng, 8, "cuda")
        want = meta_gradient(problem, theta, tasks, solver=MINRES(maxiter=5))
        got = graphed(theta, tasks)
        for k in theta:
            torch.testing.assert_close(got.grad[k], want.grad[k], rtol=1e-4, atol=1e-6)
            theta[k] = theta[k] - 0.1 * want.grad[k]


class _Ridge(bilevel.BilevelProblem):
    """``phi* = argmin 1/2 ||X phi - y||^2 + exp(theta)/2 ||phi||^2``; outer ``1/2 ||phi - t||^2``."""

    def inner_objective(self, phi, theta, data):
        X, y, _ = data
        return 0.5 * ((X @ phi - y) ** 2).sum() + 0.5 * theta.exp() * (phi ** 2).sum()

    def outer_objective(self, phi, theta, data):
        return 0.5 * ((phi - data[2]) ** 2).sum()

    def initial_inner(self, theta, data):
        return torch.zeros(data[0].shape[1], device=data[0].device, dtype=data[0].dtype)

    def solve_inner(self, theta, data, init):
        X, y, _ = data
        A = X.T @ X + theta.exp() * torch.eye(X.shape[1], device=X.device, dtype=X.dtype)
        return torch.linalg.solve_ex(A, X.T @ y)[0]  # no error check: no host sync


@cuda
def test_unbatched_hypergradient_is_captured_with_deferred_checks():
    g = torch.Generator().manual_seed(0)
    data = tuple(t.cuda().double() for t in (torch.randn(30, 6, generator=g), torch.randn(30, generator=g),
                                             torch.randn(6, generator=g)))
    theta = torch.tensor(0.3, dtype=torch.float64, device="cuda")
    problem = _Ridge()

    def hg(theta, data):
        return bilevel.hypergradient(problem, theta, data, solver=CG(maxiter=50, rtol=1e-12))

    graphed = bilevel.CUDAGraphed(hg)
    got, want = graphed(theta, data), hg(theta, data)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=0)
    assert bool(bilevel.check_result(got).solve.converged)


@pytest.mark.parametrize("solver", [CG(maxiter=20), MINRES(maxiter=20), GMRES(maxiter=20, restart=5),
                                    BiCGSTAB(maxiter=20), Neumann(maxiter=20), Direct()],
                         ids=["cg", "minres", "gmres", "bicgstab", "neumann", "direct"])
def test_capture_reads_no_tensor_value_on_the_host(monkeypatch, solver):
    """CPU stand-in for capture: every tensor is fake (reading a value raises) and the
    library is told a graph is being recorded, as ``is_capturing`` says on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import bilevel.solvers._base
    import bilevel.solvers._transforms

    for module in (bilevel.solvers._transforms, bilevel.solvers._base):  # seen by every host check
        monkeypatch.setattr(module, "is_capturing", lambda t: True)
    g = torch.Generator().manual_seed(0)
    real = (torch.randn(30, 6, generator=g), torch.randn(30, generator=g), torch.randn(6, generator=g))
    with FakeTensorMode() as mode:
        data = tuple(mode.from_tensor(t) for t in real)
        theta = mode.from_tensor(torch.tensor(0.3))
        out = bilevel.hypergradient(_Ridge(), theta, data, solver=solver)
        unrolled = bilevel.hypergradient(_Ridge(), theta, data, mode="unrolled")
    assert out.grad.shape == unrolled.grad.shape == ()


def test_values_hidden_under_vmap_and_not_on_plain_cpu_tensors():
    from bilevel.solvers import values_hidden

    assert not values_hidden(torch.ones(3))
    seen = []
    torch.func.vmap(lambda t: seen.append(values_hidden(t)) or t)(torch.ones(2, 3))
    assert seen == [True]
