"""Shards in an object store: a real S3-compatible server (moto's server mode) on loopback.

Nothing here mocks S3 inside the process: the converter, the manifest reader and the loader
(including its DataLoader worker processes) talk HTTP to ``moto.server.ThreadedMotoServer`` on
127.0.0.1, found through the standard ``AWS_ENDPOINT_URL`` variable, exactly as they would
talk to AWS, MinIO or Ceph.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from _helpers import free_port

pytest.importorskip("s3fs", reason="needs the s3 extra: pip install -e '.[dev]'")
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
# A server on loopback: the fast subset (-m 'not slow') leaves these out.
pytestmark = pytest.mark.slow

from mixersnn.cli import main as cli_main  # noqa: E402
from mixersnn.data import (  # noqa: E402
    ManifestError,
    MissingShardError,
    TransformConfig,
    build_loader,
    make_shards,
    read_manifest,
)
from _synthetic import collect, small_fashion_mnist  # noqa: E402

RAW = TransformConfig(mean=(0.0,), std=(1.0,))  # no augmentation, no normalisation: pixels / 255
BUCKET = "mixersnn-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3 endpoint on loopback with one empty bucket; yields the endpoint URL."""
    import s3fs

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    # os.environ, so DataLoader worker processes see the same endpoint and credentials.
    for k, v in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(k, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # no client bound to another endpoint
    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        mp.undo()
        server.stop()


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory):
    return small_fashion_mnist(tmp_path_factory.mktemp("idx") / "fmnist", n_train=300, n_test=120)


@pytest.fixture(scope="module")
def uploaded(s3: str, fmnist) -> str:
    """Fashion-MNIST shards written straight to the bucket by the CLI converter."""
    root, _ = fmnist
    url = f"s3://{BUCKET}/fmnist"
    rc = cli_main(["data", "make-shards", str(root), "--out", url, "--samples-per-shard", "128",
                   "--workers", "1", "--no-progress"])  # fmt: skip
    assert rc == 0
    return url


def _pixels(loader) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    x, y = collect(loader)
    return np.rint(x * 255).astype(np.uint8), y


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shards_written_to_s3_read_back_exactly(uploaded: str, fmnist, num_workers: int) -> None:
    _, arrays = fmnist
    for split, (x, y) in arrays.items():
        m = read_manifest(f"{uploaded}/{split}", verify=True)  # every shard's sha256, streamed from S3
        assert m.root == f"{uploaded}/{split}" and m.num_samples == len(y) and m.image_size == (28, 28)
        assert m.shard_urls()[0] == f"{uploaded}/{split}/shard-000000.tar"
        loader = build_loader(f"{uploaded}/{split}", batch_size=50, train=False, transform=RAW, num_workers=num_workers)
        got_x, got_y = _pixels(loader)
        order = np.random.default_rng(0).permutation(len(y))  # the converter's seeded shuffle
        if num_workers == 0:  # one reader: exactly the shard order
            np.testing.assert_array_equal(got_x[:, 0], x[order])
            np.testing.assert_array_equal(got_y, y[order])
        else:  # workers' batches interleave; every (image, label) pair arrives exactly once
            want = sorted((xi.tobytes(), int(yi)) for xi, yi in zip(x, y))
            assert sorted((xi.tobytes(), int(yi)) for xi, yi in zip(got_x[:, 0], got_y)) == want
        assert loader.stats.corrupt_shards == 0 and loader.stats.samples_seen == len(y)


def test_uploaded_bytes_equal_a_local_conversion(uploaded: str, fmnist, tmp_path: Path) -> None:
    import s3fs

    root, _ = fmnist
    make_shards(root, tmp_path, samples_per_shard=128, workers=1, progress=False)
    fs = s3fs.S3FileSystem()
    for split in ("train", "test"):
        local = sorted(p.name for p in (tmp_path / split).iterdir())
        remote = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/fmnist/{split}", refresh=True))
        assert remote == local  # no staging leftovers, nothing missing
        for name in local:
            assert fs.cat_file(f"{BUCKET}/fmnist/{split}/{name}") == (tmp_path / split / name).read_bytes(), name


def test_manifest_url_and_shard_patterns_in_train_mode(uploaded: str, fmnist) -> None:
    _, arrays = fmnist
    x, y = arrays["train"]
    # Two ranks over a brace pattern of s3:// URLs: counts come from the manifest beside them.
    seen = []
    for rank in range(2):
        loader = build_loader(
            f"{uploaded}/train/shard-{{000000..000002}}.tar", batch_size=16, train=True, transform=RAW,
            rank=rank, world_size=2, shuffle_buffer=1,
        )
        assert loader.manifest is not None and sum(loader.counts) == len(y)
        bx, by = _pixels(loader)
        assert len(by) == len(loader) * 16 == (len(y) // 32) * 16
        seen.append(bx[:, 0].reshape(len(bx), -1))
    # Ranks read disjoint samples, and every one is a real training image.
    keys = [{r.tobytes() for r in s} for s in seen]
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] <= {r.tobytes() for r in x.reshape(len(x), -1)}
    # The manifest file itself is a valid source too.
    assert len(build_loader(f"{uploaded}/test/manifest.json", batch_size=60, train=False)) == 2


