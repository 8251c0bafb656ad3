"""Data: idx readers, WebDataset shard converters and the streaming loader."""

from __future__ import annotations

from mixersnn.data.idx import FASHION_MNIST_DIR, load_idx_split, read_idx

__all__ = ["FASHION_MNIST_DIR", "load_idx_split", "read_idx"]
