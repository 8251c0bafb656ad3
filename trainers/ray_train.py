"""Ray Train entry point: the one file that touches Ray Train's API.

``fit(train_cfg, scale_cfg)`` runs :func:`trainers.loop.run_training` on every worker of a
``TorchTrainer`` (DDP over gloo on CPU, nccl on GPU), reports each epoch with a checkpoint
from rank 0, resumes from the latest checkpoint after a worker failure (``FailureConfig``)
or when the same run is started again, and logs to MLflow from rank 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from trainers.config import ScaleConfig, TrainConfig
from trainers.tracking import MLflowTracker, close_run, resolve_tracking_uri, start_run

# What a local runtime started here (or by the search) gives its Ray processes: Ray Train's
# preemption watcher off. Ray Train starts that actor for every fit, to stop the workers of a
# node that is about to be taken away (spot instances); one machine has no such node, and on a
# 2-core machine the actor's process costs about 2 s of CPU per fit (measured: an actor that
# imports Ray Train's modules takes 2.2 s of CPU to start). A cluster keeps Ray's default.
LOCAL_RUNTIME_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

__all__ = ["fit", "FitResult", "run_name_for", "worker_resources", "scaling_config", "init_local_ray"]

# Test hook (documented, off unless set): the worker whose rank matches kills itself with
# SIGKILL at the start of this epoch, once (a marker file makes the retry survive). This is
# how the fault-tolerance test kills a worker mid-training.
_CRASH_ENV = "MIXERSNN_TEST_KILL_AT_EPOCH"
_CRASH_MARKER_ENV = "MIXERSNN_TEST_KILL_MARKER"


@dataclass
class FitResult:
    """What a finished run hands back."""

    metrics: dict[str, Any]
    checkpoint_path: Optional[str]
    run_name: str
    mlflow_run_id: Optional[str]
    storage_path: str


def run_name_for(cfg: TrainConfig, scale: ScaleConfig) -> str:
    """A stable name from the config, so starting the same job again resumes it (Ray Train
    resumes a run with the same name and storage path) and MLflow gets the same run."""
    if cfg.run_name:
        return cfg.run_name
    blob = json.dumps({"train": cfg.to_dict(), "workers": scale.num_workers}, sort_keys=True)
    return f"{cfg.model}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def worker_resources(scale: ScaleConfig) -> dict[str, float]:
    """The Ray resources of one training worker: ``{"CPU": cpus_per_worker}`` plus
    ``"GPU": gpus_per_worker`` when ``use_gpu`` (a fraction such as 0.25 shares a GPU)."""
    res: dict[str, float] = {"CPU": float(scale.cpus_per_worker)}
    if scale.use_gpu:
        res["GPU"] = float(scale.gpus_per_worker)
    return res


def scaling_config(scale: ScaleConfig) -> Any:
    """Ray Train's ``ScalingConfig`` for ``scale``: ``num_workers`` workers of
    :func:`worker_resources` each (no Ray cluster needed to build it)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                         resources_per_worker=worker_resources(scale))


@contextlib.contextmanager
def local_checkpoint(ckpt: Any) -> Iterator[Optional[Path]]:
    """A Ray ``Checkpoint`` (Train's or Tune's) copied into a temporary folder for the loop to
    resume from, removed afterwards; None when there is nothing to resume."""
    if ckpt is None:
        yield None
        return
    local = tempfile.mkdtemp(prefix="mixersnn-resume-")
    try:
        ckpt.to_directory(local)
        yield Path(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _worker_loop(config: dict[str, Any]) -> None:
    import signal

    import ray.train
    import ray.train.torch
    import torch

    from trainers.loop import WorkerContext, run_training

    cfg = TrainConfig.from_dict(config["train"])
    rctx = ray.train.get_context()
    rank, world = rctx.get_world_rank(), rctx.get_world_size()
    torch.set_num_threads(max(1, int(config["torch_threads"])))
    device = ray.train.torch.get_device()

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        tracker = MLflowTracker(config["tracking_uri"], config["mlflow_run_id"])

    kill_epoch = os.environ.get(_CRASH_ENV)
    marker = os.environ.get(_CRASH_MARKER_ENV)

    # Where the ranks run, reported with every epoch (and checked by the multi-node test).
    import ray as _ray
    import torch.distributed as dist

    node_id = _ray.get_runtime_context().get_node_id()
    node_ids = [node_id]
    if world > 1 and dist.is_initialized():
        node_ids = [None] * world
        dist.all_gather_object(node_ids, node_id)
    if tracker is not None:
        # The run records where its ranks ran (a search's child run: which trial ran where).
        # After a restart the latest placement wins.
        tracker.set_tags({"mixersnn.node_ids": ",".join(node_ids), "mixersnn.num_nodes": len(set(node_ids))})

    def report(metrics: dict[str, Any], ckpt_dir: Optional[Path]) -> None:
        # The node ids as one comma-separated string, as in the run's tag: Tune's TensorBoard
        # logger, which a search's trials report through, warns about a list of strings.
        metrics = {**metrics, "num_nodes": len(set(node_ids)), "worker_node_ids": ",".join(node_ids)}
        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{int(metrics['epoch']):04d}"
        )
        # Fault-injection hook for the tests: once the epoch before ``kill_epoch`` is reported,
        # the last rank dies like a killed process while the others are already training the
        # next epoch (they block in DDP's all-reduce until Ray restarts the group).
        if kill_epoch is not None and marker and int(metrics["epoch"]) + 1 == int(kill_epoch) and rank == world - 1:
            if not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                import time

                time.sleep(3.0)  # mid-epoch for the other ranks; the checkpoint is registered
                os.kill(os.getpid(), signal.SIGKILL)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    with local_checkpoint(ray.train.get_checkpoint()) as resume_dir:
        log = (lambda s: print(f"[rank {rank}] {s}", flush=True)) if rank == 0 else (lambda s: None)
        run_training(cfg, WorkerContext(rank=rank, world_size=world, device=device, wrap_model=wrap, report=report,
                                        resume_dir=resume_dir, tracker=tracker, log=log))


