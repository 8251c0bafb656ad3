"""The streaming loader: rank splitting, determinism, damage handling, URL kinds, transforms."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mixersnn.data import (
    ImageTransform,
    SampleError,
    TransformConfig,
    build_loader,
    eval_preset,
    read_manifest,
    train_preset,
)
from _synthetic import collect, row_hashes

RAW = TransformConfig(mean=(0.0,), std=(1.0,))


@pytest.fixture(scope="module")
def shards(uneven_shards: Path) -> Path:
    """conftest's uneven Fashion-MNIST shards (500 train / 200 test, shards of 128)."""
    return uneven_shards


@pytest.mark.parametrize("world_size,num_workers", [(3, 0), (2, 2)])
def test_train_ranks_get_equal_full_batches_and_disjoint_samples(shards: Path, world_size: int, num_workers: int) -> None:
    seen: list[bytes] = []
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(shards / "train", batch_size=16, train=True, transform=RAW, rank=rank,
                              world_size=world_size, num_workers=num_workers, seed=3)  # fmt: skip
        sizes = [len(y) for _, y in loader]
        per_rank.append(len(sizes))
        assert len(sizes) == len(loader) == 500 // (world_size * 16)
        assert set(sizes) == {16}
        loader.set_epoch(0)
        x, _ = collect(loader)
        seen += row_hashes(x)
    assert len(set(per_rank)) == 1
    # Within one epoch the ranks read disjoint ranges: no sample twice.
    assert len(seen) == len(set(seen)) == world_size * per_rank[0] * 16


def test_train_order_is_seeded_and_changes_per_epoch(shards: Path) -> None:
    def labels(epoch: int, seed: int = 0) -> np.ndarray:
        return collect(build_loader(shards / "train", batch_size=20, train=True, epoch=epoch, seed=seed))[1]

    np.testing.assert_array_equal(labels(0), labels(0))
    assert not np.array_equal(labels(0), labels(1))
    assert not np.array_equal(labels(0), labels(0, seed=1))
    loader = build_loader(shards / "train", batch_size=20, train=True)
    a, b = collect(loader)[1], collect(loader)[1]  # a new pass advances the epoch
    assert not np.array_equal(a, b) and loader.epoch == 2


@pytest.mark.parametrize("world_size,num_workers,batch_size", [(1, 0, 64), (3, 0, 32), (3, 2, 7), (4, 2, 64)])
def test_eval_sees_every_sample_exactly_once(shards: Path, world_size: int, num_workers: int, batch_size: int) -> None:
    full_x, full_y = collect(build_loader(shards / "test", batch_size=200, train=False, transform=RAW))
    got: Counter[bytes] = Counter()
    labels = []
    counts = []
    for rank in range(world_size):
        loader = build_loader(shards / "test", batch_size=batch_size, train=False, transform=RAW, rank=rank,
                              world_size=world_size, num_workers=num_workers)  # fmt: skip
        batches = list(loader)
        assert len(batches) == len(loader)
        counts.append(sum(len(y) for _, y in batches))
        for x, y in batches:
            got.update(row_hashes(x.numpy()))
            labels.append(y.numpy())
        # Deterministic order: a second pass is identical.
        again = [y for _, y in loader]
        assert all(torch.equal(a[1], b) for a, b in zip(batches, again))
    assert got == Counter(row_hashes(full_x))
    assert max(counts) - min(counts) <= 1
    assert sorted(np.concatenate(labels).tolist()) == sorted(full_y.tolist())


def test_more_workers_than_shards_is_fine(shards: Path) -> None:
    # The test split has 2 shards; 2 ranks x 2 workers = 4 readers.
    n = 0
    for rank in range(2):
        loader = build_loader(shards / "test", batch_size=10, train=False, rank=rank, world_size=2, num_workers=2)
        n += sum(len(y) for _, y in loader)
    assert n == 200


def test_normalisation_uses_manifest_statistics(shards: Path) -> None:
    m = read_manifest(shards / "train")
    x, _ = collect(build_loader(shards / "train", batch_size=100, train=False))  # eval preset: normalise only
    assert x.shape == (500, 1, 28, 28) and x.dtype == np.float32
    assert abs(x.mean()) < 1e-3 and x.std() == pytest.approx(1.0, abs=1e-3)
    raw, _ = collect(build_loader(shards / "train", batch_size=100, train=False, transform=RAW))
    np.testing.assert_allclose(x, (raw - m.mean[0]) / m.std[0], atol=1e-5)


