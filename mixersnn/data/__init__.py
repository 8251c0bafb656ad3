"""Data: idx readers, WebDataset shard converters, transforms and the streaming loader.

The contract other packages code against:

* :func:`make_shards` / ``mixersnn data make-shards``: idx, CIFAR or ImageFolder -> shards.
* :func:`read_manifest`: a split's :class:`Manifest` (``verify=True`` checks sha256s).
* :func:`build_loader`: ``(images float32 [B, C, H, W], labels int64 [B])`` batches per rank.
* :class:`TransformConfig`, :func:`train_preset`, :func:`eval_preset`, :func:`augment_preset`:
  augmentation in torch.
* :func:`default_shards`: Fashion-MNIST shards, built on demand.
"""

from __future__ import annotations

from mixersnn.data.converters import DEFAULT_SAMPLES_PER_SHARD, SplitSource, load_sources, make_shards, write_split
from mixersnn.data.datasets import FASHION_MNIST_URL, data_root, default_shards, download_fashion_mnist
from mixersnn.data.idx import FASHION_MNIST_DIR, load_idx_split, read_idx, write_idx
from mixersnn.data.loader import LoaderStats, ShardLoader, build_loader, resolve_rank
from mixersnn.data.manifest import (
    ChecksumError,
    Manifest,
    ManifestError,
    MissingShardError,
    SampleError,
    ShardInfo,
    read_manifest,
)
from mixersnn.data.transforms import (
    AUGMENT_MODES,
    ImageTransform,
    TransformConfig,
    augment_preset,
    eval_preset,
    train_preset,
)

__all__ = [
    "AUGMENT_MODES",
    "ChecksumError",
    "DEFAULT_SAMPLES_PER_SHARD",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_URL",
    "ImageTransform",
    "LoaderStats",
    "Manifest",
    "ManifestError",
    "MissingShardError",
    "SampleError",
    "ShardInfo",
    "ShardLoader",
    "SplitSource",
    "TransformConfig",
    "augment_preset",
    "build_loader",
    "data_root",
    "default_shards",
    "download_fashion_mnist",
    "eval_preset",
    "load_idx_split",
    "load_sources",
    "make_shards",
    "read_idx",
    "read_manifest",
    "resolve_rank",
    "train_preset",
    "write_idx",
    "write_split",
]
