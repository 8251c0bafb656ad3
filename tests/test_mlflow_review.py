"""Reviewing a search in MLflow, as a user would: a small real search (Ray Tune trials on real
Fashion-MNIST slices) logged to a real ``mlflow server`` on loopback, then its record read
back, and its pages opened in a real headless browser (Debian's chromium) against that
server: the experiment opens on runs, the parent run reads as a training run with its
children, and the Pareto plot is there. Plus ``mixersnn train --system-metrics``.

MLflow 3.17's UI chooses between its GenAI and model-training views by a switch kept in the
browser (``?workflowType=`` overrides it); the experiment tag ``mlflow.experimentKind`` is
what earlier 3.x UIs read; a run is listed as an "Evaluation" run unless it has a model
output (see trainers/tracking.py and search/driver.link_selected_model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

from _helpers import start_local_ray

ray = pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")

REPO = Path(__file__).resolve().parents[1]
SAMPLING = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}


def _chromium() -> str:
    """Debian's chromium; CI runs as root and scripts/setup.sh --tests installs it there, so only a
    machine where it could not be installed skips."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.geteuid() == 0:
        pytest.fail("chromium is not installed; scripts/setup.sh --tests installs it when run as root (apt-get install chromium)")
    pytest.skip("chromium is not installed and this user cannot install it: sudo apt-get install chromium "
                "(or run scripts/setup.sh --tests as root)")


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str):  # type: ignore[no-untyped-def]
    """One small search with system metrics on, logged to the session's MLflow server: three
    trials of two epochs (no halving), at least two of them trained."""
    from conftest import make_fmnist_shards
    from search.config import load_search_config
    from search.driver import run_search
    from test_search import TINY_SPACE, TINY_TRAIN, _outcomes, _tiny_config, _yaml
    from trainers.tracking import SYSTEM_METRICS_ENV

    tmp = tmp_path_factory.mktemp("review")
    shards = make_fmnist_shards(tmp / "data", train=256, test=128, per_shard=64)
    space = {**TINY_SPACE, "batch_size": 32}  # trained or infeasible (T=2 breaks the energy cap)
    for seed in range(100):
        path = _yaml(tmp / "search.yaml", _tiny_config(
            tmp, shards, mlflow_server, "review", seed=seed, space=space, asha={"enabled": False},
            train={**TINY_TRAIN, "epochs": 2}, budget={"num_trials": 3, "max_concurrent_trials": 2}))
        if _outcomes(path, 3).count("ok") >= 2:
            break
    cfg = load_search_config(path)
    saved = {k: os.environ.get(k) for k in (SYSTEM_METRICS_ENV, *SAMPLING)}
    os.environ.update(SAMPLING)
    start_local_ray(extra_env={SYSTEM_METRICS_ENV: "true", **SAMPLING})
    try:
        res = run_search(cfg, quiet=True, log=lambda s: None, system_metrics=True)
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return res


@pytest.mark.slow
def test_the_search_is_recorded_for_review(search, mlflow_server: str) -> None:  # type: ignore[no-untyped-def]
    """The experiment is a model-training one; the parent run has the selected model as its
    output (a training run, not an evaluation), the Pareto plot and the leaderboard as an
    MLflow table; trials' learning curves are metrics by epoch; system metrics are logged."""
    from mlflow.tracking import MlflowClient

    from search.tracking import LEADERBOARD_FILE

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)  # not the process-wide registry
    parent = client.get_run(search.parent_run_id)
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # The parent's output: the registered model, logged in the selected trial's run.
    name, version = parent.data.tags["mixersnn.registered_model"].split("/")
    source = client.get_model_version(name, version).source
    best = client.get_run(parent.data.tags["mixersnn.best_run_id"])
    (model_id,) = [o.model_id for o in best.outputs.model_outputs]
    assert source == f"models:/{model_id}"
    assert [o.model_id for o in parent.outputs.model_outputs] == [model_id]

    arts = {a.path for a in client.list_artifacts(search.parent_run_id, "search")}
    assert {"search/pareto_front.png", LEADERBOARD_FILE} <= arts
    tables = json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    assert {"path": LEADERBOARD_FILE, "type": "table"} in tables
    board = json.loads(Path(client.download_artifacts(search.parent_run_id, LEADERBOARD_FILE)).read_text())
    assert board["columns"][:4] == ["rank", "trial", "status", "pareto"]
    assert len(board["data"]) == len(search.rows) == 3
    accs = [row[board["columns"].index("test_acc")] for row in board["data"]]
    scored = [a for a in accs if a is not None]
    assert scored == sorted(scored, reverse=True) and len(scored) >= 2

    trained = [r for r in search.rows if r.status == "ok"]
    assert len(trained) >= 2
    for r in trained:
        # Learning curves: one point per epoch, step = epoch index.
        assert [m.step for m in client.get_metric_history(r.run_id, "test_acc")] == [0, 1]
        assert [m.step for m in client.get_metric_history(r.run_id, "train_loss")] == [0, 1]
    # System metrics (MLflow's system/* keys): the driver's on the parent, the trials' own.
    assert "system/cpu_utilization_percentage" in parent.data.metrics
    assert "system/system_memory_usage_megabytes" in parent.data.metrics
    assert any("system/cpu_utilization_percentage" in client.get_run(r.run_id).data.metrics for r in trained)