def _damaged_copy(shards: Path, tmp_path: Path, how: str) -> Path:
    split = tmp_path / "train"
    shutil.copytree(shards / "train", split)
    p = split / "shard-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 + 100] if how == "truncate" else b"\x00garbage" * 500)
    return split


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_shard_is_skipped_counted_and_train_keeps_batch_count(shards: Path, tmp_path: Path, how: str) -> None:
    split = _damaged_copy(shards, tmp_path, how)
    for num_workers in (0, 2):
        loader = build_loader(split, batch_size=16, train=True, num_workers=num_workers, world_size=2, rank=0)
        with pytest.warns(RuntimeWarning, match="shard-000001.tar"):
            n = sum(1 for _ in loader)
        # Rank 0's share may or may not touch the damaged shard; run both ranks to be sure.
        other = build_loader(split, batch_size=16, train=True, num_workers=num_workers, world_size=2, rank=1)
        n1 = sum(1 for _ in other) if loader.stats.corrupt_shards else None
        assert n == len(loader) == 500 // 32 and (n1 is None or n1 == n)
        assert loader.stats.corrupt_shards == 1 and loader.stats.corrupt_shard_urls[0].endswith("shard-000001.tar")
        assert "1 corrupt shards" in loader.stats.summary()
    ev = build_loader(split, batch_size=50, train=False)
    with pytest.warns(RuntimeWarning, match="corrupt shard|truncated"):
        _, y = collect(ev)
    assert ev.stats.corrupt_shards == 1 and 500 - 128 <= len(y) < 500 and ev.stats.samples_seen == len(y)


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _png(h: int, w: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "key,members,match",
    [
        ("bad01", [("bad01.png", _png(28, 28)), ("bad01.cls", b"12")], r"bad01: label 12 is outside the classes \[0, 9\]"),
        ("bad02", [("bad02.png", _png(20, 28)), ("bad02.cls", b"3")], r"bad02: image is 20x28 but .* 28x28"),
        ("bad03", [("bad03.png", _png(28, 28)), ("bad03.cls", b"three")], r"bad03: label b'three' is not an integer"),
    ],
)
def test_bad_label_or_shape_is_rejected_with_key(shards: Path, tmp_path: Path, key: str, members, match: str) -> None:  # type: ignore[no-untyped-def]
    split = tmp_path / "test"
    shutil.copytree(shards / "test", split)
    _write_tar(split / "shard-000000.tar", [("ok000.png", _png(28, 28)), ("ok000.cls", b"1")] + members)
    raw = json.loads((split / "manifest.json").read_text())
    raw["shards"][0]["num_samples"] = 2
    raw["num_samples"] = 2 + raw["shards"][1]["num_samples"]
    (split / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SampleError, match=match):
        collect(build_loader(split, batch_size=8, train=False))


def test_file_pipe_and_brace_urls(shards: Path) -> None:
    m = read_manifest(shards / "test")
    ref_x, ref_y = collect(build_loader(shards / "test", batch_size=32, train=False))
    paths = [str(p) for p in m.shard_paths()]
    brace = str(shards / "test" / "shard-{000000..000001}.tar")
    file_urls = ["file://" + p for p in paths]
    for src in (brace, file_urls):
        loader = build_loader(src, batch_size=32, train=False)
        assert loader.manifest is not None  # found next to the shards: same classes and statistics
        x, y = collect(loader)
        np.testing.assert_array_equal(x, ref_x)
        np.testing.assert_array_equal(y, ref_y)
    pipes = [f"pipe:cat {p}" for p in paths]
    pipe = build_loader(pipes, batch_size=32, train=False, transform=RAW)
    assert pipe.manifest is None and len(pipe) == len(ref_y) // 32 + 1  # counts come from one scan
    x, y = collect(pipe)
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_allclose(x, ref_x * m.std[0] + m.mean[0], atol=1e-5)
    # With workers each one reads whole batches of its own range: same samples, batch-interleaved.
    xw, yw = collect(build_loader(pipes, batch_size=32, train=False, transform=RAW, num_workers=2))
    assert Counter(row_hashes(xw)) == Counter(row_hashes(x)) and sorted(yw) == sorted(y)
    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        build_loader([paths[0], paths[0].replace("000000", "000009")], batch_size=8, train=False)
    with pytest.raises(ValueError, match="verify=True needs"):
        build_loader([f"pipe:cat {p}" for p in paths], batch_size=8, train=False, verify=True)


