"""Omniglot (Lake et al., Science 2015): archives, validation, decoding, cache.

The loader reads the official archives ``images_background.zip`` (964
characters) and ``images_evaluation.zip`` (659 characters), 20 drawings each,
from the data directory (:func:`bilevel.datadir.resolve_data_dir`: ``data_dir``,
``$BILEVEL_DATA_DIR``, the nearest ``shared/data``, ``~/.cache/bilevel/data``;
an ``omniglot/`` subfolder is used when present) and
downloads them from the official repository when they are absent.

Archives are validated by their *content digest*: the sha256 of the sorted lines
``<member path>\\t<sha256 of the member's bytes>\\n`` over every ``.png`` member.
The official zips and faithful re-packings of them share it; anything else is
rejected. Decoded 28x28 images (strokes bright, background 0, uint8) are cached
in ``cache_dir`` (else ``$BILEVEL_CACHE_DIR``, else ``~/.cache/bilevel``) under a
name derived from the digests, so a second run starts in seconds.

Also reads ``all_runs.zip``: the 20 official 20-way one-shot runs.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bilevel.datadir import resolve_data_dir
from bilevel.problems.datafiles import ARCHIVE_ERRORS

__all__ = ["ARCHIVES", "OmniglotError", "Omniglot", "OfficialRun", "content_digest", "data_directory",
           "cache_directory", "locate_archive", "load_omniglot", "load_official_runs", "IMAGE_SIZE", "SPLITS"]

IMAGE_SIZE = 28
OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
ARCHIVES = {  # name -> (content digest, path under OFFICIAL_URL)
    "images_background.zip": ("75288906d655255988a488b7e81923d9c2194356d17b82642d9c51b19bd58594",
                              "images_background.zip"),
    "images_evaluation.zip": ("8e90acd002099b58eaaf049e5d5d404f36553a151330c05a2c9c30cde54f4d42",
                              "images_evaluation.zip"),
    "all_runs.zip": ("395879e973fc6f32ad1a4762d3905d461e020a6d08c7b71408b0ece6c897e411",
                     "one-shot-classification/all_runs.zip"),
}
DRAWERS = 20
SPLITS = ("official-runs", "random")
# The evaluation alphabets that the 20 official one-shot runs draw from (checked against
# all_runs.zip by pixel identity); Omniglot.split keeps them out of meta-training.
OFFICIAL_RUN_ALPHABETS = frozenset({
    "Atlantean", "Ge_ez", "Glagolitic", "Gurmukhi", "Kannada", "Malayalam", "Manipuri",
    "Old_Church_Slavonic_(Cyrillic)", "Tengwar", "Tibetan"})


class OmniglotError(OSError):
    """A missing, corrupt or unexpected Omniglot archive."""


def data_directory(data_dir: str | os.PathLike | None = None) -> Path:
    """Where the archives live: the data directory (:func:`bilevel.datadir.resolve_data_dir`),
    its ``omniglot/`` subfolder when there is one."""
    root = resolve_data_dir(data_dir)
    return root / "omniglot" if (root / "omniglot").is_dir() else root


def cache_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where decoded arrays are cached: ``cache_dir``, ``$BILEVEL_CACHE_DIR`` or ``~/.cache/bilevel``."""
    return Path(cache_dir or os.environ.get("BILEVEL_CACHE_DIR") or Path.home() / ".cache" / "bilevel").expanduser()


