"""Resident memory of this process, read from ``/proc/self/status`` (Linux)."""

from __future__ import annotations

from pathlib import Path


def status_mib(field: str) -> float:
    """``field`` of ``/proc/self/status`` in MiB: ``"VmRSS"`` (resident now) or ``"VmHWM"``
    (peak of this address space; unlike ``getrusage``'s ``ru_maxrss``, it does not
    carry over a parent's peak through fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: these memory figures need Linux")
