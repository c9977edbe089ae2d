"""One data-directory rule (bilevel.datadir) for every command, the examples and the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilevel.datadir import resolve_data_dir
from bilevel.problems.fair.data import data_dir as fair_data_dir
from bilevel.problems.hyperparameter.mnist import data_root
from bilevel.problems.imaml.omniglot import data_directory


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """``tmp/checkout/examples`` beside ``tmp/shared/data``; no environment override."""
    (tmp_path / "shared" / "data" / "omniglot").mkdir(parents=True)
    (tmp_path / "checkout" / "examples").mkdir(parents=True)
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path / "checkout")
    return tmp_path


def test_the_flag_comes_first(tree, monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tree / "env"))
    assert resolve_data_dir(tree / "flag") == tree / "flag"


def test_the_environment_comes_before_shared_data(tree, monkeypatch):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tree / "env"))
    assert resolve_data_dir() == tree / "env"


def test_shared_data_is_found_from_a_checkout_and_its_subfolders(tree, monkeypatch):
    assert resolve_data_dir() == tree / "shared" / "data"
    monkeypatch.chdir(tree / "checkout" / "examples")
    assert resolve_data_dir() == tree / "shared" / "data"
    assert resolve_data_dir(start=tree) == tree / "shared" / "data"


def test_the_cache_folder_last(tmp_path_factory, monkeypatch):
    bare = tmp_path_factory.mktemp("bare")
    monkeypatch.delenv("BILEVEL_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(bare / "home"))
    # Searched from the file-system root: the temporary folder may lie below a shared/data
    # (a checkout in /tmp with shared/ beside it).
    root = Path(bare.anchor)
    assert not (root / "shared" / "data").is_dir()
    assert resolve_data_dir(start=root) == bare / "home" / ".cache" / "bilevel" / "data"


def test_every_loader_follows_the_rule(tree):
    assert data_root() == tree / "shared" / "data"
    assert data_directory() == tree / "shared" / "data" / "omniglot"
    assert fair_data_dir() == tree / "shared" / "data"
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        fair_data_dir(tree / "missing")
