"""torchopt's implicit meta-gradient: ``torchopt.diff.implicit.custom_root`` with its CG.

A loop over tasks, as in torchopt's iMAML example; ``solve_cg(maxiter=cg_steps,
rtol=0)`` runs exactly ``cg_steps`` iterations from zero.
"""

from __future__ import annotations

import torch
import torchopt

from _tasks import SPECS, proximal, task_loss


def make(problem: str, theta: tuple[torch.Tensor, ...], data: tuple[torch.Tensor, ...], steps: int,
         cg_steps: int):
    lam, alpha = SPECS[problem].lam, SPECS[problem].alpha

    def inner_objective(phi, meta, xs, ys):
        return task_loss(problem, phi, xs, ys) + proximal(phi, meta, lam)

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(inner_objective), argnums=1,
        solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0.0, atol=0.0))
    def inner_solve(phi, meta, xs, ys):
        for _ in range(steps):
            grads = torch.func.grad(inner_objective)(phi, meta, xs, ys)
            phi = tuple(p - alpha * g for p, g in zip(phi, grads))
        return phi

    meta = tuple(t.detach().clone().requires_grad_() for t in theta)
    xs, ys, xq, yq = data
    tasks = xs.shape[0]

    def call():
        total = None
        for i in range(tasks):
            phi = inner_solve(tuple(t.detach() for t in meta), meta, xs[i], ys[i])
            grads = torch.autograd.grad(task_loss(problem, phi, xq[i], yq[i]) / tasks, meta)
            total = grads if total is None else tuple(a + b for a, b in zip(total, grads))
        return total

    return call
