"""The streaming loader: WebDataset shards -> normalised ``(images, labels)`` batches.

How samples are split (the part that keeps DDP from hanging)
------------------------------------------------------------
The loader knows every shard's sample count (from the manifest, or by one scan of the shards
when only URLs are given). It lays the shards end to end as one sequence of ``N`` sample
positions and gives every (rank, DataLoader worker) a *contiguous range* of positions; a
worker opens only the shards its range touches and skips, without decoding, the few samples
at the edges that belong to its neighbours. Ranks are therefore balanced to the sample, no
matter how many shards there are or how uneven they are, and more workers than shards is fine.

* **Train** (``train=True``): each epoch the shard order is permuted and the start rotated by
  a random offset, both drawn from ``(seed, epoch)`` so every rank draws the same ones. Each
  rank gets exactly ``N // (world_size * batch_size)`` full batches (the remainder, a random
  window of fewer than ``world_size * batch_size`` samples, is left out this epoch), read
  through a shuffle buffer. If a corrupt shard leaves a worker short, it tops up by reading its
  range again, so every rank still yields exactly ``len(loader)`` batches.
* **Eval** (``train=False``): shards in manifest order, no shuffle, rank ``r`` gets positions
  ``[r*N/W, (r+1)*N/W)`` (sizes differ by at most one sample), so across ranks every sample
  is seen exactly once; only the last batch of a rank may be partial, and batch counts across
  ranks differ by at most one. Within a rank, each DataLoader worker reads a contiguous run
  of whole batches and the DataLoader takes one batch from each worker in turn, so the order
  is deterministic for a given ``(world_size, num_workers, batch_size)``, and the samples a
  rank sees do not depend on ``num_workers`` (only their batch order does). Interleaving the
  workers' ranges sample by sample instead would make every worker read every shard.

Rank and world size default to ``torch.distributed`` when it is initialised, else the
``RANK``/``WORLD_SIZE`` environment variables (what ``wds.split_by_node`` reads, and what Ray
Train and torchrun set), else 0/1; they are resolved once in the main process, because
DataLoader worker processes do not see the process group.

Damaged data
------------
A corrupt or truncated shard is skipped from the point of damage on (samples before it are
kept), with a warning, and counted in ``loader.stats``; a sample whose image will not decode
is skipped and counted the same way. A sample whose label is outside the manifest's classes or
whose image has the wrong shape means the shards do not match their manifest: that raises a
:class:`~mixersnn.data.manifest.SampleError` naming the sample's key and shard.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from mixersnn.data import remote
from mixersnn.data.manifest import (
    MANIFEST_NAME,
    ManifestError,
    Manifest,
    MissingShardError,
    SampleError,
    read_manifest,
    sha256_file,
)
from mixersnn.data.shard_writer import IMAGE_EXTS, decode_image
from mixersnn.data.transforms import ImageTransform, TransformConfig, eval_preset, train_preset

__all__ = ["LoaderStats", "ShardLoader", "build_loader", "resolve_rank"]

_MAX_KEYS_KEPT = 100


@dataclass
class LoaderStats:
    """Counters over the loader's lifetime (all epochs; :meth:`reset` to start again).

    Attributes:
        samples_seen: samples delivered in batches.
        batches: batches delivered.
        corrupt_samples: samples skipped because their bytes would not decode.
        corrupt_shard_urls: shards in which reading stopped at damage (each listed once).
        corrupt_sample_keys: ``url#key`` of skipped samples (the first 100).
    """

    samples_seen: int = 0
    batches: int = 0
    corrupt_samples: int = 0
    corrupt_shard_urls: list[str] = field(default_factory=list)
    corrupt_sample_keys: list[str] = field(default_factory=list)

    @property
    def corrupt_shards(self) -> int:
        """How many distinct shards were cut short by damage."""
        return len(self.corrupt_shard_urls)

    def reset(self) -> None:
        self.samples_seen = self.batches = self.corrupt_samples = 0
        self.corrupt_shard_urls.clear()
        self.corrupt_sample_keys.clear()

    def summary(self) -> str:
        s = f"{self.samples_seen} samples in {self.batches} batches"
        if self.corrupt_shards or self.corrupt_samples:
            s += f"; skipped: {self.corrupt_shards} corrupt shards, {self.corrupt_samples} corrupt samples"
        return s


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """``(rank, world_size)``: explicit values, else torch.distributed, else env, else (0, 1)."""
    if rank is not None and world_size is not None:
        r, w = int(rank), int(world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        r, w = 0, 1
    if rank is not None:
        r = int(rank)
    if world_size is not None:
        w = int(world_size)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank={r}, world_size={w}; allowed 0 <= rank < world_size, world_size >= 1")
    return r, w


# ----------------------------------------------------------------------------- reading


def _groups(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as ``{__key__, __url__, ext: bytes}``, in tar order.

    Uses WebDataset's ``gopen`` (local paths, ``file://``, ``pipe:``, http, ...), or
    :func:`mixersnn.data.remote.open_read` for object stores (``s3://``), and WebDataset's tar
    iterator. A sample is only yielded once the next key starts (or the tar ends), so damage in
    the middle of a sample never produces a half sample; errors propagate to the caller.
    """
    stream = remote.open_read(url) if remote.is_remote(url) else gopen(url, "rb")
    try:
        cur: Optional[dict[str, Any]] = None
        for f in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(f["fname"])
            if prefix is None:
                continue
            if cur is None or cur["__key__"] != prefix:
                if cur is not None:
                    yield cur
                cur = {"__key__": prefix, "__url__": url}
            cur[suffix.lower()] = f["data"]
        if cur is not None:
            yield cur
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: child killed by our early close exits non-zero; harmless
            pass


