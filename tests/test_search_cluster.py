"""The search on a multi-node Ray cluster: trials spread over nodes, fractional GPUs, and
``max_concurrent_trials: auto`` on a cluster that has to grow first.

One simulated cluster (``ray.cluster_utils.Cluster``) for the module: a head with no CPUs
(the driver's node; no trial fits there) that each test extends with the nodes it needs and
shrinks back afterwards. Nodes declaring GPUs are logical GPUs only: Ray schedules them, no
CUDA runs. The autoscaler request is read back from the GCS, where the autoscaler reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from _helpers import WORKER_ENV, free_port

ray = pytest.importorskip("ray")
pytest.importorskip("optuna")

GPU_SCALE = {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 0.45}

# Ray runtimes and clusters: the fast subset (-m 'not slow') leaves these out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    os.environ.update(WORKER_ENV)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                     "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    try:
        ray.init(address=c.address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@contextlib.contextmanager
def nodes(cluster: Any, *specs: dict) -> Iterator[list]:
    """Add nodes for one test; remove them (and wait until Ray counts them dead) after it."""
    added = [cluster.add_node(**spec) for spec in specs]
    cluster.wait_for_nodes()
    try:
        yield added
    finally:
        for n in added:
            cluster.remove_node(n)
        cluster.wait_for_nodes()


def _search_cfg(**top: Any) -> Any:
    from search.config import load_search_config

    return load_search_config(None, **top)


def _pending_request() -> Any:
    """The autoscaler's resource request as stored in the GCS (autoscaler v1's channel)."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2():
        pytest.skip("the request is read back from autoscaler v1's channel")
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return None if raw is None else json.loads(raw)


# --------------------------------------------------------------------------- auto concurrency
def test_auto_waits_for_the_autoscaler_then_counts_what_is_there(cluster: Any) -> None:
    from search.driver import _max_concurrent
    from search.resources import trial_bundles

    cfg = _search_cfg(scale=GPU_SCALE, budget={"max_concurrent_trials": "auto", "autoscale_wait_s": 60})
    out: dict[str, Any] = {}
    lines: list[str] = []

    def search_start() -> None:
        t0 = time.monotonic()
        try:
            out["n"] = _max_concurrent(cfg, log=lines.append)
        except BaseException as err:  # handed to the test below
            out["error"] = err
        out["waited"] = time.monotonic() - t0

    # The search starts on a cluster that holds no trial; meanwhile (this thread: Ray adds
    # nodes from the main thread only) an "autoscaler" sees the demand and adds a node.
    t = threading.Thread(target=search_start, daemon=True)
    t.start()
    time.sleep(3.0)
    request = _pending_request()
    assert t.is_alive() and not lines[1:], f"auto returned before the cluster could hold a trial: {out} {lines}"
    added = cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        t.join(timeout=60)
        assert not t.is_alive(), "auto kept waiting after the node joined"
        if "error" in out:
            raise out["error"]
        # The head holds nothing: the search asked for exactly one trial's bundles ...
        assert request == trial_bundles(GPU_SCALE) == [{"CPU": 0.01}, {"CPU": 0.45, "GPU": 0.25}]
        # ... waited for the node, and counted what it holds: 1 GPU / 0.25 = 4, 2 CPU / 0.46 = 4.
        assert out["waited"] >= 3.0 and out["n"] == 4
        assert _pending_request() == [], "the request is cleared, so the cluster can scale down again"
        assert "asked the autoscaler" in lines[0] and "4 trial(s) fit" in lines[-1], lines
    finally:
        cluster.remove_node(added)
        cluster.wait_for_nodes()


def test_auto_gives_up_naming_what_a_trial_needs_and_the_fix(cluster: Any) -> None:
    from search.driver import _max_concurrent

    cfg = _search_cfg(scale=GPU_SCALE, budget={"max_concurrent_trials": "auto", "autoscale_wait_s": 2})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        _max_concurrent(cfg, log=lambda s: None)
    assert 2.0 <= time.monotonic() - t0 < 30
    msg = str(info.value)
    for part in ("waited 2 s (budget.autoscale_wait_s)", '{"CPU": 0.45, "GPU": 0.25}', "0.46 CPU, 0.25 GPU",
                 "1 node(s), 0 CPU and 0 GPU in total", "raise budget.autoscale_wait_s",
                 "set budget.max_concurrent_trials to an integer"):
        assert part in msg, (part, msg)
    assert _pending_request() == []
    # An integer is taken as given: no waiting, whatever the cluster holds.
    assert _max_concurrent(_search_cfg(scale=GPU_SCALE, budget={"max_concurrent_trials": 3})) == 3


