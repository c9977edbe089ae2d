"""MNIST loader: sha256 of the decompressed content, clear errors, download from mirrors.

The download path is exercised offline with ``file://`` mirrors.
"""

from __future__ import annotations

import gzip
import shutil
import struct

from pathlib import Path

import pytest
import torch

from bilevel.problems.hyperparameter.mnist import (MNIST_FILES, data_root, download_mnist, load_mnist, mnist_dir,
                                                   read_idx)


def test_load_mnist_matches_the_published_statistics(shared_data):
    mnist = load_mnist(shared_data)
    assert mnist.train_images.shape == (60_000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10_000, 28, 28)
    assert torch.bincount(mnist.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                                           5949]
    assert torch.bincount(mnist.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    pixels = mnist.train_images.double() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=1e-4)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BILEVEL_DATA_DIR", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    assert mnist_dir() == tmp_path / "env" / "mnist"
    monkeypatch.delenv("BILEVEL_DATA_DIR")
    root = tmp_path.anchor  # the temporary folder may lie below a shared/data; the root has none
    assert not (Path(root) / "shared" / "data").is_dir()
    monkeypatch.chdir(root)
    assert data_root().parts[-3:] == (".cache", "bilevel", "data")


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_mnist(tmp_path)


def _write_idx(path, values: bytes, dims: tuple[int, ...]) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + values)


def test_read_idx_parses_the_header_and_checks_the_digest(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, bytes(range(6)), (2, 3))
    assert read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="sha256"):
        read_idx(path, MNIST_FILES["train_labels"][1])
    _write_idx(path, bytes(range(5)), (2, 3))
    with pytest.raises(ValueError, match="holds 5 values"):
        read_idx(path)
    path.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable gzip"):
        read_idx(path)


def test_a_corrupted_file_is_rejected_at_load(tmp_path, shared_data):
    folder = tmp_path / "mnist"
    shutil.copytree(shared_data / "mnist", folder)
    _write_idx(folder / MNIST_FILES["test_labels"][0], bytes(10), (10,))
    with pytest.raises(ValueError, match="t10k-labels.*sha256"):
        load_mnist(tmp_path)


def test_download_from_a_mirror_checks_and_places_every_file(tmp_path, shared_data):
    mirror = (shared_data / "mnist").as_uri() + "/"
    folder = download_mnist(tmp_path, mirrors=("file:///nonexistent-mirror/", mirror))
    assert sorted(p.name for p in folder.iterdir()) == sorted(name for name, _ in MNIST_FILES.values())
    assert load_mnist(tmp_path).test_labels.shape == (10_000,)


def test_download_fails_loudly_and_leaves_nothing_behind(tmp_path):
    bad_mirror = tmp_path / "bad"
    bad_mirror.mkdir()
    for name, _ in MNIST_FILES.values():
        _write_idx(bad_mirror / name, bytes(4), (4,))
    target = tmp_path / "data"
    with pytest.raises(RuntimeError, match="(?s)could not download train-images.*sha256.*by hand"):
        download_mnist(target, mirrors=("file:///nonexistent-mirror/", bad_mirror.as_uri()))
    assert list((target / "mnist").iterdir()) == []