def _page(chromium: str, url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """The page's text after the single-page app has rendered (a virtual-time budget lets its
    requests finish); with ``screenshot``, a PNG of it instead of the DOM, and "" back."""
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,1000"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=60, cwd=profile.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    if screenshot:
        return ""
    html = re.sub(r"<(style|script)\b.*?</\1>", " ", out.stdout, flags=re.S)
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


@pytest.mark.slow
def test_the_search_in_a_headless_browser(search, mlflow_server: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The MLflow UI in Debian's chromium: the experiment opens on its runs with the search's
    parent run; the parent's page lists its child trials and its logged model, filed under
    runs (not evaluations); the Pareto plot is among its artefacts; a screenshot of it."""
    from mlflow.tracking import MlflowClient

    from trainers.tracking import UI_WORKFLOW_QUERY, mlflow_ui_hint

    chromium = _chromium()
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)  # not the process-wide registry
    parent = client.get_run(search.parent_run_id)
    exp_id = parent.info.experiment_id
    hint = mlflow_ui_hint(mlflow_server, exp_id)
    assert hint == f"{mlflow_server}/#/experiments/{exp_id}?{UI_WORKFLOW_QUERY}"

    # The page the search prints: the runs table, the search's parent run in it.
    text = _page(chromium, hint, tmp_path / "p1")
    assert "Runs" in text and "review" in text, text[:2000]
    assert "Traces 0" not in text and "Detect Issues" not in text  # not the GenAI overview

    # Even in the browser's default (GenAI) view, the parent is a training run: the
    # experiment's sidebar gains "Training runs", and the run page files it under "Runs".
    run_page = f"{mlflow_server}/#/experiments/{exp_id}/runs/{search.parent_run_id}"
    text = _page(chromium, run_page, tmp_path / "p2")
    assert "Training runs" in text, text[:2000]
    assert "Evaluations review" not in text and "Runs review" in text, text[:2000]
    assert "Child runs" in text
    for r in search.rows:
        assert f"trial-{r.trial_id}" in text or r.run_id in text, (r.trial_id, text[:3000])
    assert "Logged models (1)" in text

    # The Pareto plot, opened in the parent's artefacts.
    art_page = f"{run_page}/artifacts/search/pareto_front.png?{UI_WORKFLOW_QUERY}"
    text = _page(chromium, art_page, tmp_path / "p3")
    assert "pareto_front.png" in text and "leaderboard.json" in text, text[:3000]
    # The leaderboard opens as a table (an MLflow table artefact), not as raw JSON.
    text = _page(chromium, f"{run_page}/artifacts/search/leaderboard.json?{UI_WORKFLOW_QUERY}", tmp_path / "p5")
    assert "View as table" in text and "energy_per_image_uj" in text, text[:3000]
    shot = tmp_path / "pareto.png"
    _page(chromium, art_page, tmp_path / "p4", screenshot=shot)
    from PIL import Image

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000, len(data)
    with Image.open(shot) as img:
        assert img.size == (1400, 1000)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 100  # not a blank page


@pytest.mark.slow
def test_train_logs_system_metrics_when_asked(tmp_path: Path) -> None:
    """``mixersnn train --system-metrics``: MLflow's system/* metrics in the run, by step,
    in an experiment marked as model training; without the flag, none."""
    from mlflow.tracking import MlflowClient

    from conftest import make_fmnist_shards

    shards = make_fmnist_shards(tmp_path / "data", train=128, test=64, per_shard=64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"}
    base = [sys.executable, "-m", "mixersnn.cli", "train", "--no-ray", "--data", str(shards), "--embed-dim", "12",
            "--depths", "1,1", "--T", "1", "--epochs", "2", "--max-steps-per-epoch", "4", "--max-eval-batches", "1",
            "--batch-size", "32", "--tracking-uri", uri, "--experiment", "sysm"]
    for name, extra in (("with", ["--system-metrics"]), ("without", [])):
        out = subprocess.run([*base, "--run-name", name, *extra], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env={**env, **SAMPLING, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sysm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    system = sorted(k for k in runs["with"].data.metrics if k.startswith("system/"))
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(system), system
    steps = [m.step for m in client.get_metric_history(runs["with"].info.run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and steps
    assert not [k for k in runs["without"].data.metrics if k.startswith("system/")]


def test_experiments_are_marked_as_model_training_unless_they_say_otherwise(tmp_path: Path) -> None:
    """New experiments get the tag; one made before it existed gets it when a run starts in
    it; one a user marked otherwise keeps its kind. The UI hint opens the experiment's runs."""
    from mlflow.tracking import MlflowClient

    from trainers.tracking import EXPERIMENT_KIND_TAG, mlflow_ui_hint, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old")
    genai = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("new", "old", "genai"):
        start_run(uri, name, "r")
    assert client.get_experiment_by_name("new").tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert mlflow_ui_hint(uri, "7") == (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
                                        f"http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning")
    assert mlflow_ui_hint("http://h:5000/", "7") == "http://h:5000/#/experiments/7?workflowType=machine_learning"


def test_a_system_metrics_flag_without_mlflow_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mixersnn.cli", "train", "--no-ray", "--no-mlflow", "--system-metrics"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert "--system-metrics logs to the MLflow run: drop --no-mlflow" in out.stderr