def count_samples(url: str) -> int:
    """Samples in one shard, by reading it once (for URL lists without a manifest)."""
    return sum(1 for _ in _groups(url))


@dataclass
class _Counters:
    """Per-worker counters, shipped to the main process with each batch as a delta."""

    corrupt_samples: int = 0
    corrupt_shard_urls: list[str] = field(default_factory=list)
    corrupt_sample_keys: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def take(self) -> dict[str, Any]:
        d = {
            "corrupt_samples": self.corrupt_samples,
            "corrupt_shard_urls": list(self.corrupt_shard_urls),
            "corrupt_sample_keys": list(self.corrupt_sample_keys),
            "messages": list(self.messages),
        }
        self.corrupt_samples = 0
        self.corrupt_shard_urls.clear()
        self.corrupt_sample_keys.clear()
        self.messages.clear()
        return d


def _read_pieces(pieces: Sequence[tuple[str, int, int]], counters: _Counters) -> Iterator[dict[str, Any]]:
    """Raw samples at positions ``[lo, hi)`` of each ``(url, lo, hi)`` piece, in order."""
    for url, lo, hi in pieces:
        j = 0
        try:
            for sample in _groups(url):
                if j >= hi:
                    break
                if j >= lo:
                    yield sample
                j += 1
        except Exception as e:  # tarfile.ReadError, EOFError, OSError, a failed pipe: ...
            if j >= hi:  # the damage lies past this piece's range: nothing of ours was lost
                continue
            counters.corrupt_shard_urls.append(url)
            counters.messages.append(
                f"skipped the rest of corrupt shard {url} after {j} samples ({type(e).__name__}: {e}); "
                f"re-create it with `mixersnn data make-shards` (verify=True finds such shards up front)"
            )
            continue
        if j < hi:
            counters.corrupt_shard_urls.append(url)
            counters.messages.append(
                f"shard {url} ended after {j} samples but the manifest promises at least {hi}; it is "
                f"truncated or was replaced. Re-create it with `mixersnn data make-shards`."
            )


# ----------------------------------------------------------------------------- planning


