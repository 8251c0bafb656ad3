"""Helpers several test files share (fixtures live in conftest.py; plain functions here).

- :func:`fmnist` / :func:`train_briefly`: real Fashion-MNIST test images in memory and a few
  SGD steps on them, for tests that need a model with moved weights and BN statistics.
- :func:`tiny_train_config`: the smallest sensible ``TrainConfig`` on a shard folder.
- :func:`free_port`: a free loopback port for a test's server or Ray dashboard.
- :data:`WORKER_ENV` / :func:`start_local_ray`: the Ray tests' worker environment and local runtime.
- :func:`lif_option_grid`: neuron options over every reset x decay x detach x surrogate choice.
- :func:`lif_inputs` / :func:`lif_grads`: LIF inputs that hit the threshold exactly, and one
  forward + backward of a LIF function (the CPU and GPU kernel suites).
- :data:`KERNEL_TOL`: how far the fused kernels' stored results may be from the fp32 reference,
  by storage dtype (the GPU suite and the CPU run of the 16-bit kernels share it).
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from search.driver import LOCAL_WORKER_ENV

# v_final and gradients of the fused kernels against the fp32 reference: fp32 arithmetic
# everywhere, the only error is rounding to storage (u saved in 16 bits feeds the surrogate;
# gradients are accumulated over up to 16 steps).
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def lif_option_grid(*constants: Callable[[Any, bool, bool, str], dict[str, Any]]) -> list:
    """Resolved LIF options for every (hard or soft reset, decay_input, detach_reset,
    surrogate) choice, once per ``constants``: a function of that choice, ``(v_reset (0.0 or
    None), decay_input, detach_reset, surrogate)``, giving the rest (``v_reset`` included)."""
    from mixersnn.neurons import make_lif_params

    choices = itertools.product((0.0, None), (True, False), (True, False), ("sigmoid", "atan"))
    return [make_lif_params(decay_input=decay, detach_reset=detach, surrogate=sg, **c(v_reset, decay, detach, sg))
            for v_reset, decay, detach, sg in choices for c in constants]


def lif_inputs(steps: int, n: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """LIF input currents ``[steps, n]`` that make neurons fire sometimes, with some values on a
    0.25 grid so the membrane hits the threshold exactly (the ``>=`` and -0 cases). Drawn on
    ``device`` with its own generator (a CUDA generator draws other numbers than the CPU's)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(steps, n, generator=g, device=device) * 1.5 + 0.7
    grid = torch.randint(-4, 12, (steps, n), generator=g, device=device).float() * 0.25
    use_grid = torch.rand(steps, n, generator=g, device=device) < 0.3
    return torch.where(use_grid, grid, x).to(dtype)


def lif_grads(fn: Any, x: torch.Tensor, v0: torch.Tensor | None, p: Any, gs: torch.Tensor, gv: torch.Tensor) -> tuple:
    """``(spikes, v_final, grad_x, grad_v0)`` of the LIF function ``fn(x, v0, params)`` for the
    upstream gradients ``gs`` (on the spikes) and ``gv`` (on v_final), cast to the outputs'
    dtypes; the inputs are copied, so the caller's tensors are left alone. ``v0`` None is
    passed on as None (the backend starts from rest) and ``grad_v0`` is then None."""
    x = x.detach().clone().requires_grad_()
    v0 = None if v0 is None else v0.detach().clone().requires_grad_()
    s, v = fn(x, v0, p)
    inputs = [x] if v0 is None else [x, v0]
    grads = torch.autograd.grad([s, v], inputs, [gs.to(s.dtype), gv.to(v.dtype)])
    return s, v, grads[0], None if v0 is None else grads[1]


# Training steps use test images from here on; checks use images below it.
TRAIN_FROM = 5000
# A two-stage MLP-SPE-T that trains in a second or two per epoch on 1024 images.
TINY_MODEL = {"embed_dim": 12, "depths": [1, 1], "T": 2}


@functools.lru_cache(maxsize=1)
def _test_split() -> tuple[np.ndarray, np.ndarray]:
    # The 10k test split loads in ~1 s; the 60k training split takes ~6 s on 2 cores.
    from mixersnn.data import FASHION_MNIST_DIR, load_idx_split

    return load_idx_split(FASHION_MNIST_DIR, "test")


def fmnist(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real Fashion-MNIST test images, normalised: ``[n, 1, 28, 28]`` float32, ``[n]`` int64."""
    x, y = _test_split()
    img = torch.from_numpy(x[start : start + n]).float().div(255).sub(0.2860).div(0.3530)
    return img.unsqueeze(1), torch.from_numpy(y[start : start + n])


def train_briefly(model: nn.Module, steps: int = 4, batch: int = 16) -> nn.Module:
    """A few SGD steps on real images (from :data:`TRAIN_FROM`), so weights and BN running
    statistics are non-trivial; returns the model in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for i in range(steps):
        x, y = fmnist(TRAIN_FROM + i * batch, batch)
        loss = nn.functional.cross_entropy(model(x).mean(0), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_train_config(data: Path, **kw: Any):
    """A ``TrainConfig`` for :data:`TINY_MODEL` on the shards in ``data``; ``kw`` overrides."""
    from trainers.config import TrainConfig

    base: dict[str, Any] = dict(
        model="mlp_spe_t",
        model_overrides=dict(TINY_MODEL),
        data=str(data),
        epochs=2,
        batch_size=32,
        eval_batch_size=128,
        lr=5e-3,
        warmup_epochs=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


# What the tests' Ray workers inherit: the environment the search gives a local runtime's
# workers (one torch thread each, fast Ray Train health checks, no preemption watcher).
WORKER_ENV = dict(LOCAL_WORKER_ENV)


def start_local_ray(extra_env: dict[str, str] | None = None) -> None:
    """A fresh local Ray runtime of 2 CPUs, its dashboard on a free loopback port, workers
    with :data:`WORKER_ENV` plus ``extra_env``. ``address="local"``: a bare ``ray.init()``
    would join any cluster that ``ray start`` recorded on this machine."""
    import os

    import ray

    os.environ.update(WORKER_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), runtime_env={"env_vars": {**WORKER_ENV, **(extra_env or {})}},
             log_to_driver=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for servers and Ray dashboards in tests: a
    fixed port, such as Ray's default 8265, collides with anything else holding it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_mlflow_server(root: Path, port: int | None = None) -> tuple[Any, str]:
    """A real ``mlflow server`` on 127.0.0.1 with its sqlite store and artefacts in ``root``
    (the same root and port bring the same server back), healthy before this returns:
    ``(process, url)``. One worker and no background job runners on CI's 2 cores."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import pytest

    port = port or free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its web workers are child processes: stop_process ends the group
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server on {url} did not become healthy")
        time.sleep(0.5)


def stop_process(proc: Any, timeout: float = 20, *, kill: bool = False) -> None:
    """End ``proc`` and the process group it leads (a server and its workers): SIGTERM, then
    SIGKILL if it has not ended within ``timeout`` seconds; ``kill``: SIGKILL at once."""
    import os
    import signal
    import subprocess

    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    if not kill:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    send(signal.SIGKILL)
    proc.wait()


def default_sigint() -> None:
    """A ``preexec_fn`` for processes a test interrupts: SIGINT back to its default. A process
    started with SIGINT ignored (children of a non-interactive shell's background job, as in
    CI) passes that on, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
