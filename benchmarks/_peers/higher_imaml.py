"""higher's unrolled MAML: ``higher.innerloop_ctx`` with a differentiable SGD.

The inner loss carries the proximal term ``lam/2 ||phi - theta||^2`` so that the
unrolled and implicit methods differentiate the same inner problem.
"""

from __future__ import annotations

import higher
import torch
from torch import nn

from _tasks import SPECS, forward, output_loss, proximal


class Net(nn.Module):
    """The benchmark network as a module (higher patches module parameters)."""

    def __init__(self, problem: str, theta: tuple[torch.Tensor, ...]):
        super().__init__()
        self.problem = problem
        self.count = len(theta)
        for i, t in enumerate(theta):
            self.register_parameter(f"p{i}", nn.Parameter(t.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.problem, tuple(getattr(self, f"p{i}") for i in range(self.count)), x)


def make(problem: str, theta: tuple[torch.Tensor, ...], data: tuple[torch.Tensor, ...], steps: int,
         cg_steps: int):
    del cg_steps  # unrolled
    lam, alpha = SPECS[problem].lam, SPECS[problem].alpha
    model = Net(problem, theta)
    meta = tuple(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=alpha)
    xs, ys, xq, yq = data
    tasks = xs.shape[0]
    def call():
        model.zero_grad(set_to_none=True)
        for i in range(tasks):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    loss = output_loss(problem, fmodel(xs[i]), ys[i]) + proximal(tuple(fmodel.parameters()), meta, lam)
                    diffopt.step(loss)
                (output_loss(problem, fmodel(xq[i]), yq[i]) / tasks).backward()
        return tuple(p.grad.detach().clone() for p in meta)

    return call