def _pieces(
    urls: Sequence[str], counts: Sequence[int], order: Sequence[int], start: int, length: int
) -> list[tuple[str, int, int]]:
    """The shard pieces covering ``length`` positions from ``start`` of the circular sequence.

    The sequence is the shards ``order[0], order[1], ...`` laid end to end (``N`` positions),
    wrapping around at the end.
    """
    n = int(sum(counts))
    out: list[tuple[str, int, int]] = []
    if length <= 0 or n == 0:
        return out
    bounds = np.cumsum([0] + [counts[i] for i in order])
    pos, left = start % n, length
    while left > 0:
        k = int(np.searchsorted(bounds, pos, side="right") - 1)
        lo = pos - int(bounds[k])
        take = min(left, counts[order[k]] - lo)
        out.append((urls[order[k]], lo, lo + take))
        left -= take
        pos = (pos + take) % n
    return out


def _split_batches(nb: int, parts: int) -> list[int]:
    """``nb`` batches dealt to ``parts`` workers as evenly as possible (first ones get extra)."""
    return [nb // parts + (1 if w < nb % parts else 0) for w in range(parts)]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def eval_span(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(first position, samples)`` of rank ``rank`` in an eval pass over ``n`` samples: a
    contiguous range, sizes differing by at most one across ranks."""
    return rank * (n // world_size) + min(rank, n % world_size), n // world_size + (1 if rank < n % world_size else 0)


def rank_samples(n: int, batch_size: int, train: bool, rank: int, world_size: int) -> int:
    """Samples one rank yields per epoch of ``n``: whole batches of an equal share in
    training, its :func:`eval_span` in evaluation."""
    if train:
        return (n // (world_size * batch_size)) * batch_size
    return eval_span(n, rank, world_size)[1]


def rank_batches(samples: int, batch_size: int, train: bool) -> int:
    """Batches of ``samples``: full ones in training, the last one partial in evaluation."""
    return samples // batch_size if train else -(-samples // batch_size)


@dataclass
class _Plan:
    """Where one (rank, worker) reads in one epoch, and how many samples it must deliver."""

    pieces: list[tuple[str, int, int]]
    num_samples: int
    num_batches: int


class _ShardStream(torch.utils.data.IterableDataset):
    """One rank's stream for one epoch; runs in the main process or in DataLoader workers.

    Yields ``(images float32 [B, C, H, W], labels int64 [B], stats delta)``, and a final
    ``(None, None, delta)`` carrying the counters of the last stretch.
    """

    def __init__(self, loader: "ShardLoader", epoch: int):
        super().__init__()
        self.urls = loader.urls
        self.counts = loader.counts
        self.batch_size = loader.batch_size
        self.train = loader.train
        self.transform = loader.transform
        self.shuffle_buffer = loader.shuffle_buffer
        self.seed = loader.seed
        self.rank = loader.rank
        self.world_size = loader.world_size
        self.epoch = epoch
        self.num_classes = loader.num_classes
        self.image_size = loader.image_size
        self.channels = loader.channels

    def plan(self, worker: int, num_workers: int) -> _Plan:
        """The contiguous range of this (rank, worker) for this epoch (see the module doc)."""
        n, b, r, w = int(sum(self.counts)), self.batch_size, self.rank, self.world_size
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = [int(i) for i in rng.permutation(len(self.counts))]
            offset = int(rng.integers(n))
            per_rank = n // (w * b)
            quotas = _split_batches(per_rank, num_workers)
            start = offset + r * per_rank * b + sum(quotas[:worker]) * b
            length = quotas[worker] * b
            return _Plan(_pieces(self.urls, self.counts, order, start, length), length, quotas[worker])
        order = list(range(len(self.counts)))
        rank_start, rank_len = eval_span(n, r, w)
        nb = -(-rank_len // b)
        quotas = _split_batches(nb, num_workers)
        start = sum(quotas[:worker]) * b
        length = max(0, min(quotas[worker] * b, rank_len - start))
        return _Plan(_pieces(self.urls, self.counts, order, rank_start + start, length), length, quotas[worker])

    def _decode(self, sample: dict[str, Any], counters: _Counters) -> Optional[tuple[torch.Tensor, int]]:
        key = f"{sample['__url__']}#{sample['__key__']}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            counters.corrupt_samples += 1
            if len(counters.corrupt_sample_keys) < _MAX_KEYS_KEPT:
                counters.corrupt_sample_keys.append(key)
            counters.messages.append(f"skipped sample {key}: it has {sorted(k for k in sample if not k.startswith('__'))}, needs an image and a .cls")
            return None
        try:
            label = int(sample["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise SampleError(
                f"sample {key}: label {sample['cls'][:20]!r} is not an integer; a .cls member holds the class "
                f"index as ASCII digits. Re-create the shard with `mixersnn data make-shards`."
            ) from None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            top = "" if self.num_classes is None else f", {self.num_classes - 1}"
            raise SampleError(
                f"sample {key}: label {label} is outside the classes [0{top}]; the shard does not match its "
                f"manifest. Re-create the shards, or fix the manifest's classes."
            )
        try:
            arr = decode_image(sample[ext], ext, self.channels)
        except Exception as e:  # PIL/numpy raise many types for damaged bytes
            counters.corrupt_samples += 1
            if len(counters.corrupt_sample_keys) < _MAX_KEYS_KEPT:
                counters.corrupt_sample_keys.append(key)
            counters.messages.append(f"skipped sample {key}: its {ext} image does not decode ({type(e).__name__}: {e})")
            return None
        if arr.ndim != 3 or (self.channels is not None and arr.shape[2] != self.channels):
            raise SampleError(
                f"sample {key}: image shape {list(arr.shape)} is not [H, W, {self.channels or 'C'}]; the shard does "
                f"not match its manifest. Re-create the shards with `mixersnn data make-shards`."
            )
        if self.image_size is not None and tuple(arr.shape[:2]) != tuple(self.image_size):
            raise SampleError(
                f"sample {key}: image is {arr.shape[0]}x{arr.shape[1]} but the manifest says every image is "
                f"{self.image_size[0]}x{self.image_size[1]}. Re-create the shards with `mixersnn data make-shards`."
            )
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C")), label  # a writable copy

    def __iter__(self) -> Iterator[tuple[Optional[torch.Tensor], Optional[torch.Tensor], dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan(worker, num_workers)
        counters = _Counters()
        gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, worker, 1))
        if self.train:
            samples = self._train_samples(plan, worker, counters, gen)
        else:
            samples = self._eval_samples(plan, counters, gen)
        transform = self.transform

        def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.stack([x for x, _ in batch])
            return transform.normalize(images), torch.tensor([y for _, y in batch], dtype=torch.int64)

        # WebDataset's batcher; train mode drops a partial batch (there is none unless the
        # whole data set is unreadable), eval keeps the last partial batch.
        batches = wds.filters.batched(self.batch_size, collation_fn=collate, partial=not self.train)(samples)
        for images, labels in batches:
            yield images, labels, counters.take()
        yield None, None, counters.take()

    def _transformed(
        self, raw: Iterator[dict[str, Any]], counters: _Counters, gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, int]]:
        for sample in raw:
            out = self._decode(sample, counters)
            if out is not None:
                yield self.transform(out[0], gen), out[1]

    def _eval_samples(self, plan: _Plan, counters: _Counters, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, int]]:
        return self._transformed(_read_pieces(plan.pieces, counters), counters, gen)

    def _train_samples(
        self, plan: _Plan, worker: int, counters: _Counters, gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, int]]:
        need, got, rounds = plan.num_samples, 0, 0
        pieces = plan.pieces
        everything = [(u, 0, c) for u, c in zip(self.urls, self.counts)]
        while got < need:
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, 2, rounds))
            raw = wds.filters.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(
                _read_pieces(pieces, counters)
            ) if self.shuffle_buffer > 1 else _read_pieces(pieces, counters)
            got_this = 0
            for item in self._transformed(raw, counters, gen):
                yield item
                got += 1
                got_this += 1
                if got >= need:
                    return
            # Short (damaged data): read again so this rank still yields its full batch count.
            rounds += 1
            if got_this == 0:
                if pieces is everything:
                    raise RuntimeError(
                        f"rank {self.rank} worker {worker}: no readable sample in any of the {len(self.urls)} "
                        f"shards; see the warnings above and re-create the shards"
                    )
                pieces = everything


# ----------------------------------------------------------------------------- the loader


class ShardLoader:
    """Iterable of ``(images float32 [B, C, H, W], labels int64 [B])`` for one rank.

    Build it with :func:`build_loader`. ``len(loader)`` is the number of batches this rank
    yields per epoch; every new iteration advances the epoch (so the train order changes),
    and :meth:`set_epoch` pins it, as with ``DistributedSampler``.
    """

    def __init__(
        self,
        *,
        urls: list[str],
        counts: list[int],
        batch_size: int,
        train: bool,
        transform: ImageTransform,
        num_workers: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        epoch: int,
        manifest: Optional[Manifest],
    ):
        self.urls, self.counts = urls, counts
        self.batch_size, self.train = batch_size, train
        self.transform = transform
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.manifest = manifest
        self.num_classes = manifest.num_classes if manifest is not None else None
        self.image_size = manifest.image_size if manifest is not None else None
        self.channels = manifest.channels if manifest is not None else None
        self.stats = LoaderStats()

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return rank_samples(int(sum(self.counts)), self.batch_size, self.train, self.rank, self.world_size)

    def __len__(self) -> int:
        return rank_batches(self.num_samples, self.batch_size, self.train)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (train order and augmentation seeds)."""
        self.epoch = int(epoch)

    def _absorb(self, delta: dict[str, Any]) -> None:
        st = self.stats
        st.corrupt_samples += delta["corrupt_samples"]
        for u in delta["corrupt_shard_urls"]:
            if u not in st.corrupt_shard_urls:
                st.corrupt_shard_urls.append(u)
        for k in delta["corrupt_sample_keys"]:
            if len(st.corrupt_sample_keys) < _MAX_KEYS_KEPT:
                st.corrupt_sample_keys.append(k)
        for m in delta["messages"]:
            # Warn from the main process so the warning shows (and can be caught) even when the
            # damage was met in a DataLoader worker.
            warnings.warn(m, RuntimeWarning, stacklevel=3)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = _ShardStream(self, self.epoch)
        self.epoch += 1
        if self.num_workers > 0:
            it: Any = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False
            )
        else:
            it = stream
        for images, labels, delta in it:
            self._absorb(delta)
            if images is None:
                continue
            self.stats.batches += 1
            self.stats.samples_seen += int(labels.shape[0])
            yield images, labels

    def __repr__(self) -> str:
        return (
            f"ShardLoader({len(self.urls)} shards, {sum(self.counts)} samples, batch_size={self.batch_size}, "
            f"train={self.train}, rank={self.rank}/{self.world_size}, {len(self)} batches/epoch)"
        )


