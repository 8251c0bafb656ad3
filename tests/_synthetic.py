"""Test fixtures: small real data sets on disk, and helpers that read a loader back.

Idx files cut from the installed Fashion-MNIST, ImageFolder trees of random PNG/JPEG images
written with Pillow, and CIFAR-10 batches pickled in the published layout: inputs that go
through exactly the same converters as the full data sets.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from mixersnn.data.idx import FASHION_MNIST_DIR, load_idx_split, write_idx

__all__ = ["small_fashion_mnist", "image_folder", "cifar10_folder", "collect", "row_hashes"]


def small_fashion_mnist(
    root: Path, n_train: int = 500, n_test: int = 200
) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """An idx folder with the first ``n_train`` / ``n_test`` samples of the real Fashion-MNIST.

    Returns:
        ``(root, {split: (images uint8 [N, 28, 28], labels int64 [N])})``.
    """
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x, y = load_idx_split(FASHION_MNIST_DIR, split)
        x, y = x[:n].copy(), y[:n].copy()
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y.astype(np.uint8))
        arrays[split] = (x, y)
    return root, arrays


def image_folder(
    root: Path,
    *,
    fmt: str,
    n_per_class: int = 6,
    classes: Sequence[str] = ("cat", "dog", "emu"),
    sizes: Optional[Sequence[tuple[int, int]]] = None,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
) -> dict[str, tuple[np.ndarray, int]]:
    """``root/<split>/<class>/img<i>.<fmt>`` (ImageNet layout) with random RGB images.

    Args:
        fmt: ``png`` or ``jpg``.
        sizes: ``(H, W)`` cycled over the images (default all 24x24).

    Returns:
        ``{path: (pixels uint8 [H, W, 3] as generated, label)}``.
    """
    rng = np.random.default_rng(seed)
    truth = {}
    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                h, w = sizes[i % len(sizes)] if sizes else (24, 24)
                px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                p = d / f"img{i}.{fmt}"
                Image.fromarray(px).save(p, format="PNG" if fmt == "png" else "JPEG", quality=90)
                truth[str(p)] = (px, ci)
    return truth


def cifar10_folder(root: Path, *, n_per_batch: int = 40, seed: int = 0) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A ``cifar-10-batches-py`` folder with two small train batches and a test batch."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"class{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch}, f)
    out = {}
    for split, files in (("train", ["data_batch_1", "data_batch_2"]), ("test", ["test_batch"])):
        xs, ys = [], []
        for fn in files:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
            with open(root / fn, "wb") as f:
                pickle.dump({b"batch_label": fn.encode(), b"data": data, b"labels": labels, b"filenames": []}, f)
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(labels))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return root, out


def collect(loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """All batches of one pass, concatenated: ``(float32 [N, C, H, W], int64 [N])``."""
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def row_hashes(x: np.ndarray) -> list[bytes]:
    """One bytes key per sample of ``x [N, ...]`` (for set/multiset comparisons)."""
    return [r.tobytes() for r in np.ascontiguousarray(x).reshape(len(x), -1)]
