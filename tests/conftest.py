"""Shared test configuration: hypothesis profiles and the path to the real data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from bilevel.datadir import DATA_DIR_ENV, resolve_data_dir

settings.register_profile(
    "default", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_leaked_global_torch_state():
    """A test (or the code it runs) must leave torch's global defaults as it found them."""
    dtype = torch.get_default_dtype()
    yield
    leaked = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    assert leaked == dtype, f"the default dtype was left at {leaked}; restore it"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Directory of the real data sets, by the library's rule (:func:`bilevel.datadir.resolve_data_dir`,
    looking for ``shared/data`` from the checkout), with ``BILEVEL_SHARED_DATA`` honored when
    ``BILEVEL_DATA_DIR`` is unset.

    The tests that use it fail, not skip, when it is missing: CI always has it.
    """
    legacy = os.environ.get("BILEVEL_SHARED_DATA") if not os.environ.get(DATA_DIR_ENV) else None
    path = resolve_data_dir(legacy, start=REPO_ROOT)
    if not path.is_dir():
        raise FileNotFoundError(
            f"real data sets not found at {path}; set {DATA_DIR_ENV} to the folder "
            "that holds omniglot/, mnist/, pdfm/ ...")
    return path