def test_upload_and_info_commands(s3: str, fmnist, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, arrays = fmnist
    make_shards(root, tmp_path, samples_per_shard=100, workers=1, progress=False, splits=["test"])
    assert cli_main(["data", "upload", str(tmp_path), f"s3://{BUCKET}/up"]) == 0
    assert cli_main(["data", "info", f"s3://{BUCKET}/up/test", "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"{len(arrays['test'][1])} samples in 2 shards" in out and "[sha256 verified]" in out
    # Re-uploading a split with fewer shards removes the stale ones after the new manifest lands.
    make_shards(root, tmp_path, samples_per_shard=200, workers=1, progress=False, splits=["test"])
    assert cli_main(["data", "upload", str(tmp_path / "test"), f"s3://{BUCKET}/up"]) == 0
    assert [s.name for s in read_manifest(f"s3://{BUCKET}/up/test", verify=True).shards] == ["shard-000000.tar"]
    import s3fs

    assert sorted(p.rsplit("/", 1)[1] for p in s3fs.S3FileSystem().ls(f"{BUCKET}/up/test", refresh=True)) == [
        "manifest.json", "shard-000000.tar",
    ]  # fmt: skip


def test_missing_bucket_key_and_shard_give_clear_errors(uploaded: str, fmnist) -> None:
    with pytest.raises(ManifestError, match=r"bucket 'no-such-bucket' does not exist at endpoint http://127\.0\.0\.1"):
        build_loader("s3://no-such-bucket/fmnist/train", batch_size=8, train=False)
    with pytest.raises(ManifestError, match=rf"no manifest\.json at s3://{BUCKET}/nothing/train/manifest\.json.*bucket '{BUCKET}' does\)"):
        build_loader(f"s3://{BUCKET}/nothing/train", batch_size=8, train=False)
    # The data set root instead of a split: the error names the split prefixes to pass.
    with pytest.raises(ManifestError, match=r"split prefixes \['test', 'train'\]"):
        read_manifest(uploaded)
    with pytest.raises(MissingShardError, match=r"1 of 2 shards do not exist: \['s3://.*/shard-000009\.tar'\]"):
        build_loader([f"{uploaded}/test/shard-000000.tar", f"{uploaded}/test/shard-000009.tar"], batch_size=8, train=False)
    # The converter checks the bucket before converting anything.
    root, _ = fmnist
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        make_shards(root, "s3://no-such-bucket/x", workers=1, progress=False)


def test_local_use_never_imports_fsspec_and_missing_s3fs_names_the_extra(tmp_path: Path) -> None:
    code = """
import sys
sys.modules["s3fs"] = None  # as if the s3 extra were not installed
import mixersnn.data
from mixersnn.data import remote
assert remote.is_remote("s3://b/k") and not remote.is_remote("/data/train") and not remote.is_remote("pipe:cat x")
assert "fsspec" not in sys.modules and sys.modules["s3fs"] is None, "local use imported fsspec"
try:
    mixersnn.data.read_manifest("s3://bucket/fmnist/train")
except ImportError as e:
    print("ERR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR s3://bucket/fmnist/train/manifest.json: s3:// URLs need the s3fs package" in out.stdout
    assert 'pip install "mixersnn[s3]"' in out.stdout


def test_training_loop_reads_an_s3_prefix(uploaded: str, tmp_path: Path) -> None:
    """`mixersnn train --data s3://...`: the loop resolves splits and manifests in the bucket."""
    from trainers.config import TrainConfig
    from trainers.loop import WorkerContext, resolve_data, run_training

    root = uploaded  # the data set prefix holding train/ and test/
    spec = resolve_data(root)
    assert spec.train.startswith("s3://") and spec.eval.startswith("s3://")
    assert (spec.img_size, spec.in_chans, spec.num_classes) == (28, 1, 10)
    cfg = TrainConfig(
        model="mlp_spe_t", model_overrides={"embed_dim": 6, "depths": [1], "T": 1}, data=root,
        epochs=1, batch_size=16, eval_batch_size=64, max_steps_per_epoch=2, log_model=False,
    )
    seen: list[dict] = []
    final = run_training(cfg, WorkerContext(report=lambda m, c: seen.append(m), log=lambda s: None))
    assert [m["epoch"] for m in seen] == [0]
    assert final["test_samples"] == spec.num_eval