def test_rank_defaults_from_environment(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_loader(shards / "test", batch_size=10, train=False)
    assert (loader.rank, loader.world_size) == (1, 2) and loader.num_samples == 100
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        build_loader(shards / "test", batch_size=10, train=False, rank=2)


def test_batch_larger_than_data_is_a_clear_error(shards: Path) -> None:
    with pytest.raises(ValueError, match=r"batch_size=64 x world_size=4 = 256 exceeds the 200 samples"):
        build_loader(shards / "test", batch_size=64, train=True, world_size=4, rank=0)


# ----------------------------------------------------------------------------- transforms


def test_transform_ops() -> None:
    img = torch.arange(3 * 6 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 6, 8)
    g = torch.Generator().manual_seed(0)
    flip = ImageTransform(TransformConfig(hflip=1.0))(img, g)
    torch.testing.assert_close(flip, img.flip(-1).float() / 255)
    pad = ImageTransform(TransformConfig(pad_crop=2))
    outs = [pad(img, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(o.shape == (3, 6, 8) for o in outs) and len({o.sum().item() for o in outs}) > 1
    torch.testing.assert_close(pad(img, torch.Generator().manual_seed(5)), pad(img, torch.Generator().manual_seed(5)))
    rrc = ImageTransform(TransformConfig(img_size=5, random_resized_crop=True, scale=(0.2, 1.0)))
    assert rrc(img, g).shape == (3, 5, 5)
    cc = ImageTransform(eval_preset(4))  # resize shorter side to round(4 / 0.875) = 5, crop 4
    assert cc(img, g).shape == (3, 4, 4)
    assert ImageTransform(train_preset(10))(img, g).shape == (3, 10, 10)  # 6x8 input: resized to img_size
    assert train_preset(28).pad_crop == 3 and train_preset(224).random_resized_crop
    assert eval_preset(28, source_size=28) == TransformConfig(img_size=28)
    with pytest.raises(ValueError, match=r"scale=\(0.5, 0.2\)"):
        TransformConfig(scale=(0.5, 0.2))


def test_train_preset_runs_through_the_loader(shards: Path) -> None:
    x, y = next(iter(build_loader(shards / "train", batch_size=8, train=True)))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("img_size", [28, 224])
def test_augment_modes_choose_the_train_transform(img_size: int) -> None:
    from mixersnn.data import augment_preset

    crop, flip = augment_preset("crop", img_size), augment_preset("crop-flip", img_size)
    assert (crop.hflip, flip.hflip) == (0.0, 0.5)
    if img_size <= 64:
        assert crop.pad_crop == flip.pad_crop == img_size // 8 and not crop.random_resized_crop
    else:
        assert crop.random_resized_crop and flip.random_resized_crop and crop.pad_crop == 0
    none = augment_preset("none", img_size, source_size=img_size)
    assert none == eval_preset(img_size, source_size=img_size)
    assert (none.pad_crop, none.hflip, none.random_resized_crop) == (0, 0.0, False)
    assert augment_preset("auto", img_size, flip_safe=True) == flip
    assert augment_preset("auto", img_size, flip_safe=False) == augment_preset("auto", img_size) == crop
    assert train_preset(img_size) == flip and train_preset(img_size, flip=False) == crop
    with pytest.raises(ValueError, match=r"augment='flip'.*'auto', 'none', 'crop', 'crop-flip'"):
        augment_preset("flip", img_size)


def _tiny_shards(root: Path, flip_safe) -> Path:  # type: ignore[no-untyped-def]
    from mixersnn.data import SplitSource, write_split

    x = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    for split in ("train", "test"):
        src = SplitSource("d", split, [str(i) for i in range(10)], np.arange(40) % 10, images=x, flip_safe=flip_safe)
        write_split(src, root / split, workers=1, progress=False)
    return root


@pytest.mark.parametrize("flip_safe", [True, False, None])
def test_auto_augment_flips_only_data_whose_manifest_says_flips_are_safe(tmp_path: Path, flip_safe) -> None:  # type: ignore[no-untyped-def]
    from trainers.config import TrainConfig
    from trainers.loop import WorkerContext, build_loaders, resolve_data

    root = _tiny_shards(tmp_path, flip_safe)
    spec = resolve_data(str(root))
    auto_flip = 0.5 if flip_safe else 0.0

    def train_tf(mode: str) -> TransformConfig:
        cfg = TrainConfig(data=str(root), augment=mode, batch_size=8, cache_data=False,
                          model_overrides={"img_size": 28, "in_chans": 1, "num_classes": 10})  # fmt: skip
        return build_loaders(cfg, spec, 28, WorkerContext())[0].transform.config

    assert train_tf("auto").hflip == auto_flip and train_tf("auto").pad_crop == 3
    assert train_tf("crop").hflip == 0.0 and train_tf("crop-flip").hflip == 0.5
    assert train_tf("none") == eval_preset(28, source_size=28)