def _local_path(url: str) -> Optional[Path]:
    if url.startswith("file:"):
        return Path(re.sub(r"^file://?", "", url))  # the same rule as WebDataset's gopen_file
    if ":" in url.split("/", 1)[0] and not os.path.exists(url):  # pipe:, http:, s3:, ...
        return None
    return Path(url)


def _is_shard_pattern(source: str) -> bool:
    """A string naming shards (brace pattern, ``::`` list, ``.tar``) rather than a split/manifest."""
    return "{" in source or "::" in source or source.rstrip("/").endswith((".tar", ".tgz", ".tar.gz"))


def _resolve_remote_urls(urls: list[str], verify: bool) -> tuple[list[str], list[int], Optional[Manifest]]:
    """:func:`_resolve_urls` for object-store URLs: existence by listing, counts from the manifest."""
    by_prefix: dict[str, set[str]] = {}
    for u in urls:
        pre = remote.parent(u)
        if pre not in by_prefix:
            by_prefix[pre] = remote.list_names(pre)
    absent = [u for u in urls if remote.basename(u) not in by_prefix[remote.parent(u)]]
    if absent:
        raise MissingShardError(
            f"{len(absent)} of {len(urls)} shards do not exist: {absent[:5]}{' ...' if len(absent) > 5 else ''}. "
            + remote.missing_message(absent[0])
        )
    if len(by_prefix) == 1:
        pre, names = next(iter(by_prefix.items()))
        if MANIFEST_NAME in names:
            m = read_manifest(pre, verify=verify)
            by_name = {s.name: s for s in m.shards}
            if all(remote.basename(u) in by_name for u in urls):
                return urls, [by_name[remote.basename(u)].num_samples for u in urls], m
    if verify:
        raise ManifestError(
            "verify=True needs the shards' manifest.json (it holds the checksums); these URLs have none next "
            "to them. Pass the split prefix instead, or verify=False."
        )
    return urls, [count_samples(u) for u in urls], None


