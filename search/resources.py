"""What one search trial asks of Ray, how many fit on a cluster, and waiting for an
autoscaling cluster to hold the first one (``budget.max_concurrent_trials: auto``).

A trial with one CPU worker trains in its own Tune process and holds that worker's resources,
one bundle ``[{CPU: cpus_per_worker}]``. A larger trial is a Tune function holding
:data:`TRIAL_CPU` CPU that runs one Ray Train ``TorchTrainer`` (its controller takes no
resources) with ``scale.num_workers`` workers of :func:`trainers.ray_train.worker_resources`
each, so it needs the bundles
``[{CPU: 0.01}] + num_workers x [{CPU: cpus_per_worker, GPU: gpus_per_worker}]``.

Auto concurrency counts, node by node, how many worker bundles fit in each node's total
resources (a worker never spans nodes), divides by the workers per trial, and caps that by
the cluster's CPUs including each trial's 0.01. It is computed once, when the search starts:
a cluster that grows later does not raise it (set an integer when the final cluster size is
known; Tune then queues the trials and the autoscaler adds nodes for them).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

__all__ = ["TRIAL_CPU", "SEARCH_SCALE_KEYS", "scale_config", "trial_bundles", "concurrency", "alive_node_resources", "wait_for_one_trial",
           "max_concurrent_auto"]

# The CPU the trial function itself holds (``tune.with_resources(..., {"CPU": 0.01})`` in the
# driver; ``{"CPU": 0}`` is refused by Tune).
TRIAL_CPU = 0.01
_EPS = 1e-9


#: Keys of a search's ``scale:`` section that are not ScaleConfig fields: where a trial trains
#: (``in_process``: auto, true or false; see :func:`search.trial.in_process`).
SEARCH_SCALE_KEYS = ("in_process",)


def scale_config(scale: dict[str, Any], **fields: Any) -> Any:
    """The ``ScaleConfig`` of one trial's training from the search's ``scale:`` section (the
    search sets ``storage_path`` and ``name`` per trial, through ``fields``)."""
    from trainers.config import ScaleConfig

    kept = {k: v for k, v in scale.items() if k not in ("storage_path", "name", *SEARCH_SCALE_KEYS)}
    return ScaleConfig(**kept, **fields)


def trial_bundles(scale: dict[str, Any]) -> list[dict[str, float]]:
    """The Ray resource bundles one trial holds: the trial function's, then one per worker.
    A trial that trains in its own process (one CPU worker, :func:`search.trial.in_process`)
    is one bundle, the worker's.

    Args:
        scale: the search's ``scale:`` section (ScaleConfig fields).
    """
    from search.trial import in_process
    from trainers.ray_train import worker_resources

    sc = scale_config(scale)
    if in_process(scale):
        return [worker_resources(sc)]
    return [{"CPU": TRIAL_CPU}] + [worker_resources(sc)] * sc.num_workers


def concurrency(scale: dict[str, Any], nodes: list[dict[str, float]]) -> int:
    """How many trials of ``scale`` the nodes hold at once (0 when not even one fits).

    Args:
        scale: the search's ``scale:`` section.
        nodes: each alive node's total resources (``ray.nodes()[i]["Resources"]``).
    """
    bundles = trial_bundles(scale)
    workers = bundles[1:] or bundles  # an in-process trial is its worker
    worker = workers[0]  # every worker asks the same
    slots = 0
    for node in nodes:
        slots += min(math.floor(float(node.get(k, 0.0)) / v + _EPS) for k, v in worker.items())
    cpus = sum(float(n.get("CPU", 0.0)) for n in nodes)
    trial_cpu = sum(b.get("CPU", 0.0) for b in bundles)
    by_cpu = math.floor(cpus / trial_cpu + _EPS)
    return max(0, min(slots // len(workers), by_cpu))


def alive_node_resources() -> list[dict[str, float]]:
    """Total CPU and GPU of every alive node of the connected Ray cluster."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
            for n in ray.nodes() if n.get("Alive")]


