"""Learn the regularizer's weights (and filters) by Adam on implicit hypergradients, against a grid baseline.

A run: pick the best single weight ``exp(c)`` for every filter from a grid (by the
training MSE), start ``theta`` there, take ``steps`` Adam steps on the training
MSE with the hypergradient of the chosen differentiation, and report the PSNR
of both on the held-out images. :class:`ProxRun` is the instance that
:data:`COMMAND` hands to the run loop (:mod:`bilevel.runner.loop`), which writes
``metrics.jsonl`` (one record per step: loss, PSNR, adjoint-solve status and
iterations, forward iterations), ``checkpoint.pt`` and ``final.json``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

import bilevel
from bilevel.runner import Command, Run
from bilevel.solvers import SOLVERS, SolveResult, Status

from .config import DIFFERENTIATIONS, RESUMABLE, ProxConfig
from .data import Images, load_images
from .operators import filter_bank, gaussian_kernel
from .problem import ProxRestoration, Theta

__all__ = ["COMMAND", "DIFFERENTIATIONS", "ProxRun", "grid_search", "hypergradient", "psnr"]


def psnr(x: Tensor, clean: Tensor) -> float:
    """Mean over images of ``10 log10(1 / MSE)`` (intensities in [0, 1])."""
    mse = (x - clean).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def hypergradient(problem: ProxRestoration, theta: Theta, clean: Tensor, y: Tensor, how: str, solver: str | None,
                  on_failure: str = "warn") -> tuple[Theta, Tensor, Tensor, SolveResult | None, int | None]:
    """``(grad, loss, x*, adjoint solve, forward iterations)`` of the training MSE at ``theta``.

    ``how`` is a key of :data:`DIFFERENTIATIONS`; the forward iterations are ``None`` for ``"optimality"``
    (:meth:`ProxRestoration.solve_inner` runs inside :func:`bilevel.hypergradient`).
    """
    data = (clean, y)
    if how in ("optimality", "unrolled"):
        mode = "implicit" if how == "optimality" else "unrolled"
        result = bilevel.hypergradient(problem, theta, data, solver=solver, mode=mode, on_failure=on_failure)
        iterations = problem.inner_steps if mode == "unrolled" else None
        return result.grad, result.outer_loss, result.inner, result.solve, iterations
    live = {k: v.detach().requires_grad_() for k, v in theta.items()}
    solution = (problem.pg_solution if how == "pg" else problem.admm_solution)(solver, on_failure)
    out = solution(live, y)
    x = out if how == "pg" else out["x"]
    loss = problem.outer_objective(x, live, data)
    grads = torch.autograd.grad(loss, list(live.values()))
    return dict(zip(live, grads)), loss.detach(), x.detach(), solution.last_solve, solution.forward_iterations


def _problem(config: ProxConfig, dtype: torch.dtype, device: torch.device) -> ProxRestoration:
    return ProxRestoration(gaussian_kernel(config.blur, dtype=dtype).to(device),
                           filter_bank(config.filters, dtype=dtype).to(device), eps=config.eps,
                           penalty=config.penalty, forward=config.forward, tol=config.tol,
                           max_iter=config.inner_steps)


def _restore(problem: ProxRestoration, theta: Theta, y: Tensor) -> Tensor:
    with torch.no_grad():
        return problem.solve_inner(theta, (y, y), y)


def grid_search(problem: ProxRestoration, images: Images, lows: list[float]) -> list[dict[str, float]]:
    """One weight ``exp(c)`` for every filter, for each ``c``: training and held-out PSNR."""
    n_filters = problem.bank.shape[0]
    rows = []
    for c in lows:
        theta = {"log_weights": torch.full((n_filters,), c, dtype=images.train_clean.dtype,
                                           device=images.train_clean.device)}
        rows.append({"log_weight": c,
                     "train_psnr": psnr(_restore(problem, theta, images.train_observed), images.train_clean),
                     "test_psnr": psnr(_restore(problem, theta, images.test_observed), images.test_clean)})
    return rows


class ProxRun:
    """One learning run (the run loop's instance): the images, the problem, ``theta`` and Adam."""

    def __init__(self, config: ProxConfig, run: Run) -> None:
        self.config, device = config, run.device
        self.dtype = getattr(torch, config.dtype)
        self.images = load_images(config.dataset, n_train=config.n_train, n_test=config.n_test, size=config.size,
                                  blur_sigma=config.blur, noise=config.noise, seed=config.seed,
                                  data_dir=config.data_dir, dtype=self.dtype, device=device)
        self.problem = _problem(config, self.dtype, device)
        how = config.differentiation
        self.solver = None if how == "unrolled" else SOLVERS[config.solver or DIFFERENTIATIONS[how]](
            rtol=config.solver_rtol, maxiter=config.solver_maxiter)
        self.device = device
        self.elapsed = 0.0  # optimization seconds: the steps' hypergradients and Adam updates
        self.done = 0  # steps taken
        self.statuses: set[str] = set()

    def _optimize(self, theta: Theta) -> None:
        self.theta = theta
        self.optimizer = torch.optim.Adam(list(theta.values()), lr=self.config.lr)

    def start(self) -> None:
        """A new run: the grid baseline, and ``theta`` at its best weight."""
        c = self.config
        lows = [c.grid_low + i * (c.grid_high - c.grid_low) / max(c.grid - 1, 1) for i in range(c.grid)]
        self.grid = grid_search(self.problem, self.images, lows)
        best = max(self.grid, key=lambda r: r["train_psnr"])
        theta = {"log_weights": torch.full((self.problem.bank.shape[0],), best["log_weight"], dtype=self.dtype,
                                           device=self.device, requires_grad=True)}
        if c.learn_filters:
            theta["filters"] = self.problem.bank.clone().requires_grad_()
        self._optimize(theta)

    def step(self, index: int) -> None:
        began = time.perf_counter()
        grad, loss, x, solve, iterations = hypergradient(self.problem, self.theta, self.images.train_clean,
                                                         self.images.train_observed, self.config.differentiation,
                                                         self.solver, self.config.on_failure)
        for k, v in self.theta.items():
            v.grad = grad[k]
        self.optimizer.step()
        self.elapsed += time.perf_counter() - began
        self.done = index + 1
        status = None if solve is None else Status(int(solve.status)).name
        self.statuses.add(status or "-")
        self.latest = {"train_mse": float(loss), "train_psnr": psnr(x, self.images.train_clean),
                       "forward_iterations": iterations, "adjoint_status": status,
                       "adjoint_iterations": None if solve is None else int(solve.iterations),
                       "log_weights": self.theta["log_weights"].detach().cpu().tolist()}

    def record(self, step: int, last: bool, seconds: float) -> dict[str, Any]:
        return {"time": self.elapsed, **self.latest}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"psnr": f"{record['train_psnr']:.2f}"}

    def state_dict(self) -> dict[str, Any]:
        return {"theta": {k: v.detach() for k, v in self.theta.items()}, "optimizer": self.optimizer.state_dict(),
                "grid": self.grid, "elapsed": self.elapsed, "statuses": sorted(self.statuses), "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grid, self.elapsed, self.statuses = state["grid"], state["elapsed"], set(state["statuses"])
        self.done = state["done"]
        self._optimize({k: v.to(self.device).requires_grad_() for k, v in state["theta"].items()})
        self.optimizer.load_state_dict(state["optimizer"])

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The grid baseline and the learned weights on the held-out images."""
        images, steps = self.images, self.done
        best = max(self.grid, key=lambda r: r["train_psnr"])
        learned = {k: v.detach() for k, v in self.theta.items()}
        summary = {"observed_test_psnr": psnr(images.test_observed, images.test_clean),
                   "grid_best": best, "grid_oracle_test_psnr": max(r["test_psnr"] for r in self.grid),
                   "learned_test_psnr": psnr(_restore(self.problem, learned, images.test_observed), images.test_clean),
                   "learned_log_weights": learned["log_weights"].cpu().tolist(), "steps": steps,
                   "seconds": self.elapsed, "adjoint_statuses": sorted(self.statuses)}
        summary["gain_db"] = summary["learned_test_psnr"] - best["test_psnr"]
        return {**summary, "grid": self.grid}

    def report(self, final: dict[str, Any]) -> list[str]:
        c, best = self.config, final["grid_best"]
        solver = "reverse mode" if self.solver is None else f"adjoint {type(self.solver).__name__}"
        return [f"prox: {c.differentiation} ({solver}) on {c.dataset}, {final['steps']} Adam steps, "
                f"{c.n_test} held-out images",
                f"  held-out PSNR (dB): learned {final['learned_test_psnr']:.2f}, best grid weight "
                f"exp({best['log_weight']:g}) {best['test_psnr']:.2f} (gain {final['gain_db']:+.2f}), grid oracle "
                f"{final['grid_oracle_test_psnr']:.2f}, observed {final['observed_test_psnr']:.2f}",
                f"  adjoint solve statuses: {', '.join(final['adjoint_statuses'])}"]


COMMAND = Command("prox", ProxRun, RESUMABLE)
"""``bilevel prox`` for the run loop."""