def content_digest(path: Path) -> str:
    """sha256 over the sorted ``<member>\\t<sha256(member bytes)>\\n`` lines of the ``.png`` members."""
    try:
        with zipfile.ZipFile(path) as archive:
            lines = sorted(f"{name}\t{hashlib.sha256(archive.read(name)).hexdigest()}\n"
                           for name in archive.namelist() if name.endswith(".png"))
    except ARCHIVE_ERRORS as err:  # a damaged archive fails here, before any image is decoded
        raise OmniglotError(f"{path} is not a readable zip archive ({type(err).__name__}: {err}); delete it and "
                            f"copy it again, or download it again from {OFFICIAL_URL}") from err
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _download(name: str, dest: Path) -> None:
    url = OFFICIAL_URL + ARCHIVES[name][1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def locate_archive(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Path of a validated archive ``name`` (a key of :data:`ARCHIVES`), downloading it if absent.

    Raises :class:`OmniglotError` when it is missing (and cannot be downloaded) or
    when its content digest is not the official one.
    """
    if name not in ARCHIVES:
        raise OmniglotError(f"unknown Omniglot archive {name!r}; expected one of {sorted(ARCHIVES)}")
    directory = data_directory(data_dir)
    path = directory / name
    url = OFFICIAL_URL + ARCHIVES[name][1]
    if not path.is_file():
        reason = "download disabled"
        if download:
            try:
                _download(name, path)
            except OSError as err:
                reason = f"download from {url} failed: {err}"
        if not path.is_file():
            raise OmniglotError(
                f"Omniglot archive {name} not found in {directory} ({reason}). Download {url} and put "
                f"it in {directory}, or point --data-dir / BILEVEL_DATA_DIR at the folder that holds it")
    expected = ARCHIVES[name][0]
    digest = content_digest(path)
    if digest != expected:
        raise OmniglotError(
            f"{path} has content digest {digest}, expected {expected} (the official {name}): the archive "
            f"is corrupt or not the official one. Replace it with {url}")
    return path


def _decode(png: bytes) -> np.ndarray:
    """105x105 binary drawing -> 28x28 uint8 with strokes bright (antialiased resize)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    return 255 - np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True)
class Omniglot:
    """Decoded Omniglot.

    Attributes:
        images: uint8 array ``(1623, 20, 28, 28)``: character, drawer, pixels; the 964
            background characters first, then the 659 evaluation ones, each in sorted
            ``<alphabet>/characterNN`` order.
        characters: ``"<set>/<alphabet>/characterNN"`` for each row of ``images``.
    """

    images: np.ndarray
    characters: tuple[str, ...]

    def split(self, n_train: int = 1200, *, scheme: str = "official-runs",
              seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``n_train`` characters for meta-training, the rest for meta-testing.

        ``scheme="official-runs"`` (the default) takes characters in order, except
        that the ten alphabets of the official one-shot runs come last: with 1200
        for training (all 964 background characters and 236 evaluation ones), the
        423 test characters hold those ten alphabets (382 characters, never seen in
        meta-training, so evaluation on the official runs is fair) and 41 more.

        ``scheme="random"`` takes a ``seed``-ed random permutation of all 1623
        characters, the convention of the MAML and iMAML papers' code: test
        characters then come from alphabets also seen in meta-training (an easier
        test), and the official runs overlap the training classes.
        """
        if not 0 < n_train < len(self.images):
            raise ValueError(f"n_train must be in 1..{len(self.images) - 1}, got {n_train}")
        if scheme == "official-runs":
            in_runs = np.array([name.split("/")[1] in OFFICIAL_RUN_ALPHABETS for name in self.characters])
            order = np.concatenate([np.flatnonzero(~in_runs), np.flatnonzero(in_runs)])
        elif scheme == "random":
            order = np.random.default_rng(seed).permutation(len(self.images))
        else:
            raise ValueError(f"scheme must be one of {SPLITS}, got {scheme!r}")
        return self.images[order[:n_train]], self.images[order[n_train:]]


def _decode_archive(path: Path) -> tuple[np.ndarray, list[str]]:
    groups: dict[str, list[str]] = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(".png"):
                groups.setdefault(name.rsplit("/", 1)[0], []).append(name)
        keys = sorted(groups)
        images = np.empty((len(keys), DRAWERS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        for i, key in enumerate(keys):
            members = sorted(groups[key])
            if len(members) != DRAWERS:
                raise OmniglotError(f"{path}: {key} has {len(members)} drawings, expected {DRAWERS}")
            for j, member in enumerate(members):
                images[i, j] = _decode(archive.read(member))
    return images, keys


def load_omniglot(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                  *, download: bool = True) -> Omniglot:
    """Validate the two archives and return the decoded images, from the cache when possible."""
    paths = [locate_archive(name, data_dir, download=download)
             for name in ("images_background.zip", "images_evaluation.zip")]
    tag = "-".join(ARCHIVES[p.name][0][:16] for p in paths)
    cache = cache_directory(cache_dir) / f"omniglot{IMAGE_SIZE}-{tag}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return Omniglot(stored["images"], tuple(stored["characters"].tolist()))
    parts = [_decode_archive(p) for p in paths]
    images = np.concatenate([images for images, _ in parts])
    characters = tuple(key for _, keys in parts for key in keys)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as out:
        np.savez(out, images=images, characters=np.array(characters))
    os.replace(tmp, cache)
    return Omniglot(images, characters)


@dataclass(frozen=True)
class OfficialRun:
    """One of the 20 official 20-way one-shot runs: ``support`` ``(20, 28, 28)`` (one drawing
    per class), ``query`` ``(20, 28, 28)``, ``labels`` ``(20,)`` the class of each query."""

    support: np.ndarray
    query: np.ndarray
    labels: np.ndarray


def load_official_runs(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> list[OfficialRun]:
    """The 20 runs of ``all_runs.zip`` (Lake et al. 2015), decoded like the training images."""
    path = locate_archive("all_runs.zip", data_dir, download=download)
    runs = []
    with zipfile.ZipFile(path) as archive:
        for r in range(1, 21):
            prefix = f"run{r:02d}/"
            pairs = [line.split() for line in archive.read(prefix + "class_labels.txt").decode().splitlines()
                     if line.strip()]
            classes = sorted(n for n in archive.namelist() if n.startswith(prefix + "training/") and
                             n.endswith(".png"))
            index = {name: i for i, name in enumerate(classes)}
            support = np.stack([_decode(archive.read(n)) for n in classes])
            query = np.stack([_decode(archive.read(item)) for item, _ in pairs])
            labels = np.array([index[cls] for _, cls in pairs], dtype=np.int64)
            runs.append(OfficialRun(support, query, labels))
    return runs
