"""Shared pytest fixtures: deterministic seeds and a fixed thread count for every test."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded() -> int:
    """Seed torch, numpy and random, and pin torch to 2 threads (CI has 2 cores).

    Autouse, so every test starts from the same state whatever ran before it; tests that want
    a seed value can request the fixture by name. ``MIXERSNN_TEST_THREADS`` overrides the
    thread count: on a machine shared with other jobs, 2 OpenMP threads on 2 busy cores spin
    against each other and the suite runs several times slower than with 1.
    """
    seed = 0
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(int(os.environ.get("MIXERSNN_TEST_THREADS", "2")))
    return seed
