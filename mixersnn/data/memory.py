"""Decoded splits held in memory, and a loader that batches from them with tensor ops.

The shards stay the source of truth: a split is read through the streaming loader's own reader
and checks (:class:`~mixersnn.data.loader.ShardLoader`) once per process, decoded to ``uint8
[N, C, H, W]``, and kept in a process-wide cache keyed by its shards' URLs and checksums. A
process that trains many models on one data set (a reused search-trial actor, a notebook)
decodes it once; PNG decoding dominates reading at small image sizes.

:class:`MemoryLoader` has the streaming loader's contract (``len``, ``set_epoch``, iteration
yields normalised ``(float32 [B, C, H, W], int64 [B])``, ``stats``) and its splitting rules:
train epochs give each rank ``N // (world_size * batch_size)`` full batches of a permutation
drawn from ``(seed, epoch)`` (every rank draws the same one and takes its own slice); eval
gives rank ``r`` the contiguous positions ``[r*N/W, (r+1)*N/W)`` in order. Pad-and-crop, flips
and normalisation run on whole batches; random-resized crops and resizes (ImageNet-size data,
which does not fit in memory anyway) fall back to the per-image transform.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from mixersnn.data.loader import (LoaderStats, ShardLoader, _Counters, _read_pieces, _seed, _ShardStream, eval_span,
                                  rank_batches, rank_samples)
from mixersnn.data.transforms import ImageTransform

__all__ = ["MemoryLoader", "decoded_split", "decoded_nbytes", "is_cached", "clear_cache"]

_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, LoaderStats]] = {}


def _key(loader: ShardLoader) -> tuple[Any, ...]:
    shas = tuple(s.sha256 for s in loader.manifest.shards) if loader.manifest is not None else ()
    return (tuple(loader.urls), tuple(loader.counts), shas, loader.channels)


def decoded_nbytes(loader: ShardLoader) -> Optional[int]:
    """Bytes the split takes decoded (``N * C * H * W``), or None when its images have no
    fixed size (the manifest has no ``image_size``): such a split is never cached."""
    m = loader.manifest
    if m is None or m.image_size is None:
        return None
    return int(sum(loader.counts)) * int(m.channels) * int(m.image_size[0]) * int(m.image_size[1])


def is_cached(loader: ShardLoader) -> bool:
    """Whether this process holds ``loader``'s split decoded already."""
    return _key(loader) in _CACHE


def clear_cache() -> None:
    """Drop every decoded split this process holds."""
    _CACHE.clear()


def decoded_split(loader: ShardLoader) -> tuple[torch.Tensor, torch.Tensor, LoaderStats]:
    """Every sample of ``loader``'s split, decoded: ``(uint8 [N, C, H, W], int64 [N], stats)``.

    Read once per process (later calls return the cached tensors, which must not be modified).
    Damaged shards and samples are skipped and counted in ``stats`` exactly as the streaming
    loader does; a sample that contradicts the manifest raises its
    :class:`~mixersnn.data.manifest.SampleError`.
    """
    key = _key(loader)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    stream = _ShardStream(loader, epoch=0)
    counters = _Counters()
    pieces = [(u, 0, c) for u, c in zip(loader.urls, loader.counts)]
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for sample in _read_pieces(pieces, counters):
        out = stream._decode(sample, counters)
        if out is not None:
            images.append(out[0])
            labels.append(out[1])
    if not images:
        raise RuntimeError(f"no readable sample in any of the {len(loader.urls)} shards of {loader!r}; "
                           f"re-create them with `mixersnn data make-shards`")
    stats = LoaderStats()
    stats.corrupt_samples = counters.corrupt_samples
    stats.corrupt_shard_urls.extend(dict.fromkeys(counters.corrupt_shard_urls))
    stats.corrupt_sample_keys.extend(counters.corrupt_sample_keys)
    for m in counters.messages:
        warnings.warn(m, RuntimeWarning, stacklevel=2)
    result = (torch.stack(images), torch.tensor(labels, dtype=torch.int64), stats)
    _CACHE[key] = result
    return result


def _batched_ok(tf: ImageTransform, size: tuple[int, int]) -> bool:
    """Whether ``tf`` on images of ``size`` is pad-and-crop / flip / normalise only."""
    c = tf.config
    if c.random_resized_crop or c.center_crop:
        return False
    if c.resize is not None and min(size) != c.resize:
        return False
    return c.img_size is None or tuple(size) == (c.img_size, c.img_size)


class MemoryLoader:
    """Batches from a decoded split in memory (see the module doc), with ``source``'s split,
    batch size, transform, seed, rank and epoch.

    Attributes:
        stats: samples and batches delivered; the damage skipped while decoding.
    """

    def __init__(self, source: ShardLoader) -> None:
        self.images, self.labels, decode_stats = decoded_split(source)
        self.batch_size, self.train = source.batch_size, source.train
        self.transform = source.transform
        self.seed, self.rank, self.world_size, self.epoch = source.seed, source.rank, source.world_size, source.epoch
        self.stats = copy.deepcopy(decode_stats)  # the damage met while decoding; nothing delivered yet
        self._batched = _batched_ok(self.transform, tuple(self.images.shape[-2:]))
        n, b, w = self.images.shape[0], self.batch_size, self.world_size
        if self.train and n < w * b:
            raise ValueError(f"batch_size={b} x world_size={w} exceeds the {n} readable samples; "
                             f"allowed batch_size <= {n // w}")

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return rank_samples(int(self.images.shape[0]), self.batch_size, self.train, self.rank, self.world_size)

    def __len__(self) -> int:
        return rank_batches(self.num_samples, self.batch_size, self.train)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (train order and augmentation draws)."""
        self.epoch = int(epoch)

    def _indices(self, epoch: int) -> torch.Tensor:
        n, w, r = int(self.images.shape[0]), self.world_size, self.rank
        if self.train:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch, 3))
            per_rank = self.num_samples
            return torch.randperm(n, generator=g)[r * per_rank : (r + 1) * per_rank]
        start, count = eval_span(n, r, w)
        return torch.arange(start, start + count)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Pad-and-crop and flip on ``float32 [B, C, H, W]`` (0-255), one draw per image."""
        c = self.transform.config
        B, C, H, W = x.shape
        if c.pad_crop > 0:
            p = c.pad_crop
            padded = F.pad(x, (p, p, p, p))
            top = torch.randint(0, 2 * p + 1, (B,), generator=g)
            left = torch.randint(0, 2 * p + 1, (B,), generator=g)
            rows = (top[:, None] + torch.arange(H))[:, None, :, None]
            cols = (left[:, None] + torch.arange(W))[:, None, None, :]
            x = padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
        if c.hflip > 0:
            flip = torch.rand(B, generator=g) < c.hflip
            if bool(flip.any()):
                x[flip] = x[flip].flip(-1)
        return x

    def _batch(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        raw = self.images[idx]
        if self._batched:
            x = raw.float()
            if self.train:
                x = self._augment(x, g)
            x = x.div_(255.0)
        else:
            x = torch.stack([self.transform(img, g) for img in raw])
        return self.transform.normalize(x.contiguous())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        idx = self._indices(epoch)
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, self.rank, 4))
        for i in range(len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x, y = self._batch(sel, g), self.labels[sel]
            self.stats.batches += 1
            self.stats.samples_seen += int(y.shape[0])
            yield x, y

    def __repr__(self) -> str:
        return (f"MemoryLoader({int(self.images.shape[0])} samples in memory, batch_size={self.batch_size}, "
                f"train={self.train}, rank={self.rank}/{self.world_size}, {len(self)} batches/epoch)")