# --------------------------------------------------------------------------- fractional GPUs
def test_fractional_gpus_map_to_ray_resources_and_auto_concurrency(cluster: Any) -> None:
    from ray.util.placement_group import placement_group, remove_placement_group

    from search.driver import _max_concurrent
    from search.resources import TRIAL_CPU
    from trainers.config import ScaleConfig
    from trainers.ray_train import scaling_config

    sc = scaling_config(ScaleConfig(**GPU_SCALE))
    assert sc.num_workers == 1 and sc.use_gpu is True
    assert sc.resources_per_worker == {"CPU": 0.45, "GPU": 0.25}
    auto = {"max_concurrent_trials": "auto", "autoscale_wait_s": 5}
    with nodes(cluster, {"num_cpus": 4, "num_gpus": 2}):
        # 2 GPUs / 0.25 = 8 trials, and 8 x (0.45 + 0.01) CPU fit in 4.
        assert _max_concurrent(_search_cfg(scale=GPU_SCALE, budget=auto)) == 8
        # Capped by CPUs: 4 / (0.9 + 0.01) = 4, though the GPUs would hold 8.
        assert _max_concurrent(_search_cfg(scale={**GPU_SCALE, "cpus_per_worker": 0.9}, budget=auto)) == 4
        # The number is what Ray really packs: 8 trials' bundles are placed, a 9th is not.
        bundles = [{"CPU": TRIAL_CPU}, *[dict(sc.resources_per_worker)] * sc.num_workers]
        pgs = [placement_group(bundles) for _ in range(8)]
        try:
            ray.get([pg.ready() for pg in pgs], timeout=60)
            extra = placement_group(bundles)
            pgs.append(extra)
            ready, _ = ray.wait([extra.ready()], timeout=3)
            assert not ready, "a 9th trial fitted: auto concurrency undercounts"
        finally:
            for pg in pgs:
                remove_placement_group(pg)


# --------------------------------------------------------------------------- multi-node search
def test_concurrent_trials_run_on_different_nodes(cluster: Any, fmnist_shards: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from search.driver import run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Two worker nodes of 1 CPU and trials of 0.9 + 0.01 CPU: two trials at once only on two
    # different nodes (the head has no CPU). "auto" must find both.
    cfg = _search_cfg(
        name="multinode", experiment="exp-multinode", data=str(fmnist_shards), tracking_uri=uri,
        storage_path=str(tmp_path / "runs"), seed=0,
        space={"spe": False, "num_stages": 2, "blocks_per_stage": 1, "embed_dim": {"low": 6, "high": 12, "step": 6},
               "mlp_ratio": 3, "T": 1, "patch_size": 7, "batch_size": 32, "lr": 0.005, "weight_decay": 0.01,
               "label_smoothing": 0.0},
        train={"epochs": 1, "max_steps_per_epoch": 3, "max_eval_batches": 1, "eval_batch_size": 64,
               "warmup_epochs": 0.0, "log_model": False},
        # Through Ray Train (in_process: false), the path trials with several workers or GPUs
        # take: each trial's TorchTrainer places its worker on a node of its own.
        scale={"num_workers": 1, "cpus_per_worker": 0.9, "in_process": False},
        objective={"mode": "multi", "sampler": "tpe", "startup_trials": 2},
        budget={"num_trials": 2, "max_concurrent_trials": "auto"},
    )
    lines: list[str] = []
    with nodes(cluster, {"num_cpus": 1}, {"num_cpus": 1}) as workers:
        worker_ids = {n.node_id for n in workers}
        res = run_search(cfg, quiet=True, register=False, log=lines.append)
    assert any("2 trials, 2 at a time" in ln for ln in lines), lines

    client = MlflowClient(uri)
    children = [r for r in client.search_runs([client.get_experiment_by_name("exp-multinode").experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(children) == 2
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["mixersnn.trial_status"] == "ok", c.data.tags
        assert c.data.tags["mixersnn.num_nodes"] == "1" and c.data.tags["mixersnn.trial_path"] == "ray-train"
    where = {c.info.run_name: set(c.data.tags["mixersnn.node_ids"].split(",")) for c in children}
    assert set().union(*where.values()) == worker_ids, "each trial's worker ran on one of the two worker nodes"
    # The two child runs (opened when the trial starts, closed when its training ends) overlap
    # in time: the trials ran at once, and so on different nodes.
    (a, b) = children
    overlap_ms = min(a.info.end_time, b.info.end_time) - max(a.info.start_time, b.info.start_time)
    assert overlap_ms > 0, "the trials ran one after the other"
    assert where[a.info.run_name] != where[b.info.run_name]