def _summary(nodes: list[dict[str, float]]) -> str:
    if not nodes:
        return "no alive nodes"
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    return (f"{len(nodes)} node(s), {total['CPU']:g} CPU and {total['GPU']:g} GPU in total, per node "
            + json.dumps([{k: n.get(k, 0.0) for k in ("CPU", "GPU")} for n in nodes]))


def wait_for_one_trial(scale: dict[str, Any], timeout_s: float, *, poll_s: float = 1.0,
                       log: Callable[[str], None] = print, log_every_s: float = 30.0) -> int:
    """Ask the autoscaler for one trial's bundles and wait until the cluster holds a trial.

    Calls ``ray.autoscaler.sdk.request_resources(bundles=...)`` (a hint the autoscaler acts on
    at once; on a cluster without an autoscaler it does nothing), polls the alive nodes until
    :func:`concurrency` is at least 1, and clears the request (``bundles=[]``) whatever
    happens, so the cluster can scale back down when the search ends.

    Args:
        scale: the search's ``scale:`` section.
        timeout_s: how long to wait (``budget.autoscale_wait_s``).
        poll_s: seconds between checks.
        log: where progress goes (a line when the wait starts, then every ``log_every_s``).

    Returns:
        The trials the cluster holds once the first fits (fixed for the search).

    Raises:
        RuntimeError: the wait ran out; the message gives what one trial needs, what the
            cluster has and the fixes.
    """
    from ray.autoscaler.sdk import request_resources

    bundles = trial_bundles(scale)
    need = {k: round(sum(b.get(k, 0.0) for b in bundles), 6) for k in ("CPU", "GPU")}
    t0 = time.monotonic()
    request_resources(bundles=bundles)
    try:
        log(f"max_concurrent_trials: auto: the Ray cluster cannot hold one trial yet ({_summary(alive_node_resources())}); "
            f"asked the autoscaler for {json.dumps(bundles)} and waiting up to {timeout_s:g} s (budget.autoscale_wait_s)")
        last_log = t0
        while True:
            nodes = alive_node_resources()
            n = concurrency(scale, nodes)
            if n >= 1:
                log(f"max_concurrent_trials: auto: {n} trial(s) fit after {time.monotonic() - t0:.0f} s "
                    f"({_summary(nodes)}); fixed for this search: set an integer to use nodes added later")
                return n
            now = time.monotonic()
            if now - t0 >= timeout_s:
                raise RuntimeError(
                    f"max_concurrent_trials: auto: waited {timeout_s:g} s (budget.autoscale_wait_s) and the Ray cluster "
                    f"still cannot hold one trial. One trial needs the bundles {json.dumps(bundles)} "
                    f"({need['CPU']:g} CPU, {need['GPU']:g} GPU; each worker bundle on one node); the cluster has "
                    f"{_summary(nodes)}. Fix: check that the autoscaler can start a node type with these resources "
                    f"(`ray status`, the node types in cluster.yaml), raise budget.autoscale_wait_s if nodes are slow "
                    f"to start, lower scale.cpus_per_worker / gpus_per_worker / num_workers, or set "
                    f"budget.max_concurrent_trials to an integer (Tune then waits for the autoscaler itself)")
            if now - last_log >= log_every_s:
                log(f"max_concurrent_trials: auto: still waiting for resources after {now - t0:.0f} s ({_summary(nodes)})")
                last_log = now
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])


def max_concurrent_auto(scale: dict[str, Any], wait_s: float, *, log: Callable[[str], None] = print,
                        poll_s: float = 1.0) -> int:
    """Trials at once for ``auto``: what the alive nodes hold now, or, when that is none (a
    cluster that scales from zero), what they hold once the autoscaler added the first fit."""
    n = concurrency(scale, alive_node_resources())
    if n >= 1:
        return n
    return wait_for_one_trial(scale, wait_s, poll_s=poll_s, log=log)
