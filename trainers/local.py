"""The training loop in this process, without Ray (``mixersnn train --no-ray``): the run's
checkpoint is kept in one folder, replaced atomically after every epoch, and the same call
continues from it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from mixersnn._atomic import atomic_path
from mixersnn.errors import UserError
from trainers.config import TrainConfig
from trainers.loop import CHECKPOINT_FILE, WorkerContext, run_training
from trainers.tracking import MLflowTracker, close_run, resolve_tracking_uri

__all__ = ["run_local"]


def run_local(cfg: TrainConfig, out: Path, *, run_id: Optional[str] = None) -> tuple[dict[str, Any], str]:
    """Train ``cfg`` here, keeping ``out/checkpoint.pt`` (resumed from when it exists).

    Args:
        cfg: the training config.
        out: the run's folder (created).
        run_id: the MLflow run to log into, or None (no tracking); closed FINISHED, FAILED or
            KILLED (Ctrl-C) when training ends.

    Returns:
        The last epoch's metrics and the checkpoint's path.

    Raises:
        UserError: a checkpoint cannot be written (a full or failing disk); the previous one
            is intact.
    """
    out.mkdir(parents=True, exist_ok=True)
    resume = out if (out / CHECKPOINT_FILE).exists() else None
    uri = resolve_tracking_uri(cfg.tracking_uri)
    tracker = MLflowTracker(uri, run_id) if run_id is not None else None

    def report(metrics: dict[str, Any], ckpt_dir: Any) -> None:
        if ckpt_dir is None:
            return
        try:
            with atomic_path(out / CHECKPOINT_FILE, suffix=".pt") as tmp:
                shutil.copyfile(Path(ckpt_dir) / CHECKPOINT_FILE, tmp)
        except OSError as err:
            raise UserError(f"cannot write the checkpoint of epoch {int(metrics['epoch']) + 1} to {out} "
                            f"({err.strerror or err}); the previous checkpoint there is intact: free space and "
                            f"run the same command again to continue from it") from None

    status = "FAILED"
    try:
        metrics = run_training(cfg, WorkerContext(report=report, resume_dir=resume, tracker=tracker))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"  # stopped by the user: the same command continues from the last epoch
        raise
    finally:
        if run_id:
            close_run(uri, run_id, status)
    return metrics, str(out / CHECKPOINT_FILE)
