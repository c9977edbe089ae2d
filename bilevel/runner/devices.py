"""Turn a ``--device`` setting into a ``torch.device`` that exists on this machine."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """The named device, checked to exist; ``None``: cuda when available, else cpu.

    Raises ``ValueError`` naming the setting and the fix for a string that is not a
    torch device, a CUDA device on a machine (or torch build) without CUDA, and a
    CUDA index beyond the devices present.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device ({err}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this torch build or machine has no usable CUDA device "
                             f"(torch.cuda.is_available() is False); use device 'cpu' (--device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) present, numbered from 0")
    return device
