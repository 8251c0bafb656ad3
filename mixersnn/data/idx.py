"""Reader for the MNIST idx format (MNIST, Fashion-MNIST, KMNIST), gzipped or not."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["read_idx", "write_idx", "load_idx_split", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path(os.environ.get("MIXERSNN_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
"""Where Debian's ``dataset-fashion-mnist`` package puts the data (override with the
``MIXERSNN_FASHION_MNIST`` environment variable)."""

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read one idx file (``.gz`` or plain) into a numpy array of its stored shape.

    Raises:
        ValueError: the magic number or size does not describe the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic {data[:4].hex() if data else 'empty'})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path} is truncated or padded: header says {dims} ({expected} bytes) but the body "
            f"has {len(data) - offset} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def load_idx_split(root: Union[str, Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, H, W]`` and labels ``int64 [N]`` of an MNIST-layout split.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        split: "train" or "test".
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for cand in (root / f"{prefix}-{stem}-ubyte.gz", root / f"{prefix}-{stem}-ubyte", root / f"{prefix}-{stem}.gz"):
            if cand.exists():
                return cand
        raise FileNotFoundError(
            f"no {prefix}-{stem}-ubyte[.gz] in {root}. For Fashion-MNIST install the Debian "
            f"package (apt-get install dataset-fashion-mnist) or point to a folder with the idx files"
        )

    images = read_idx(find("images-idx3"))
    labels = read_idx(find("labels-idx1")).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root} {split}: images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}


def write_idx(path: Union[str, Path], array: np.ndarray) -> Path:
    """Write ``array`` as an idx file (gzipped when ``path`` ends in ``.gz``); the inverse of :func:`read_idx`.

    Used to cut small MNIST-format data sets (tests, smoke runs) from the real ones.
    Supports uint8, int8, int16 and int32 arrays.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype.kind == "i" and arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    code = _CODES.get(arr.dtype)
    if code is None:
        raise ValueError(f"write_idx supports uint8, int8, int16, int32; got {array.dtype}")
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    # mtime=0 in the gzip header: the same array gives the same bytes.
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(data)
    else:
        with opener(path, "wb") as f:
            f.write(data)
    return path
