"""What Python can read of a tensor now, beneath ``torch.func``'s wrappers.

Shared by the solvers' early exits and results and by the core's failure policy:
under ``torch.func.vmap`` a tensor's values are hidden from Python but readable
beneath the wrappers (the whole batch at once); while ``torch.compile`` traces or
a CUDA graph is captured no values exist at all.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["is_capturing", "is_vmapped", "physical", "values_hidden", "values_unreadable"]


def is_vmapped(t: Tensor) -> bool:
    """True when ``t`` is (or wraps) a ``torch.func.vmap`` BatchedTensor.

    Peels functorch wrappers (GradTrackingTensor from ``torch.func.grad``/``vjp``,
    BatchedTensor from ``vmap``) one level at a time. Inside ``vmap`` a tensor's
    values are not available to Python, so data-dependent host checks must be
    skipped.
    """
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def is_capturing(t: Tensor) -> bool:
    """True while ``t``'s CUDA stream records a CUDA graph (values exist only at replay)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def values_unreadable(t: Tensor) -> bool:
    """True when no values stand behind ``t`` at all, beneath any ``torch.func`` wrapper:
    while ``torch.compile`` traces, during CUDA-graph capture, or for a fake or meta
    tensor. Unlike under ``vmap``, no host decision is possible then."""
    if torch.compiler.is_compiling() or is_capturing(t):
        return True
    t = physical(t)
    return t.device.type == "meta" or isinstance(t, FakeTensor)


def values_hidden(t: Tensor) -> bool:
    """True when Python cannot read ``t``'s values now: under ``vmap``, during CUDA-graph
    capture or while ``torch.compile`` traces. Host-side decisions (early exits, failure
    checks) must then be skipped or deferred."""
    return torch.compiler.is_compiling() or is_vmapped(t) or is_capturing(t)


def physical(t: Tensor) -> Tensor:
    """The plain tensor under every ``torch.func`` wrapper of ``t``: under ``vmap`` it holds
    the values of the whole batch (the batch as one more dimension)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t
