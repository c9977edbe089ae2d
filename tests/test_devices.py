"""``--device`` settings: the named device when it exists, else an error that names the fix."""

from __future__ import annotations

import pytest
import torch

from bilevel.devices import resolve_device


def test_named_and_default_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_devices_that_do_not_exist_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="'gpu0' is not a torch device.*use cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any GPU on a CPU-only machine
    with pytest.raises(ValueError, match="no usable CUDA device|CUDA device\\(s\\) present"):
        resolve_device(missing)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use device 'cpu'"):
            resolve_device("cuda")
