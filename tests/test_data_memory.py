"""Decoded splits in memory (mixersnn.data.memory): the same samples, splits and normalisation
as the streaming loader, augmentation on whole batches, one decode per process, damage counted."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mixersnn.data import TransformConfig, build_loader, train_preset
from mixersnn.data.memory import MemoryLoader, clear_cache, decoded_nbytes, decoded_split
from _synthetic import collect, row_hashes

RAW = TransformConfig(mean=(0.0,), std=(1.0,))


@pytest.fixture(scope="module")
def shards(uneven_shards: Path) -> Path:
    """conftest's uneven Fashion-MNIST shards (500 train / 200 test, shards of 128)."""
    return uneven_shards


def test_eval_matches_the_streaming_loader_sample_for_sample(shards: Path) -> None:
    for world_size in (1, 3):
        for rank in range(world_size):
            kw = dict(batch_size=64, train=False, rank=rank, world_size=world_size)
            streamed = collect(build_loader(shards / "test", **kw))
            mem = MemoryLoader(build_loader(shards / "test", **kw))
            held = collect(mem)
            assert len(mem) == len(build_loader(shards / "test", **kw))
            np.testing.assert_array_equal(held[1], streamed[1])
            np.testing.assert_allclose(held[0], streamed[0], atol=1e-6)  # the manifest's mean/std


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_ranks_get_equal_full_batches_of_disjoint_samples_reshuffled_per_epoch(shards: Path, world_size: int) -> None:
    everything = Counter(row_hashes(collect(build_loader(shards / "train", batch_size=100, train=False,
                                                         transform=RAW))[0]))
    per_epoch = []
    for epoch in (0, 1):
        seen: list[bytes] = []
        for rank in range(world_size):
            loader = MemoryLoader(build_loader(shards / "train", batch_size=16, train=True, transform=RAW,
                                               rank=rank, world_size=world_size, seed=5))
            loader.set_epoch(epoch)
            sizes = [len(y) for _, y in loader]
            assert sizes == [16] * (500 // (world_size * 16)) == [16] * len(loader)
            loader.set_epoch(epoch)
            seen += row_hashes(collect(loader)[0])
        assert len(seen) == len(set(seen)) and not Counter(seen) - everything  # real samples, none twice
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]


def test_batched_pad_crop_and_flip_are_crops_of_the_padded_image(shards: Path) -> None:
    tf = TransformConfig(img_size=28, pad_crop=2, hflip=0.5, mean=(0.0,), std=(1.0,))
    raw = MemoryLoader(build_loader(shards / "train", batch_size=500, train=False, transform=RAW))
    originals = [img for img, _ in zip(*collect(raw))]
    loader = MemoryLoader(build_loader(shards / "train", batch_size=50, train=True, transform=tf, seed=1))
    x, y = collect(loader)
    by_label: dict[int, list[np.ndarray]] = {}
    for img, label in zip(originals, collect(raw)[1]):
        by_label.setdefault(int(label), []).append(img)
    flips = 0
    for img, label in zip(x[:40], y[:40]):
        # Some original of that label, padded by 2 and shifted by (dy, dx) in [-2, 2], maybe
        # flipped, gives this image exactly.
        found = None
        for orig in by_label[int(label)]:
            pad = np.pad(orig, ((0, 0), (2, 2), (2, 2)))
            for flip in (False, True):
                src = pad[..., ::-1] if flip else pad
                for dy in range(5):
                    for dx in range(5):
                        if np.array_equal(src[:, dy:dy + 28, dx:dx + 28], img):
                            found = flip
                            break
                    if found is not None:
                        break
                if found is not None:
                    break
            if found is not None:
                break
        assert found is not None, "an augmented image is not a shifted (flipped) crop of any original"
        flips += found
    assert 5 <= flips <= 35  # p = 0.5 over 40 images
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_per_image_transforms_fall_back_and_run(shards: Path) -> None:
    tf = train_preset(40)  # a 40-px model on 28-px data: resize, so no batched path
    loader = MemoryLoader(build_loader(shards / "train", batch_size=32, train=True, transform=tf))
    x, y = next(iter(loader))
    assert x.shape == (32, 1, 40, 40) and x.dtype == torch.float32 and y.shape == (32,)


def test_a_split_is_decoded_once_per_process(shards: Path) -> None:
    clear_cache()
    a = decoded_split(build_loader(shards / "test", batch_size=10, train=False))
    b = decoded_split(build_loader(shards / "test", batch_size=99, train=True, seed=4))
    assert a[0] is b[0] and a[0].dtype == torch.uint8 and tuple(a[0].shape) == (200, 1, 28, 28)
    assert decoded_nbytes(build_loader(shards / "test", batch_size=10, train=False)) == 200 * 28 * 28


def test_a_corrupt_shard_is_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    split = tmp_path / "train"
    shutil.copytree(shards / "train", split)
    p = split / "shard-000001.tar"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.warns(RuntimeWarning, match="shard-000001.tar"):
        loader = MemoryLoader(build_loader(split, batch_size=16, train=True))
    assert loader.stats.corrupt_shards == 1 and 372 <= loader.images.shape[0] < 500
    assert len(loader) == loader.images.shape[0] // 16 and sum(1 for _ in loader) == len(loader)
