"""Shared pytest fixtures: seeds and threads for every test, real Fashion-MNIST shards, and one
real ``mlflow server`` on loopback for the tests that need a tracking server."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch



@pytest.fixture(autouse=True)
def seeded() -> int:
    """Seed torch, numpy and random, and pin torch to 1 thread.

    One thread, because the suite also runs Ray workers and data-loader processes beside
    pytest on CI's 2 cores: 2 OpenMP threads on 2 busy cores spin against each other and
    run tens of times slower (measured: 1968 ms vs 49 ms for one small training step).

    Autouse, so every test starts from the same state whatever ran before it; tests that want
    a seed value can request the fixture by name. ``MIXERSNN_TEST_THREADS`` overrides the
    thread count.
    """
    seed = 0
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(int(os.environ.get("MIXERSNN_TEST_THREADS", "1")))
    return seed


def make_fmnist_shards(out, *, train: int, test: int, per_shard: int):
    """Real Fashion-MNIST: the first ``train``/``test`` images as shards under ``out``."""
    from mixersnn.data import make_shards

    make_shards(None, out, limit={"train": train, "test": test}, samples_per_shard=per_shard, progress=False)
    return out


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory: pytest.TempPathFactory):
    """Real Fashion-MNIST slices (500 train / 200 test) in uneven shards of 128 (128, 128,
    128, 116): the loaders' tests read every split and rank rule off them."""
    from mixersnn.data import make_shards
    from _synthetic import small_fashion_mnist

    base = tmp_path_factory.mktemp("fm-uneven")
    root, _ = small_fashion_mnist(base / "idx")
    make_shards(root, base / "shards", samples_per_shard=128, workers=1, progress=False)
    return base / "shards"


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory):
    """Real Fashion-MNIST, first 1024 train / 256 test images in shards of 128 (8 + 2)."""
    return make_fmnist_shards(tmp_path_factory.mktemp("fmnist"), train=1024, test=256, per_shard=128)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` (sqlite backend, proxied artefacts) on 127.0.0.1, shared by the
    session: it takes 10-40 s to come up on 2 cores. Tests keep apart by experiment name."""
    from _helpers import start_mlflow_server, stop_process

    proc, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop_process(proc)
