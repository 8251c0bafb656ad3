"""The ``mixersnn`` command's edges: one-line errors on stderr with exit 2 before anything
starts, ``--debug`` for the traceback, ``--version``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from _helpers import default_sigint, free_port
from mixersnn.cli import main


def test_version(capsys: pytest.CaptureFixture) -> None:
    from mixersnn import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mixersnn {__version__}"


def test_a_bad_config_is_one_line_on_stderr_and_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from mixersnn.models.config import ConfigError

    cfg = tmp_path / "a.yaml"
    cfg.write_text("train: {model: mlp_spe_t}\nscale: {num_worker: 2}\n")
    assert main(["train", "--config", str(cfg), "--no-ray", "--no-mlflow"]) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert len(lines) == 1 and "num_worker" in lines[0] and "num_workers" in lines[0] and not printed.out
    with pytest.raises(ConfigError, match="num_worker"):
        main(["--debug", "train", "--config", str(cfg), "--no-ray", "--no-mlflow"])


def test_train_checks_the_data_before_anything_is_created(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-data"
    assert main(["train", "--data", str(missing), "--no-ray", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "make-shards" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/ folder, no mlflow.db


def test_an_unreachable_tracking_server_fails_in_seconds(tmp_path: Path, monkeypatch, fmnist_shards: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    assert main(["train", "--data", str(fmnist_shards), "--no-ray", "--tracking-uri", uri]) == 2
    assert time.time() - t0 < 20  # MLflow's own client retries for minutes
    err = capsys.readouterr().err
    assert uri in err and "does not answer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    assert main(["search", "--tracking-uri", uri, "--storage-path", str(tmp_path / "s")]) == 2
    assert "does not answer" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_report_on_a_missing_store_creates_nothing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "nothing.db"
    assert main(["report", "some-experiment", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert str(db) in capsys.readouterr().err and not db.exists()


def test_a_run_is_never_silently_reused_for_another_config(tmp_path: Path, monkeypatch, fmnist_shards: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The same name and config resumes; another config under that name is refused with what
    differs and the fixes, and runs only with --resume; default names differ by config."""
    import json

    monkeypatch.chdir(tmp_path)
    base = ["train", "--data", str(fmnist_shards), "--no-ray", "--no-mlflow", "--epochs", "1",
            "--embed-dim", "12", "--depths", "1,1", "--T", "1", "--max-steps-per-epoch", "2",
            "--max-eval-batches", "1", "--json"]
    assert main([*base, "--run-name", "mine"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*base, "--run-name", "mine", "--label-smoothing", "0.0"]) == 2
    err = capsys.readouterr().err
    assert "'mine'" in err and "label_smoothing: 0.1 -> 0.0" in err and "--run-name NEW" in err and "--resume" in err
    # The same config again resumes (nothing left to train: the recorded result comes back).
    assert main([*base, "--run-name", "mine"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_acc"] == first["test_acc"]
    assert main([*base, "--run-name", "mine", "--label-smoothing", "0.0", "--resume"]) == 0
    capsys.readouterr()
    # No name: the model and a hash of the config, so two configs get two runs.
    assert main(base) == 0 and main([*base, "--label-smoothing", "0.0"]) == 0
    names = {json.loads(ln)["run_name"] for ln in capsys.readouterr().out.strip().splitlines() if ln.startswith("{")}
    assert len(names) == 2 and all(n.startswith("mlp_spe_t-") for n in names)
    assert {p.name for p in (tmp_path / "runs" / "local").iterdir()} == names | {"mine"}


@pytest.mark.slow
def test_sigint_stops_a_training_run_killed_and_the_same_command_continues(tmp_path: Path, fmnist_shards: Path) -> None:
    """Ctrl-C during `mixersnn train --no-ray`: exit 130 with how to continue, the MLflow run
    KILLED (not FAILED); the same command resumes from the last finished epoch and logs
    every epoch once."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A model slow enough (about 2 s an epoch here) for the signal to land mid-run.
    cmd = [sys.executable, "-m", "mixersnn.cli", "train", "--data", str(fmnist_shards), "--no-ray", "--epochs", "4",
           "--embed-dim", "48", "--depths", "2,2", "--T", "4", "--max-eval-batches", "1",
           "--tracking-uri", uri, "--experiment", "sigint", "--run-name", "ctrl-c"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    ckpt = tmp_path / "runs" / "local" / "ctrl-c" / "checkpoint.pt"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not ckpt.exists():  # the first epoch is on disk
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "same command again" in err, err
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sigint").experiment_id])
    assert run.info.status == "KILLED"

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from epoch" in done.stdout + done.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("sigint").experiment_id])
    assert run.info.status == "FINISHED"
    assert [h.step for h in client.get_metric_history(run.info.run_id, "test_acc")] == [0, 1, 2, 3]


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tmp_path: Path, monkeypatch, fmnist_shards: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # A file where the run folder should go (tests run as root, so permissions would not stop it).
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "storage"
    blocker.write_text("not a folder")
    base = ["train", "--data", str(fmnist_shards), "--no-mlflow", "--epochs", "1", "--run-name", "r"]
    assert main([*base, "--storage-path", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "writable --storage-path" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "runs").write_text("not a folder either")
    assert main([*base, "--no-ray"]) == 2
    assert "runs/local" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tracking_server_dying_mid_run_stops_it_in_one_line_and_the_rerun_continues(tmp_path: Path, fmnist_shards: Path) -> None:
    """The MLflow server killed after the first epoch: the run stops with one line that says
    what is kept and how to continue; with the server back, the same command resumes and
    every epoch is logged once."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from _helpers import start_mlflow_server, stop_process

    repo = Path(__file__).resolve().parents[1]
    store = tmp_path / "server"
    store.mkdir()
    port = free_port()
    server, uri = start_mlflow_server(store, port)
    # A model slow enough (about 2 s an epoch here) for the kill to land mid-run.
    cmd = [sys.executable, "-m", "mixersnn.cli", "train", "--data", str(fmnist_shards), "--no-ray", "--epochs", "4",
           "--embed-dim", "48", "--depths", "2,2", "--T", "4", "--max-eval-batches", "1",
           "--tracking-uri", uri, "--experiment", "server-dies", "--run-name", "r"]
    # MLflow's client retries a dead server for minutes by default; the test gives it one try.
    env = {**os.environ, "PYTHONPATH": str(repo), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    client = MlflowClient(uri)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            exp = client.get_experiment_by_name("server-dies")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and client.get_metric_history(runs[0].info.run_id, "test_acc"):
                break
            assert proc.poll() is None and time.time() < deadline, "no epoch was logged in time"
            time.sleep(0.2)
        stop_process(server, kill=True)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_process(server, kill=True)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and "stopped answering" in lines[-1] and "run the same command again" in lines[-1], err
    assert "Traceback" not in err

    server, uri = start_mlflow_server(store, port)
    try:
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("server-dies").experiment_id])
        assert run.info.status == "FINISHED"
        assert [h.step for h in client.get_metric_history(run.info.run_id, "test_acc")] == [0, 1, 2, 3]
    finally:
        stop_process(server, kill=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, fmnist_shards: Path) -> None:
    """The run folder on a small tmpfs that fills up at the second checkpoint: one line naming
    the epoch and the fix, the first checkpoint intact; with room again, the same command
    continues from it."""
    import os
    import subprocess
    import sys

    import torch

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    try:
        repo = Path(__file__).resolve().parents[1]
        # About 0.6 MB a checkpoint (model and AdamW state) on 0.9 MB: the first fits, writing the second
        # beside it (copy, then rename) does not.
        cmd = [sys.executable, "-m", "mixersnn.cli", "train", "--data", str(fmnist_shards), "--no-ray",
               "--no-mlflow", "--epochs", "3", "--embed-dim", "24", "--depths", "1,1", "--T", "1",
               "--max-steps-per-epoch", "2", "--max-eval-batches", "1", "--run-name", "full"]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        proc = subprocess.run(cmd, cwd=disk, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert "checkpoint of epoch 2" in line and "previous checkpoint there is intact" in line, line
        ckpt = disk / "runs" / "local" / "full" / "checkpoint.pt"
        assert torch.load(ckpt, weights_only=True)["epoch"] == 0
        assert not list(ckpt.parent.glob(".checkpoint.pt.*"))  # atomic_path's temporary is gone

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        done = subprocess.run(cmd, cwd=disk, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "resumed from epoch 0" in done.stdout + done.stderr, done.stderr[-2000:]
        assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
