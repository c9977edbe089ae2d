"""The two iMAML benchmark problems, drawn with numpy so every framework sees the same numbers.

Each task ``i`` has an inner problem (Rajeswaran et al., NeurIPS 2019)::

    phi_i(theta) = argmin_phi  L_train_i(phi) + lam/2 ||phi - theta||^2

solved by ``K`` gradient steps of size ``alpha`` from ``theta``; the meta-gradient is
``mean_i (I + H_i/lam)^{-1} grad L_test_i(phi_i)`` (implicit) or reverse mode through
the ``K`` steps (unrolled MAML).

* ``sinusoid``: MLP 1-40-40-1 with tanh, MSE; 10 support / 10 query points per
  task, amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]; lam = 1, alpha = 0.01;
  weights N(0, 1/fan_in), zero biases; 1,761 parameters. **Ill-posed**: ``H + lam I``
  is indefinite at ``phi_K`` (smallest eigenvalue -9.3 to -2.1 over the 4 tasks of
  seed 0 at K = 5, -1.5 to -0.3 at K = 80), so CG meets negative curvature.
* ``sinusoid-pd``: the same network and tasks with lam = 20: **well-posed**, ``H + lam I``
  positive definite at ``phi_K`` (eigenvalues 10.9 to 81.9 at K = 5, 11.6 to 87.9 at
  K = 80, seed 0), and the inner gradient steps converge.
* ``conv``: 4 x [conv3x3(64, padding 1) - SiLU - avgpool2] + linear(64 -> 5), He
  init N(0, 2/fan_in), zero biases, no batch norm; 28x28x1 binary images, 5-way
  1-shot support, 5 queries per class (each class a random binary prototype with
  10 % of its pixels flipped per image); lam = 2, alpha = 0.05; 111,749 parameters.

Everything here is numpy (float64 draws) plus torch model code; the JAX peer has
its own copy of the two forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Spec:
    """Constants of one benchmark problem."""

    name: str
    lam: float
    alpha: float
    loss: str  # "mse" or "cross_entropy"
    net: str  # "mlp" or "conv"
    well_posed: bool  # H + lam I positive definite at phi_K (measured for the seed-0 tasks)


SPECS = {
    "sinusoid": Spec("sinusoid", lam=1.0, alpha=0.01, loss="mse", net="mlp", well_posed=False),
    "sinusoid-pd": Spec("sinusoid-pd", lam=20.0, alpha=0.01, loss="mse", net="mlp", well_posed=True),
    "conv": Spec("conv", lam=2.0, alpha=0.05, loss="cross_entropy", net="conv", well_posed=True),
}

WAYS, SHOTS, QUERIES, IMAGE = 5, 1, 5, 28
CHANNELS = 64


def _net(problem: str) -> str:
    spec = SPECS.get(problem)
    return spec.net if spec is not None else problem


def param_shapes(problem: str) -> list[tuple[int, ...]]:
    """Shapes of the parameter tuple, in the order the forward passes read them."""
    if _net(problem) == "mlp":
        return [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    if _net(problem) == "conv":
        shapes: list[tuple[int, ...]] = []
        cin = 1
        for _ in range(4):
            shapes += [(CHANNELS, cin, 3, 3), (CHANNELS,)]
            cin = CHANNELS
        return shapes + [(WAYS, CHANNELS), (WAYS,)]
    raise ValueError(f"unknown problem {problem!r}: choose one of {sorted(SPECS)}")


def init_params(problem: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Initial meta-parameters ``theta`` (float64 numpy arrays)."""
    gain = 1.0 if _net(problem) == "mlp" else 2.0
    out = []
    for shape in param_shapes(problem):
        if len(shape) == 1:
            out.append(np.zeros(shape))
        else:
            fan_in = int(np.prod(shape[1:]))
            out.append(rng.normal(0.0, np.sqrt(gain / fan_in), size=shape))
    return out


def sample_tasks(problem: str, tasks: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``(x_support, y_support, x_query, y_query)``, each stacked over ``tasks``."""
    if _net(problem) == "mlp":
        amp = rng.uniform(0.1, 5.0, size=(tasks, 1, 1))
        phase = rng.uniform(0.0, np.pi, size=(tasks, 1, 1))
        xs = rng.uniform(-5.0, 5.0, size=(tasks, 10, 1))
        xq = rng.uniform(-5.0, 5.0, size=(tasks, 10, 1))
        return xs, amp * np.sin(xs - phase), xq, amp * np.sin(xq - phase)
    if _net(problem) == "conv":
        protos = rng.random((tasks, WAYS, 1, IMAGE, IMAGE)) < 0.5

        def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
            flips = rng.random((tasks, WAYS, per_class, 1, IMAGE, IMAGE)) < 0.1
            images = np.logical_xor(protos[:, :, None], flips).astype(np.float64)
            labels = np.broadcast_to(np.arange(WAYS)[None, :, None], (tasks, WAYS, per_class))
            return (images.reshape(tasks, WAYS * per_class, 1, IMAGE, IMAGE),
                    labels.reshape(tasks, WAYS * per_class).copy())

        xs, ys = draw(SHOTS)
        xq, yq = draw(QUERIES)
        return xs, ys, xq, yq
    raise ValueError(f"unknown problem {problem!r}: choose one of {sorted(SPECS)}")


def make_problem_data(problem: str, tasks: int, seed: int = 0):
    """``(theta, data)`` as float64 numpy: parameters first, then the tasks, from one generator."""
    rng = np.random.default_rng(seed)
    theta = init_params(problem, rng)
    return theta, sample_tasks(problem, tasks, rng)


def to_torch(theta, data, dtype: torch.dtype, device: str | torch.device):
    """Numpy problem to torch: parameters as a tuple, labels as int64."""
    params = tuple(torch.as_tensor(p, dtype=dtype, device=device) for p in theta)
    tensors = tuple(torch.as_tensor(a, device=device,
                                     dtype=torch.int64 if a.dtype.kind == "i" else dtype) for a in data)
    return params, tensors


def forward(problem: str, params: tuple[Tensor, ...], x: Tensor) -> Tensor:
    """The network; ``x`` is ``(points, 1)`` (sinusoid) or ``(images, 1, 28, 28)`` (conv)."""
    if _net(problem) == "mlp":
        w1, b1, w2, b2, w3, b3 = params
        h = torch.tanh(F.linear(x, w1, b1))
        h = torch.tanh(F.linear(h, w2, b2))
        return F.linear(h, w3, b3)
    h = x
    for i in range(4):
        h = F.avg_pool2d(F.silu(F.conv2d(h, params[2 * i], params[2 * i + 1], padding=1)), 2)
    return F.linear(h.flatten(1), params[8], params[9])


def output_loss(problem: str, out: Tensor, y: Tensor) -> Tensor:
    """MSE (sinusoid) or cross-entropy (conv) of the network's output."""
    if SPECS[problem].loss == "mse":
        return ((out - y) ** 2).mean()
    return F.cross_entropy(out, y)


def task_loss(problem: str, params: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
    """Loss of one task's batch under parameters ``params``."""
    return output_loss(problem, forward(problem, params, x), y)


def proximal(params: tuple[Tensor, ...], theta: tuple[Tensor, ...], lam: float) -> Tensor:
    """``lam/2 ||phi - theta||^2``."""
    return 0.5 * lam * sum(((p - t) ** 2).sum() for p, t in zip(params, theta))


def flat(tree) -> np.ndarray:
    """Concatenate a tuple of tensors or arrays into one float64 numpy vector."""
    return np.concatenate([np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t,
                                      dtype=np.float64).ravel() for t in tree])
