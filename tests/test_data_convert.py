"""Converters and manifests: real idx / ImageFolder / CIFAR inputs -> tar shards on disk."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixersnn.cli import main as cli_main
from mixersnn.data import (
    ChecksumError,
    ManifestError,
    MissingShardError,
    SplitSource,
    TransformConfig,
    build_loader,
    default_shards,
    download_fashion_mnist,
    make_shards,
    read_manifest,
    write_split,
)
from mixersnn.data.idx import FASHION_MNIST_DIR, read_idx
from _synthetic import cifar10_folder, collect, image_folder, small_fashion_mnist

RAW = TransformConfig(mean=(0.0,), std=(1.0,))  # no augmentation, no normalisation: pixels / 255
RAW3 = TransformConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory):
    root, arrays = small_fashion_mnist(tmp_path_factory.mktemp("idx") / "fmnist")
    return root, arrays


def _pixels(loader) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    x, y = collect(loader)
    return np.rint(x * 255).astype(np.uint8), y


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_fashion_mnist_round_trip_is_exact(fmnist, tmp_path: Path, encoding: str) -> None:
    root, arrays = fmnist
    ms = make_shards(root, tmp_path, dataset="fashion-mnist", samples_per_shard=128, encoding=encoding, workers=1, progress=False)
    assert set(ms) == {"train", "test"}
    for split, (x, y) in arrays.items():
        m = read_manifest(tmp_path / split, verify=True)
        assert m.num_samples == len(y) and m.image_size == (28, 28) and m.channels == 1
        assert m.classes[0] == "T-shirt/top" and m.num_classes == 10
        assert [s.num_samples for s in m.shards][:1] == [128] and sum(s.num_samples for s in m.shards) == len(y)
        assert m.mean[0] == pytest.approx(x.mean() / 255, abs=1e-5)
        assert m.std[0] == pytest.approx((x / 255).std(), abs=1e-4)
        got_x, got_y = _pixels(build_loader(tmp_path / split, batch_size=64, train=False, transform=RAW))
        order = np.random.default_rng(0).permutation(len(y))  # the converter's seeded shuffle
        np.testing.assert_array_equal(got_x[:, 0], x[order])
        np.testing.assert_array_equal(got_y, y[order])


def test_conversion_is_byte_identical_across_runs_and_worker_counts(fmnist, tmp_path: Path) -> None:
    root, _ = fmnist
    make_shards(root, tmp_path / "a", samples_per_shard=150, workers=1, progress=False, splits=["train"])
    make_shards(root, tmp_path / "b", samples_per_shard=150, workers=2, progress=False, splits=["train"])
    a, b = sorted((tmp_path / "a/train").iterdir()), sorted((tmp_path / "b/train").iterdir())
    assert [p.name for p in a] == [p.name for p in b] == ["manifest.json"] + [f"shard-00000{i}.tar" for i in range(4)]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    with tarfile.open(a[1]) as t:
        infos = t.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.uname) for i in infos} == {(0, 0, 0, "")}
    assert infos[0].name.endswith(".png") and infos[1].name.endswith(".cls")


def test_different_seed_changes_order_not_content(fmnist, tmp_path: Path) -> None:
    root, arrays = fmnist
    make_shards(root, tmp_path / "s1", seed=1, workers=1, progress=False, splits=["test"])
    make_shards(root, tmp_path / "s0", seed=0, workers=1, progress=False, splits=["test"])
    x1, y1 = _pixels(build_loader(tmp_path / "s1/test", batch_size=50, train=False, transform=RAW))
    x0, y0 = _pixels(build_loader(tmp_path / "s0/test", batch_size=50, train=False, transform=RAW))
    assert not np.array_equal(y0, y1)
    assert sorted(map(bytes, x0.reshape(len(x0), -1))) == sorted(map(bytes, x1.reshape(len(x1), -1)))


def test_image_folder_png_round_trip_and_jpeg_bytes_kept(tmp_path: Path) -> None:
    truth = image_folder(tmp_path / "png", fmt="png", n_per_class=5)
    ms = make_shards(tmp_path / "png", tmp_path / "out_png", samples_per_shard=4, workers=2, progress=False)
    assert set(ms) == {"train", "val"}
    m = read_manifest(tmp_path / "out_png/train")
    assert m.classes == ("cat", "dog", "emu") and m.channels == 3 and m.image_size == (24, 24) and m.encoding == "keep"
    x, y = _pixels(build_loader(tmp_path / "out_png/train", batch_size=4, train=False, transform=RAW3))
    want = {px.tobytes(): lab for p, (px, lab) in truth.items() if "/train/" in p}
    got = {xi.transpose(1, 2, 0).tobytes(): int(yi) for xi, yi in zip(x, y)}
    assert got == want

    jtruth = image_folder(tmp_path / "jpg", fmt="jpg", n_per_class=3, sizes=[(40, 30), (30, 50)])
    make_shards(tmp_path / "jpg", tmp_path / "out_jpg", workers=1, progress=False)
    mj = read_manifest(tmp_path / "out_jpg/val")
    assert mj.image_size is None  # mixed sizes
    files = {Path(p).read_bytes() for p in jtruth if "/val/" in p}
    with tarfile.open(mj.shard_paths()[0]) as t:
        stored = {t.extractfile(i).read() for i in t.getmembers() if i.name.endswith(".jpg")}  # type: ignore[union-attr]
    assert stored == files  # "keep": the JPEG bytes are not re-encoded
    # Variable sizes + default eval transform: resized and centre-cropped to 224.
    xb, yb = next(iter(build_loader(tmp_path / "out_jpg/val", batch_size=3, train=False)))
    assert xb.shape == (3, 3, 224, 224) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_image_folder_resized_jpeg_encoding(tmp_path: Path) -> None:
    image_folder(tmp_path / "src", fmt="jpg", n_per_class=2, sizes=[(40, 30), (30, 50)], splits=("train",))
    ms = make_shards(tmp_path / "src", tmp_path / "out", encoding="jpeg", img_size=16, workers=1, progress=False)
    m = ms["train"]
    assert m.image_size == (16, 16) and m.encoding == "jpeg" and m.extra["img_size"] == 16
    x, _ = collect(build_loader(tmp_path / "out/train", batch_size=6, train=False))
    assert x.shape == (6, 3, 16, 16)


def test_cifar10_pickles_round_trip(tmp_path: Path) -> None:
    root, arrays = cifar10_folder(tmp_path / "cifar-10-batches-py")
    ms = make_shards(root, tmp_path / "out", samples_per_shard=30, workers=1, progress=False)
    assert ms["train"].num_samples == 80 and ms["test"].num_samples == 40 and ms["train"].classes[3] == "class3"
    for split, (x, y) in arrays.items():
        gx, gy = _pixels(build_loader(tmp_path / "out" / split, batch_size=16, train=False, transform=RAW3))
        order = np.random.default_rng(0).permutation(len(y))
        np.testing.assert_array_equal(gx.transpose(0, 2, 3, 1), x[order])
        np.testing.assert_array_equal(gy, y[order])


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    root, _ = cifar10_folder(tmp_path / "c")
    import os
    import pickle

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("true",))

    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        make_shards(root, tmp_path / "out", workers=1, progress=False)


def test_failed_conversion_leaves_no_shard_and_no_manifest(tmp_path: Path) -> None:
    image_folder(tmp_path / "src", fmt="png", n_per_class=4, splits=("train",))
    bad = tmp_path / "src/train/emu/img3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    # An earlier good conversion is there: a failed rerun must not leave it looking valid.
    (out / "train").mkdir(parents=True)
    (out / "train/manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="img3.png"):
        make_shards(tmp_path / "src", out, samples_per_shard=3, workers=2, progress=False, shuffle=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == []
    with pytest.raises(ManifestError, match="make-shards"):
        read_manifest(out / "train")


def test_bad_label_at_conversion_names_sample_and_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"index 2 has label 10, outside \[0, 9\]"):
        SplitSource("d", "train", [str(i) for i in range(10)], np.array([0, 1, 10]), images=np.zeros((3, 4, 4), np.uint8))


def test_manifest_errors(fmnist, tmp_path: Path) -> None:
    root, _ = fmnist
    m = make_shards(root, tmp_path, samples_per_shard=100, workers=1, progress=False, splits=["test"])["test"]
    split = tmp_path / "test"
    # Checksum mismatch: flip one byte inside an image payload (the tar stays readable).
    p = m.shard_paths()[1]
    data = bytearray(p.read_bytes())
    data[700] ^= 0xFF
    p.write_bytes(bytes(data))
    read_manifest(split)  # without verify nothing is read
    with pytest.raises(ChecksumError, match="shard-000001.tar.*make-shards"):
        build_loader(split, batch_size=10, train=False, verify=True)
    # Missing shard.
    p.unlink()
    with pytest.raises(MissingShardError, match="shard-000001.tar"):
        build_loader(split, batch_size=10, train=False)
    # Empty manifest.
    raw = json.loads((split / "manifest.json").read_text())
    raw.update(shards=[], num_samples=0)
    (split / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="empty"):
        build_loader(split, batch_size=10, train=False)
    with pytest.raises(ManifestError, match="split folders"):
        read_manifest(tmp_path)


def test_cli_make_shards_and_info(fmnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = fmnist
    out = tmp_path / "shards"
    rc = cli_main(["data", "make-shards", str(root), "--out", str(out), "--samples-per-shard", "200",
                   "--limit", "train=300,test=100", "--workers", "1", "--no-progress", "--name", "fmnist-small"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "fmnist-small/train: 300 samples in 2 shards" in text and "fmnist-small/test: 100 samples" in text
    assert cli_main(["data", "info", str(out / "train"), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 300 and [s["num_samples"] for s in info["shards"]] == [200, 100]


def test_default_shards_builds_once_and_repairs(fmnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = fmnist
    monkeypatch.setenv("MIXERSNN_DATA", str(tmp_path / "cache"))
    out = default_shards(source_dir=root, workers=1)
    assert out == tmp_path / "cache" / "fashion-mnist"
    m = read_manifest(out / "train", verify=True)
    assert m.dataset == "fashion-mnist" and m.num_samples == 500
    stamp = (out / "train" / m.shards[0].name).stat().st_mtime_ns
    assert default_shards(source_dir=root, workers=1) == out
    assert (out / "train" / m.shards[0].name).stat().st_mtime_ns == stamp  # reused, not rewritten
    (out / "test" / "shard-000000.tar").write_bytes(b"garbage")
    default_shards(source_dir=root, workers=1)
    assert read_manifest(out / "test", verify=True).num_samples == 200


def test_download_from_a_file_url(tmp_path: Path) -> None:
    dest = download_fashion_mnist(tmp_path / "dl", base_url=FASHION_MNIST_DIR.resolve().as_uri())
    assert read_idx(dest / "t10k-labels-idx1-ubyte.gz").shape == (10000,)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    )
    # A mirror serving the wrong arrays is refused and leaves nothing behind.
    small, _ = small_fashion_mnist(tmp_path / "small", n_train=10, n_test=10)
    with pytest.raises(ValueError, match=r"shape \[10, 28, 28\], expected \[60000, 28, 28\]"):
        download_fashion_mnist(tmp_path / "dl2", base_url=small.as_uri())
    assert list((tmp_path / "dl2").iterdir()) == []


def test_corrupt_image_bytes_are_skipped_and_counted(tmp_path: Path) -> None:
    """A shard whose tar is intact but one PNG is garbage: that sample is skipped, not fatal."""
    split = tmp_path / "s"
    src = SplitSource("d", "train", ["a", "b"], np.array([0, 1, 0, 1]), images=np.full((4, 8, 8), 7, np.uint8))
    m = write_split(src, split, samples_per_shard=4, shuffle=False, workers=1, progress=False)
    p = m.shard_paths()[0]
    with tarfile.open(p) as t:
        members = [(i, t.extractfile(i).read()) for i in t.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(p, "w") as t:
        for info, data in members:
            if info.name == "00000002.png":
                data = b"\x89PNG garbage"
                info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    loader = build_loader(split, batch_size=2, train=False)
    with pytest.warns(RuntimeWarning, match="00000002"):
        x, y = collect(loader)
    assert len(y) == 3 and loader.stats.corrupt_samples == 1 and loader.stats.corrupt_sample_keys[0].endswith("#00000002")


# ----------------------------------------------------------------------------- flip safety, channels


def _split_source(name: str, n: int = 8, **kw) -> SplitSource:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)
    return SplitSource(name, "train", ["a", "b"], np.arange(n) % 2, images=x, **kw)


@pytest.mark.parametrize("flip_safe", [True, False, None])
def test_manifest_flip_safe_round_trips(tmp_path: Path, flip_safe) -> None:  # type: ignore[no-untyped-def]
    m = write_split(_split_source("d", flip_safe=flip_safe), tmp_path / "s", workers=1, progress=False)
    assert m.flip_safe is flip_safe
    assert json.loads((tmp_path / "s/manifest.json").read_text())["flip_safe"] is flip_safe
    assert read_manifest(tmp_path / "s").flip_safe is flip_safe


def test_old_manifest_without_flip_safe_reads_as_unknown_and_bad_values_are_refused(tmp_path: Path) -> None:
    write_split(_split_source("d", flip_safe=True), tmp_path / "s", workers=1, progress=False)
    path = tmp_path / "s/manifest.json"
    raw = json.loads(path.read_text())
    del raw["flip_safe"]  # a manifest from a mixersnn that did not write the key
    path.write_text(json.dumps(raw))
    assert read_manifest(tmp_path / "s", verify=True).flip_safe is None
    raw["flip_safe"] = "yes"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"flip_safe='yes'.*true, false or null"):
        read_manifest(tmp_path / "s")


def test_fashion_mnist_and_cifar_shards_are_flip_safe_other_idx_data_unknown(fmnist, tmp_path: Path) -> None:
    root, _ = fmnist
    kw = dict(workers=1, progress=False, limit=50)
    ms = make_shards(root, tmp_path / "fm", dataset="fashion-mnist", **kw)
    assert ms["train"].flip_safe is True and read_manifest(tmp_path / "fm/test").flip_safe is True
    # The same idx layout under another name (MNIST digits, say): nobody knows, so unknown.
    assert make_shards(root, tmp_path / "digits", dataset="digits", **kw)["train"].flip_safe is None
    assert make_shards(root, tmp_path / "no", dataset="fashion-mnist", flip_safe=False, **kw)["train"].flip_safe is False
    croot, _ = cifar10_folder(tmp_path / "cifar-10-batches-py")
    assert {m.flip_safe for m in make_shards(croot, tmp_path / "c", **kw).values()} == {True}
    # Image folders: unknown unless the caller says.
    image_folder(tmp_path / "imgs", fmt="png", n_per_class=2, splits=("train",))
    assert make_shards(tmp_path / "imgs", tmp_path / "i0", **kw)["train"].flip_safe is None
    assert make_shards(tmp_path / "imgs", tmp_path / "i1", flip_safe=True, **kw)["train"].flip_safe is True


def test_default_fashion_mnist_shards_are_flip_safe_also_when_built_before(fmnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = fmnist
    monkeypatch.setenv("MIXERSNN_DATA", str(tmp_path / "cache"))
    out = default_shards(source_dir=root, workers=1)
    assert read_manifest(out / "train").flip_safe is True and read_manifest(out / "test").flip_safe is True
    # Cached shards whose manifest lacks flip_safe are kept, and their manifest gets the key.
    path = out / "train/manifest.json"
    raw = json.loads(path.read_text())
    del raw["flip_safe"]
    path.write_text(json.dumps(raw))
    stamp = (out / "train/shard-000000.tar").stat().st_mtime_ns
    default_shards(source_dir=root, workers=1)
    assert read_manifest(out / "train", verify=True).flip_safe is True
    assert (out / "train/shard-000000.tar").stat().st_mtime_ns == stamp


def _grey_folder(root: Path, modes=("L", "1", "I;16"), splits=("train",)) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """``root/<split>/<class>/*.png`` in the given PIL modes; returns path -> pixels as 8-bit grey."""
    rng = np.random.default_rng(1)
    truth = {}
    for split in splits:
        for ci, c in enumerate(("a", "b")):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i, mode in enumerate(modes):
                px = rng.integers(0, 256, (10, 12), dtype=np.uint8)
                if mode == "1":
                    im = Image.fromarray(px).convert("1")
                elif mode == "I;16":
                    im = Image.fromarray(px.astype(np.uint16))  # 16-bit grey, values within 0-255
                else:
                    im = Image.fromarray(px).convert(mode)
                p = d / f"img{i}.png"
                im.save(p)
                truth[str(p)] = np.asarray(Image.open(p).convert("L"))
    return truth


def test_grayscale_image_folder_keeps_one_channel_rgb_stays_three(tmp_path: Path) -> None:
    truth = _grey_folder(tmp_path / "grey")
    assert {Image.open(p).mode for p in truth} == {"L", "1", "I;16"}
    m = make_shards(tmp_path / "grey", tmp_path / "out", workers=1, progress=False)["train"]
    assert m.channels == 1 and len(m.mean) == 1 and m.image_size == (10, 12)
    x, _ = _pixels(build_loader(tmp_path / "out/train", batch_size=6, train=False, transform=RAW))
    assert x.shape == (6, 1, 10, 12)
    assert sorted(map(bytes, x[:, 0])) == sorted(map(bytes, truth.values()))
    image_folder(tmp_path / "rgb", fmt="png", n_per_class=2, splits=("train",))
    assert make_shards(tmp_path / "rgb", tmp_path / "out_rgb", workers=1, progress=False)["train"].channels == 3
    # Splits share one channel count (the model is built for one): one colour image in val
    # makes both splits RGB; an all-grey tree stays grey in both.
    _grey_folder(tmp_path / "tree", modes=("L", "L"), splits=("train", "val"))
    ms = make_shards(tmp_path / "tree", tmp_path / "out_tree", workers=1, progress=False)
    assert {s: m.channels for s, m in ms.items()} == {"train": 1, "val": 1}
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "tree/val/b/colour.png")
    ms = make_shards(tmp_path / "tree", tmp_path / "out_tree", workers=1, progress=False)
    assert {s: m.channels for s, m in ms.items()} == {"train": 3, "val": 3}


def test_channels_can_be_forced_for_folders_only(tmp_path: Path) -> None:
    _grey_folder(tmp_path / "grey", modes=("L",))
    image_folder(tmp_path / "rgb", fmt="png", n_per_class=2, splits=("train",))
    assert make_shards(tmp_path / "grey", tmp_path / "g3", channels=3, workers=1, progress=False)["train"].channels == 3
    m = make_shards(tmp_path / "rgb", tmp_path / "r1", channels=1, workers=1, progress=False)["train"]
    assert m.channels == 1 and len(m.std) == 1
    croot, _ = cifar10_folder(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ValueError, match=r"channels=1.*cifar.*3"):
        make_shards(croot, tmp_path / "c", channels=1, workers=1, progress=False)


def test_cli_make_shards_flip_safe_and_channels(fmnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _grey_folder(tmp_path / "grey", modes=("L",))
    common = ["--workers", "1", "--no-progress"]
    assert cli_main(["data", "make-shards", str(tmp_path / "grey"), "--out", str(tmp_path / "a"), *common]) == 0
    a = read_manifest(tmp_path / "a/train")
    assert (a.channels, a.flip_safe) == (1, None)
    assert "flips unknown" in capsys.readouterr().out
    assert cli_main(["data", "make-shards", str(tmp_path / "grey"), "--out", str(tmp_path / "b"),
                     "--flip-safe", "--channels", "3", *common]) == 0  # fmt: skip
    b = read_manifest(tmp_path / "b/train")
    assert (b.channels, b.flip_safe) == (3, True)
    assert "flips label-safe" in capsys.readouterr().out
    root, _ = fmnist
    assert cli_main(["data", "make-shards", str(root), "--out", str(tmp_path / "c"), "--name", "fashion-mnist",
                     "--limit", "50", "--no-flip-safe", *common]) == 0  # fmt: skip
    assert read_manifest(tmp_path / "c/train").flip_safe is False
    with pytest.raises(SystemExit):
        cli_main(["data", "make-shards", str(root), "--out", str(tmp_path / "d"), "--channels", "2"])
