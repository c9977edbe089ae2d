"""Preconditioners: callables applying ``M ~ A^{-1}`` to a tensor shaped like ``b``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _base as B
from ._base import MatVec, Preconditioner


def jacobi(diagonal: Tensor) -> Preconditioner:
    """Jacobi (diagonal) preconditioner ``M = diag(A)^{-1}``.

    ``diagonal`` has shape ``(n,)`` or ``(*batch, n)`` (broadcast against the
    vectors it is applied to). Entries that are zero, non-finite or tiny
    (``<= eps * max|d|`` over the finite entries) are treated as 1 so that ``M``
    stays finite; negative entries keep their sign (use it with CG only when the
    diagonal is positive).
    """
    if not isinstance(diagonal, Tensor) or not diagonal.is_floating_point():
        raise TypeError("diagonal must be a real floating tensor")
    if diagonal.dim() < 1:
        raise ValueError("diagonal must have shape (n,) or (batch, n)")
    magnitude = torch.where(torch.isfinite(diagonal), diagonal.abs(), torch.zeros_like(diagonal))
    scale = magnitude.amax(-1, keepdim=True)
    usable = torch.isfinite(diagonal) & (magnitude > B.machine_eps(diagonal.dtype) * scale)
    inverse = 1 / torch.where(usable, diagonal, torch.ones_like(diagonal))

    def apply(v: Tensor) -> Tensor:
        return inverse * v

    return apply


def hutchinson_diagonal(matvec: MatVec, like: Tensor, num_samples: int = 64,
                        generator: torch.Generator | None = None) -> Tensor:
    """Estimate ``diag(A)`` matrix-free from Rademacher probes.

    For ``z`` with independent ``+-1`` entries, ``E[z * (A z)] = diag(A)``
    (Bekas, Kokiopoulou & Saad, 2007): the off-diagonal terms
    ``A_ij z_i z_j`` average out. The error of the mean of ``num_samples``
    products shrinks like ``1 / sqrt(num_samples)`` and is driven by the size of
    the off-diagonal entries; a diagonal ``A`` is recovered exactly from one probe.

    Args:
        matvec: applies ``A`` to a tensor shaped like ``like``.
        like: a tensor with the shape, dtype and device of ``b``.
        num_samples: number of probes (matvecs).
        generator: random generator for reproducible probes (on ``like``'s device).

    Returns:
        The estimated diagonal, shaped like ``like``.
    """
    B.check_count("num_samples", num_samples, allow_none=False)
    if not isinstance(like, Tensor) or not like.is_floating_point():
        raise TypeError("like must be a real floating tensor shaped like b")
    total = torch.zeros_like(like)
    for _ in range(num_samples):
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        z = (2 * bits - 1).to(like.dtype)
        total = total + z * matvec(z)
    return total / num_samples
