"""MNIST (LeCun, Cortes & Burges) from the standard ``*-idx?-ubyte.gz`` files.

The four files are read from ``<data dir>/mnist/`` (or from the folder itself
when it holds them directly), where the data dir follows the library's rule
(:func:`bilevel.runner.datadir.resolve_data_dir`: ``data_dir``, ``$BILEVEL_DATA_DIR``,
the nearest ``shared/data``, ``~/.cache/bilevel/data``).
Each file is checked by the sha256 of its *decompressed* content, so the
original downloads and re-compressed copies are accepted alike, and nothing
else is. ``download=True`` fetches missing files from the public mirrors.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bilevel.runner.datadir import resolve_data_dir
from bilevel.problems.datafiles import ARCHIVE_ERRORS

__all__ = ["MNIST", "MNIST_FILES", "MIRRORS", "data_root", "mnist_dir", "load_mnist", "download_mnist",
           "read_idx"]

MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte.gz",
                     "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": ("train-labels-idx1-ubyte.gz",
                     "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": ("t10k-images-idx3-ubyte.gz",
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz",
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
"""Key -> (file name, sha256 of the decompressed idx content)."""

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
"""Base URLs tried in order by :func:`download_mnist`."""

_IDX_DTYPE = {0x08: np.uint8}


class MNIST(NamedTuple):
    """The 60,000 training and 10,000 test digits: uint8 images ``(n, 28, 28)``, int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory, by :func:`bilevel.runner.datadir.resolve_data_dir`."""
    return resolve_data_dir(data_dir)


def mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the MNIST files: ``<root>/mnist``, or ``<root>`` itself when it holds them."""
    root = data_root(data_dir)
    if (root / MNIST_FILES["train_images"][0]).exists() and not (root / "mnist").is_dir():
        return root
    return root / "mnist"


def read_idx(path: Path, sha256: str | None = None) -> Tensor:
    """Read one gzip-compressed idx file (big-endian header: magic, then the dims; uint8 data).

    Raises ``ValueError`` when the decompressed content does not match ``sha256``
    or the header is malformed.
    """
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except ARCHIVE_ERRORS as err:
        raise ValueError(f"{path} is not a readable gzip file ({type(err).__name__}: {err}); delete it and "
                         "copy or download it again "
                         "(download=True, or --download on the command line)") from err
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise ValueError(f"{path}: sha256 of the decompressed content is {digest}, expected {sha256}; "
                             "the file is corrupt or not the MNIST file of that name: delete it and "
                             "download it again")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE:
        raise ValueError(f"{path} does not start with an idx header of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=_IDX_DTYPE[raw[2]], offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header announces shape {dims} but holds {data.size} values")
    return torch.from_numpy(data.reshape(dims).copy())


def download_mnist(data_dir: str | os.PathLike | None = None, *, mirrors: tuple[str, ...] = MIRRORS) -> Path:
    """Download the MNIST files missing from :func:`mnist_dir` (each checked by sha256).

    A file is written to a temporary name beside its destination and moved into
    place only once its content digest matches. Raises ``RuntimeError`` listing
    every mirror's error when a file cannot be fetched from any of them.
    """
    folder = mnist_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, sha256 in MNIST_FILES.values():
        target = folder / name
        if target.exists():
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=folder)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
                read_idx(Path(tmp), sha256)
                os.replace(tmp, target)
                break
            except (OSError, ValueError) as err:
                errors.append(f"{url}: {err}")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            lines = "\n  ".join(errors)
            raise RuntimeError(f"could not download {name} from any mirror:\n  {lines}\n"
                               f"download it by hand into {folder} (or point --data-dir / BILEVEL_DATA_DIR "
                               "at a folder that holds mnist/)")
    return folder


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> MNIST:
    """Load MNIST as uint8 image tensors and int64 label tensors, checking every file's sha256."""
    folder = mnist_dir(data_dir)
    missing = [name for name, _ in MNIST_FILES.values() if not (folder / name).exists()]
    if missing and download:
        download_mnist(data_dir)
    elif missing:
        raise FileNotFoundError(
            f"MNIST files {missing} not found in {folder}; pass the folder that holds mnist/ with "
            "--data-dir (or set BILEVEL_DATA_DIR), or allow a download with download=True (--download)")
    parts = {key: read_idx(folder / name, sha256) for key, (name, sha256) in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"MNIST {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             "do not match")
    return MNIST(parts["train_images"], parts["train_labels"].long(), parts["test_images"],
                 parts["test_labels"].long())