def _resolve_urls(source: Union[str, Sequence[str]], verify: bool) -> tuple[list[str], list[int], Optional[Manifest]]:
    urls = expand_urls(source) if isinstance(source, str) else [str(u) for u in source]
    if not urls:
        raise ManifestError(f"the shard list {source!r} is empty; pass at least one shard URL")
    if any(remote.is_remote(u) for u in urls):
        if not all(remote.is_remote(u) for u in urls):
            raise ManifestError(
                f"the shard list mixes object-store URLs and other locations ({urls[:3]} ...); put the shards "
                f"of one split in one place"
            )
        return _resolve_remote_urls(urls, verify)
    locals_ = [_local_path(u) for u in urls]
    absent = [u for u, p in zip(urls, locals_) if p is not None and not p.is_file()]
    if absent:
        raise MissingShardError(
            f"{len(absent)} of {len(urls)} shards do not exist: {absent[:5]}{' ...' if len(absent) > 5 else ''}. "
            f"Check the path/brace pattern, or create them with `mixersnn data make-shards`."
        )
    # Shards that sit next to a manifest take their counts and metadata from it.
    parents = {p.parent for p in locals_ if p is not None}
    if len(parents) == 1 and all(p is not None for p in locals_):
        parent = next(iter(parents))
        if (parent / MANIFEST_NAME).exists():
            m = read_manifest(parent)
            by_name = {s.name: s for s in m.shards}
            if all(p.name in by_name for p in locals_):  # type: ignore[union-attr]
                if verify:
                    for u, p in zip(urls, locals_):
                        digest = sha256_file(p)  # type: ignore[arg-type]
                        if digest != by_name[p.name].sha256:  # type: ignore[union-attr]
                            from mixersnn.data.manifest import ChecksumError

                            raise ChecksumError(
                                f"{u}: sha256 {digest[:16]}... differs from the manifest's "
                                f"{by_name[p.name].sha256[:16]}...; re-create the shard."  # type: ignore[union-attr]
                            )
                return urls, [by_name[p.name].num_samples for p in locals_], m  # type: ignore[union-attr]
    if verify:
        raise ManifestError(
            "verify=True needs the shards' manifest.json (it holds the checksums); these URLs have none next "
            "to them. Pass the split folder instead, or verify=False."
        )
    return urls, [count_samples(u) for u in urls], None


