"""Cast problem inputs to one floating dtype, for checks in float64."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from bilevel.problem import BilevelProblem

__all__ = ["cast", "double"]


def _leaf(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, Tensor) and x.is_floating_point():
        return x.detach().to(dtype)
    if isinstance(x, nn.Module):
        return copy.deepcopy(x).to(dtype)
    return x


def cast(obj: Any, dtype: torch.dtype) -> Any:
    """A copy of ``obj`` whose floating tensors are ``dtype``; everything else is unchanged.

    ``obj`` may be a tensor, a tuple/list/dict of them (nested), an ``nn.Module``
    (deep-copied), or a :class:`~bilevel.BilevelProblem`: then a shallow copy whose
    tensor, pytree and module attributes are cast, so that a problem that keeps
    its data on ``self`` is checked in the same precision as its inputs.
    Integer and boolean tensors (labels, masks) keep their dtype. The result is
    detached from any autograd graph.
    """
    if isinstance(obj, BilevelProblem) and not isinstance(obj, nn.Module):
        clone = copy.copy(obj)
        for name, value in vars(obj).items():
            setattr(clone, name, cast(value, dtype))
        return clone
    return pytree.tree_map(lambda x: _leaf(x, dtype), obj)


def double(obj: Any) -> Any:
    """``cast(obj, torch.float64)``: the precision :func:`check_hypergradient` uses by default."""
    return cast(obj, torch.float64)
