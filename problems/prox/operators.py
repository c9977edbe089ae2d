"""Circular convolutions in the Fourier domain, filter banks, and the Huber function with its prox.

Every linear operator of the restoration problem is a circular convolution of an
``H x W`` image, so it is diagonal in the 2-D discrete Fourier basis: applying
it, its adjoint and the inverses that proximal gradient and ADMM need are
elementwise products of ``rfft2`` coefficients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FILTER_BANKS", "analysis", "convolve", "filter_bank", "gaussian_kernel", "huber", "huber_grad",
           "huber_prox", "synthesis", "transfer"]

FILTER_BANKS = ("fd", "tv")
"""``tv``: first differences (d/dx, d/dy); ``fd``: those and the second differences (dxx, dyy, dxy)."""


def gaussian_kernel(sigma: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalized ``(2r+1) x (2r+1)`` Gaussian blur with ``r = ceil(3 sigma)``; ``sigma = 0``: the identity."""
    radius = math.ceil(3 * sigma)
    if radius == 0:
        return torch.ones(1, 1, dtype=dtype)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = g[:, None] * g[None, :]
    return (kernel / kernel.sum()).to(dtype)


def filter_bank(name: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Finite-difference filters ``(J, 3, 3)`` centred at the middle pixel (see :data:`FILTER_BANKS`)."""
    if name not in FILTER_BANKS:
        raise ValueError(f"filter bank must be one of {FILTER_BANKS}, got {name!r}")
    z = torch.zeros(3, 3, dtype=torch.float64)
    dx, dy, dxx, dyy, dxy = (z.clone() for _ in range(5))
    dx[1, 1], dx[1, 2] = -1.0, 1.0
    dy[1, 1], dy[2, 1] = -1.0, 1.0
    dxx[1, 0], dxx[1, 1], dxx[1, 2] = 1.0, -2.0, 1.0
    dyy[0, 1], dyy[1, 1], dyy[2, 1] = 1.0, -2.0, 1.0
    dxy[1, 1], dxy[1, 2], dxy[2, 1], dxy[2, 2] = 1.0, -1.0, -1.0, 1.0
    bank = [dx, dy] if name == "tv" else [dx, dy, dxx, dyy, dxy]
    return torch.stack(bank).to(dtype)


def transfer(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """``rfft2`` of ``kernel (..., k1, k2)`` placed circularly on an ``H x W`` grid, centred at pixel (0, 0)."""
    k1, k2 = kernel.shape[-2:]
    height, width = shape
    padded = F.pad(kernel, (0, width - k2, 0, height - k1))
    return torch.fft.rfft2(torch.roll(padded, shifts=(-(k1 // 2), -(k2 // 2)), dims=(-2, -1)))


def convolve(x: Tensor, hat: Tensor, *, adjoint: bool = False) -> Tensor:
    """``k * x`` (or its adjoint, the correlation) for a transfer function ``hat = transfer(k, shape)``."""
    coefficients = torch.fft.rfft2(x) * (hat.conj() if adjoint else hat)
    return torch.fft.irfft2(coefficients, s=x.shape[-2:])


def analysis(x: Tensor, hats: Tensor) -> Tensor:
    """``D x``: images ``(B, H, W)`` to filter responses ``(B, J, H, W)`` for a bank ``hats (J, H, W')``."""
    return torch.fft.irfft2(torch.fft.rfft2(x).unsqueeze(-3) * hats, s=x.shape[-2:])


def synthesis(z: Tensor, hats: Tensor) -> Tensor:
    """``D^T z = sum_j d_j^T z_j``: responses ``(B, J, H, W)`` back to images ``(B, H, W)``."""
    return torch.fft.irfft2((torch.fft.rfft2(z) * hats.conj()).sum(-3), s=z.shape[-2:])


def huber(t: Tensor, eps: float) -> Tensor:
    """Huber's smoothed absolute value, the Moreau envelope of ``|t|``: ``t^2 / 2eps`` for ``|t| <= eps``,
    else ``|t| - eps/2`` (Huber, Ann. Math. Statist. 1964)."""
    a = t.abs()
    return torch.where(a <= eps, t * t / (2 * eps), a - eps / 2)


def huber_grad(t: Tensor, eps: float) -> Tensor:
    """``huber'(t) = clip(t / eps, -1, 1)``, Lipschitz with constant ``1/eps``."""
    return torch.clamp(t / eps, -1.0, 1.0)


def huber_prox(v: Tensor, lam: Tensor, eps: float) -> Tensor:
    """``argmin_t lam huber(t) + (t - v)^2 / 2``: ``v eps / (eps + lam)`` for ``|v| <= eps + lam``, else
    ``v - lam sign(v)`` (soft thresholding outside the quadratic zone)."""
    return torch.where(v.abs() <= eps + lam, v * (eps / (eps + lam)), v - lam * torch.sign(v))