def init_local_ray(ray_init_kwargs: Optional[dict[str, Any]] = None, *, env_vars: dict[str, str],
                   log_to_driver: bool) -> None:
    """``ray.init`` for a driver that found no Ray runtime up: a new local runtime whose
    processes get ``env_vars``, unless told otherwise (``ray_init_kwargs["address"]``, or
    ``RAY_ADDRESS`` as ``ray job submit`` sets it). A bare ``ray.init()`` would join whatever
    cluster ``ray start`` (or a test's simulated cluster) last recorded in /tmp/ray on this
    machine, another user's or a dead one.

    Args:
        ray_init_kwargs: ``ray.init`` arguments replacing these defaults.
        env_vars: the environment of the runtime's worker processes.
        log_to_driver: print the workers' output in this process.
    """
    import ray

    kw: dict[str, Any] = {"address": os.environ.get("RAY_ADDRESS") or "local", "include_dashboard": True,
                          "dashboard_host": "127.0.0.1", "log_to_driver": log_to_driver,
                          "runtime_env": {"env_vars": dict(env_vars)}}
    kw.update(ray_init_kwargs or {})
    ray.init(**kw)


def _torch_trainer(cfg: TrainConfig, scale: ScaleConfig, *, name: str, storage: str, uri: str,
                   run_id: Optional[str], callbacks: Optional[list[Any]]) -> Any:
    """The ``TorchTrainer`` of one run: :func:`_worker_loop` on ``scale``'s workers (gloo on CPU,
    nccl on GPU), retried up to ``scale.max_failures`` times, the last two checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        _worker_loop,
        train_loop_config={
            "train": cfg.to_dict(),
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "torch_threads": max(1, int(scale.cpus_per_worker)),
        },
        torch_config=TorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
        scaling_config=scaling_config(scale),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def fit(
    cfg: TrainConfig,
    scale: ScaleConfig,
    *,
    track: bool = True,
    ray_init_kwargs: Optional[dict[str, Any]] = None,
    callbacks: Optional[list[Any]] = None,
    name: Optional[str] = None,
) -> FitResult:
    """Train with Ray Train and return the final metrics and checkpoint.

    Args:
        cfg: training config.
        scale: workers and resources.
        track: log to MLflow (``cfg.tracking_uri`` or the embedded sqlite store).
        ray_init_kwargs: passed to ``ray.init`` when no Ray runtime is up yet (local runs).
        callbacks: Ray Train ``RunConfig`` callbacks, e.g. Tune's ``TuneReportCallback`` when
            this runs inside a Tune trial (the search does that).
        name: the run's name; None: ``scale.name``, else :func:`run_name_for`.
    """
    import ray

    if not ray.is_initialized():
        init_local_ray(ray_init_kwargs, env_vars=LOCAL_RUNTIME_ENV, log_to_driver=True)

    name = name or scale.name or run_name_for(cfg, scale)
    # Local paths are made absolute (workers may run elsewhere); URIs (s3://, gs://) pass as-is.
    storage = scale.storage_path if "://" in scale.storage_path else str(Path(scale.storage_path).resolve())
    uri = resolve_tracking_uri(cfg.tracking_uri)
    run_id = None
    if track:
        run_id = start_run(uri, cfg.experiment, name, parent_run_id=cfg.parent_run_id,
                           tags={"mixersnn.kind": "train", "mixersnn.model": cfg.model})

    trainer = _torch_trainer(cfg, scale, name=name, storage=storage, uri=uri, run_id=run_id, callbacks=callbacks)
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"  # stopped by the user: the same command continues from the last epoch
        raise
    finally:
        if run_id is not None:
            close_run(uri, run_id, status)
    ckpt_path = None
    if result.checkpoint is not None:
        ckpt_path = str(Path(result.checkpoint.path) / "checkpoint.pt")
    return FitResult(
        metrics=dict(result.metrics or {}),
        checkpoint_path=ckpt_path,
        run_name=name,
        mlflow_run_id=run_id,
        storage_path=storage,
    )
