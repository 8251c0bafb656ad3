"""A driver follows a training run's epochs from the tracking store (a real sqlite MLflow
store, written to by another thread as a Ray Train worker would)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from trainers.tracking import following_epochs, mlflow_client, start_run


def _log_epoch(client, run_id: str, epoch: int) -> None:  # type: ignore[no-untyped-def]
    client.log_metric(run_id, "train_loss", 1.0 / (epoch + 1), step=epoch)
    client.log_metric(run_id, "test_acc", 0.5 + epoch / 100, step=epoch)


def test_each_new_epoch_is_logged_once_in_order(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "follow", "supernet")
    client = mlflow_client(uri)
    _log_epoch(client, run_id, 0)  # before the phase (a resumed run): not repeated
    lines: list[str] = []

    def worker() -> None:
        for epoch in (1, 2, 3):
            time.sleep(0.15)
            _log_epoch(client, run_id, epoch)

    with following_epochs(uri, run_id, "supernet", lines.append, every_s=0.05):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert [line.split("] ", 1)[1] for line in lines] == [
        f"supernet: epoch {e + 1}: train loss {1.0 / (e + 1):.4f}, test acc {0.5 + e / 100:.4f}" for e in (1, 2, 3)
    ]


def test_an_epoch_is_logged_only_once_its_accuracy_is_there(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "follow", "finalist")
    client = mlflow_client(uri)
    lines: list[str] = []
    with following_epochs(uri, run_id, "finalist", lines.append, every_s=0.05):
        client.log_metric(run_id, "train_loss", 0.7, step=0)
        time.sleep(0.3)  # polled while the epoch is half written
        assert lines == []
        client.log_metric(run_id, "test_acc", 0.8, step=0)
    assert len(lines) == 1 and lines[0].endswith("finalist: epoch 1: train loss 0.7000, test acc 0.8000")


def test_a_store_that_does_not_answer_never_fails_the_phase(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_run(uri, "follow", "x")
    lines: list[str] = []
    with following_epochs(uri, "no-such-run", "x", lines.append, every_s=0.02):
        time.sleep(0.1)
    assert lines == []