def _shards_of(source: Union[str, Path, Manifest, Sequence[str]],
               verify: bool) -> tuple[list[str], list[int], Optional[Manifest]]:
    """Shard URLs, their sample counts and the manifest (None for bare URLs without one) of
    a ``build_loader`` source."""
    if isinstance(source, Manifest):
        # A Manifest may be part of a split (Manifest.holdout): its own shards are the source.
        if verify and source.root is not None:
            read_manifest(source.root, verify=True)  # type: ignore[arg-type]
        return source.shard_urls(), [s.num_samples for s in source.shards], source
    if isinstance(source, Path) or (
        isinstance(source, str)
        and (
            os.path.isdir(source)
            or source.endswith(".json")
            or (remote.is_remote(source) and not _is_shard_pattern(source))
        )
    ):
        manifest = read_manifest(source, verify=verify)
        return manifest.shard_urls(), [s.num_samples for s in manifest.shards], manifest
    return _resolve_urls(source, verify)  # type: ignore[arg-type]


def _build_transform(transform: Optional[TransformConfig], manifest: Optional[Manifest], train: bool) -> ImageTransform:
    """The loader's transform: ``transform`` or the train/eval preset at the manifest's image
    size (224 for variable-size data), normalised with the manifest's statistics."""
    if transform is None:
        side = manifest.image_size[0] if manifest is not None and manifest.image_size else None
        if side is None and manifest is None:
            transform = TransformConfig()
        elif train:
            transform = train_preset(side or 224)
        else:
            transform = eval_preset(side or 224, source_size=side)
    mean = manifest.mean if manifest is not None else (0.0,)
    std = manifest.std if manifest is not None else (1.0,)
    return ImageTransform(transform, mean=mean, std=std)


