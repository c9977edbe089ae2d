"""Functional networks of the iMAML experiments: parameters are dicts of tensors.

Written as plain functions of ``(params, x)`` so that ``torch.func`` transforms
(``grad``, ``vjp``, ``vmap`` over tasks) apply directly; no ``nn.Module`` state.

- :func:`mlp_forward`: the sinusoid regressor of MAML (Finn et al., ICML 2017),
  1-40-40-1 with ReLU.
- :func:`conv4_forward`: the Omniglot classifier of MAML and iMAML: four blocks of
  3x3 convolution with 64 filters and stride 2 (padding 1), batch normalization
  with the statistics of the current batch (no running averages: each task
  normalizes with its own batch, also at test time, as in MAML), ReLU; then the
  spatial mean and a linear head. 28x28 inputs shrink to 14, 7, 4, 2.

Both take the nonlinearity as a setting (:data:`ACTIVATIONS`, :func:`forward_with`):
ReLU, as the papers, or a smooth one (SiLU, softplus). With ReLU the proximal inner
objective is not differentiable at the kinks where its minimizers sit, so no inner
solver reaches a small gradient there and the implicit function theorem's premise
fails; with a smooth activation the inner problem is solvable (docs/imaml.md).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "Params", "conv4_forward", "conv4_init", "forward_with", "mlp_forward", "mlp_init",
           "num_params"]

Params = dict[str, Tensor]

BN_EPS = 1e-5

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "silu": F.silu, "softplus": F.softplus}
"""The networks' nonlinearities by name: ReLU (the papers'), and the smooth SiLU and softplus."""


def num_params(params: Params) -> int:
    """Total number of scalars in ``params``."""
    return sum(p.numel() for p in params.values())


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def mlp_init(hidden: int = 40, *, generator: torch.Generator | None = None) -> Params:
    """Parameters of the 1-``hidden``-``hidden``-1 MLP (PyTorch's default uniform init)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate([(1, hidden), (hidden, hidden), (hidden, 1)]):
        bound = 1 / math.sqrt(fan_in)
        params[f"fc{i}.weight"] = _uniform((fan_out, fan_in), bound, g)
        params[f"fc{i}.bias"] = _uniform((fan_out,), bound, g)
    return params


def mlp_forward(params: Params, x: Tensor, activation: str = "relu") -> Tensor:
    """``x`` of shape ``(n, 1)`` to predictions ``(n, 1)``."""
    act = ACTIVATIONS[activation]
    h = act(F.linear(x, params["fc0.weight"], params["fc0.bias"]))
    h = act(F.linear(h, params["fc1.weight"], params["fc1.bias"]))
    return F.linear(h, params["fc2.weight"], params["fc2.bias"])


def conv4_init(ways: int, channels: int = 64, in_channels: int = 1, *,
               generator: torch.Generator | None = None) -> Params:
    """Parameters of the four-block convolutional classifier with ``ways`` outputs.

    Convolutions and the head use He (Kaiming) uniform init with zero biases;
    batch-norm scales start at 1 and shifts at 0.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    params: Params = {}
    c_in = in_channels
    for i in range(4):
        bound = math.sqrt(6 / (c_in * 9))
        params[f"conv{i}.weight"] = _uniform((channels, c_in, 3, 3), bound, g)
        params[f"conv{i}.bias"] = torch.zeros(channels)
        params[f"bn{i}.weight"] = torch.ones(channels)
        params[f"bn{i}.bias"] = torch.zeros(channels)
        c_in = channels
    params["head.weight"] = _uniform((ways, channels), math.sqrt(6 / channels), g)
    params["head.bias"] = torch.zeros(ways)
    return params


def _batch_norm(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Normalize each channel with the mean and (biased) variance of this batch."""
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    h = (h - mean) * torch.rsqrt(var + BN_EPS)
    return h * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def conv4_forward(params: Params, x: Tensor, activation: str = "relu") -> Tensor:
    """Images ``(n, c, 28, 28)`` to logits ``(n, ways)``."""
    act = ACTIVATIONS[activation]
    h = x
    for i in range(4):
        h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride=2, padding=1)
        h = act(_batch_norm(h, params[f"bn{i}.weight"], params[f"bn{i}.bias"]))
    return F.linear(h.mean(dim=(2, 3)), params["head.weight"], params["head.bias"])


def forward_with(forward: Callable[..., Tensor], activation: str) -> Callable[[Params, Tensor], Tensor]:
    """``forward(params, x)`` of :func:`mlp_forward` or :func:`conv4_forward` with ``activation``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return forward if activation == "relu" else functools.partial(forward, activation=activation)
