"""
A deep-equilibrium layer, differentiated implicitly
===================================================

A deep equilibrium model (Bai, Kolter & Koltun, NeurIPS 2019) replaces a stack
of layers by the fixed point ``z* = tanh(W z* + U x + b)`` of one layer. Its
gradient comes from the implicit function theorem at ``z*`` alone:
:func:`bilevel.implicit_fixed_point` wraps the forward iteration, which runs
without an autograd graph, and solves ``(I - d_z T)^T v = g`` with GMRES in the
backward pass. Memory stays that of one layer, whatever the number of forward
iterations.

Here the model learns ``y = sin(2x)`` from 64 noisy points.
"""

# %%
# The layer: a plain fixed-point iteration, made differentiable by the decorator.
import matplotlib.pyplot as plt
import torch

import bilevel


def cell(z: torch.Tensor, W: torch.Tensor, Ux: torch.Tensor) -> torch.Tensor:
    """One application of the layer, ``T(z) = tanh(z W^T + U x + b)`` for a batch of rows ``z``."""
    return torch.tanh(z @ W.T + Ux)


@bilevel.implicit_fixed_point(cell, solver=bilevel.solvers.GMRES(rtol=1e-6, restart=20, maxiter=100))
def equilibrium(W: torch.Tensor, Ux: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(Ux)
    for _ in range(40):  # a contraction: ||W||_2 <= 0.9 below
        z = cell(z, W, Ux)
    return z


# %%
# The model: input map, equilibrium, linear read-out; W rescaled so that the layer is a contraction.
torch.manual_seed(0)
hidden = 16
params = {
    "W": 0.3 * torch.randn(hidden, hidden, dtype=torch.float64) / hidden ** 0.5,
    "U": torch.randn(hidden, 1, dtype=torch.float64),
    "b": torch.zeros(hidden, dtype=torch.float64),
    "V": torch.randn(1, hidden, dtype=torch.float64) / hidden ** 0.5,
    "c": torch.zeros(1, dtype=torch.float64),
}
for p in params.values():
    p.requires_grad_()


def model(x: torch.Tensor) -> torch.Tensor:
    W = params["W"] * (0.9 / torch.linalg.matrix_norm(params["W"], 2).clamp(min=0.9))
    z = equilibrium(W, x @ params["U"].T + params["b"])
    return z @ params["V"].T + params["c"]


x = torch.linspace(-2, 2, 64, dtype=torch.float64).unsqueeze(1)
y = torch.sin(2 * x) + 0.05 * torch.randn_like(x)

# %%
# Training: an ordinary PyTorch loop; ``loss.backward()`` runs the implicit backward pass.
optimizer = torch.optim.Adam(params.values(), lr=0.02)
losses = []
for step in range(150):
    optimizer.zero_grad()
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"training loss: {losses[0]:.3f} -> {losses[-1]:.4f}")

fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
left.semilogy(losses)
left.set_xlabel("Adam step")
left.set_ylabel("mean squared error")
left.set_title("Training")
with torch.no_grad():
    fit = model(x)
right.scatter(x.squeeze(), y.squeeze(), s=4, color="gray", label="data")
right.plot(x.squeeze(), fit.squeeze(), color="C1", label="equilibrium model")
right.set_xlabel("x")
right.set_title("Fit")
right.legend()
fig.tight_layout()
plt.show()
