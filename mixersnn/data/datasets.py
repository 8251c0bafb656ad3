"""The embedded default data set (Fashion-MNIST shards) and downloads for machines online.

Fashion-MNIST needs no network here: Debian's ``dataset-fashion-mnist`` package puts the idx
files in :data:`~mixersnn.data.idx.FASHION_MNIST_DIR`, and :func:`default_shards` converts
them to shards once, under ``${MIXERSNN_DATA:-~/.cache/mixersnn/data}/fashion-mnist``.
Users with internet access can fetch the idx files instead with :func:`download_fashion_mnist`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Union

from mixersnn._atomic import atomic_path
from mixersnn.data.idx import FASHION_MNIST_DIR, read_idx
from mixersnn.data.manifest import ManifestError, read_manifest

__all__ = ["FASHION_MNIST_URL", "FASHION_MNIST_FILES", "data_root", "default_shards", "download_fashion_mnist"]

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""The canonical location of the idx files (Zalando Research's bucket)."""

FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (60000, 28, 28),
    "train-labels-idx1-ubyte.gz": (60000,),
    "t10k-images-idx3-ubyte.gz": (10000, 28, 28),
    "t10k-labels-idx1-ubyte.gz": (10000,),
}
"""File name -> the array shape it must hold (checked after download; mirrors recompress the
files, so their gzip bytes and hashes differ while the arrays do not)."""


def data_root(root: Union[str, Path, None] = None) -> Path:
    """``root``, else ``$MIXERSNN_DATA``, else ``~/.cache/mixersnn/data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MIXERSNN_DATA") or Path.home() / ".cache" / "mixersnn" / "data").expanduser()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so Ray workers on one node that all call
    :func:`default_shards` convert once and the others wait and reuse the result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, conversions are still atomic per file
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def default_shards(
    root: Union[str, Path, None] = None,
    *,
    source_dir: Union[str, Path, None] = None,
    workers: Optional[int] = None,
    progress: bool = False,
) -> Path:
    """Fashion-MNIST as shards, built on first use; returns the folder holding ``train/`` and ``test/``.

    Idempotent: a split whose manifest verifies (every shard present with its sha256) is reused;
    a missing, partial or damaged one is rebuilt from the idx files. The manifests say
    ``flip_safe: true`` (a mirrored garment keeps its class); a reused split whose manifest
    lacks the field gets it written, shards untouched.

    Args:
        root: data root (default ``$MIXERSNN_DATA`` or ``~/.cache/mixersnn/data``).
        source_dir: idx folder to convert (default :data:`FASHION_MNIST_DIR`).
        workers: conversion processes (default: all cores).
        progress: show a progress bar while converting.

    Raises:
        FileNotFoundError: the idx files are not there (install ``dataset-fashion-mnist`` or
            run :func:`download_fashion_mnist`).
    """
    from dataclasses import replace

    from mixersnn.data.converters import idx_sources, write_split
    from mixersnn.data.manifest import write_manifest

    out = data_root(root) / "fashion-mnist"
    src_dir = Path(source_dir) if source_dir is not None else FASHION_MNIST_DIR
    with _locked(out / ".lock"):
        todo = []
        for split in ("train", "test"):
            try:
                m = read_manifest(out / split, verify=True)
            except ManifestError:
                todo.append(split)
                continue
            if m.flip_safe is None:
                write_manifest(replace(m, flip_safe=True), out / split)
        if todo:
            for src in idx_sources(src_dir, dataset="fashion-mnist"):
                if src.split in todo:
                    write_split(src, out / src.split, workers=workers, progress=progress)
    return out


def download_fashion_mnist(
    dest: Union[str, Path],
    *,
    base_url: str = FASHION_MNIST_URL,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Fetch the four Fashion-MNIST idx files into ``dest`` (for machines with internet access).

    Each file is downloaded to a temp file, checked to hold the array shape it should
    (:data:`FASHION_MNIST_FILES`) and only then renamed into place; files already present and
    valid are kept unless ``force``.

    Args:
        dest: target folder (then usable as ``make_shards(dest, ...)`` or ``default_shards(source_dir=dest)``).
        base_url: folder URL holding the files (``http(s)://`` or ``file://`` for a local mirror).
        force: download again even when a valid file is present.
        timeout: seconds per request.

    Returns:
        ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    for name, shape in FASHION_MNIST_FILES.items():
        target = dest / name
        if target.exists() and not force:
            try:
                if read_idx(target).shape == shape:
                    continue
            except ValueError:
                pass  # damaged: fetch again
        # The temp name ends in ".gz" so read_idx picks the gzip reader for the check.
        with atomic_path(target, suffix=".part.gz") as tmp:
            with open(tmp, "wb") as f, urllib.request.urlopen(base + name, timeout=timeout) as r:
                shutil.copyfileobj(r, f)
            got = read_idx(tmp).shape
            if got != shape:
                raise ValueError(f"{base + name} holds an array of shape {list(got)}, expected {list(shape)}")
    return dest