def build_loader(
    source: Union[str, Path, Manifest, Sequence[str]],
    *,
    batch_size: int,
    train: bool,
    transform: Union[None, TransformConfig, ImageTransform] = None,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    epoch: int = 0,
    verify: bool = False,
) -> ShardLoader:
    """A loader over WebDataset shards for one rank.

    Args:
        source: a split folder with ``manifest.json``, the manifest path, a :class:`Manifest`,
            or shard URLs: a list, or a string with brace patterns / ``::`` separators
            (``"/data/train/shard-{000000..000011}.tar"``, ``file://...``, ``pipe:cat ...``).
            Splits, manifests and shards may live in an object store: ``s3://bucket/fmnist/train``
            (see :mod:`mixersnn.data.remote`; needs ``pip install "mixersnn[s3]"``).
            URLs next to a ``manifest.json`` use it; others are scanned once for their counts
            and carry no class list or statistics.
        batch_size: samples per batch.
        train: shuffled, augmented, equal full batches on every rank (see module doc); else
            deterministic, every sample once across ranks.
        transform: a :class:`TransformConfig` (mean/std default to the manifest's), a built
            :class:`ImageTransform`, or None for :func:`train_preset`/:func:`eval_preset` at the
            manifest's image size (224 for variable-size data).
        num_workers: DataLoader worker processes (0: read in this process).
        shuffle_buffer: samples in the train shuffle buffer (1 disables it).
        seed: seed for shard order, shuffle buffer and augmentation.
        rank: this process's rank; default from torch.distributed / env (see module doc).
        world_size: number of ranks; same default.
        epoch: the first epoch; later iterations advance it (or call ``set_epoch``).
        verify: check every shard's sha256 against the manifest before the first batch.

    Returns:
        A :class:`ShardLoader`; ``len()`` is batches per epoch on this rank and ``.stats``
        counts samples seen and damage skipped.

    Raises:
        ManifestError: empty manifest or shard list, impossible batch size.
        MissingShardError: a shard does not exist.
        ChecksumError: ``verify=True`` and a shard's bytes do not match the manifest.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; allowed >= 1")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}; allowed >= 0")
    r, w = resolve_rank(rank, world_size)
    urls, counts, manifest = _shards_of(source, verify)
    n = sum(counts)
    if n == 0:
        raise ManifestError(f"the shards {urls[:3]} hold no samples; there is nothing to load")
    if train and n < w * batch_size:
        raise ManifestError(
            f"batch_size={batch_size} x world_size={w} = {w * batch_size} exceeds the {n} samples, so a train "
            f"epoch would have no full batch; allowed batch_size <= {n // w}"
        )
    built = transform if isinstance(transform, ImageTransform) else _build_transform(transform, manifest, train)
    return ShardLoader(
        urls=urls,
        counts=counts,
        batch_size=batch_size,
        train=train,
        transform=built,
        num_workers=num_workers,
        shuffle_buffer=max(1, int(shuffle_buffer)),
        seed=seed,
        rank=r,
        world_size=w,
        epoch=epoch,
        manifest=manifest,
    )
