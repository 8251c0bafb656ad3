"""MLflow tracking through ``MlflowClient`` with explicit run ids.

The driver creates (or finds) the run before training starts and closes it at the end, so a
Ray Train restart or a resumed driver keeps logging to the same run; rank 0 logs into it by
id. No global "active run" state is used, so nothing depends on which process or thread
started what.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mixersnn.errors import UserError

__all__ = ["default_tracking_uri", "check_tracking_server", "TrackingUnavailable", "mlflow_client", "MLflowTracker",
           "start_run", "end_run", "close_run", "find_run", "reopen_run", "monitor_system_metrics",
           "system_metrics_enabled", "SYSTEM_METRICS_ENV", "following_epochs"]

_MAX_PARAM_LEN = 6000


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set (MLflow's own convention; ``cluster.yaml`` exports it
    on the head), else the embedded local store ``sqlite:///<cwd>/mlflow.db`` (absolute, so
    Ray workers with another working directory write to the same file)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return _pin_relative_sqlite(env)
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def _pin_relative_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path means "relative to here": pin it before workers chdir.
        rel = uri[len("sqlite:///"):]
        return f"sqlite:///{Path(rel).resolve()}"
    return uri


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """The URI a run logs to: ``uri``, or :func:`default_tracking_uri` when it is None;
    relative sqlite paths are made absolute."""
    if uri is None:
        return default_tracking_uri()
    return _pin_relative_sqlite(uri)


def check_tracking_server(uri: str, timeout_s: float = 3.0) -> None:
    """For an http(s) tracking URI, one request to the server's ``/health`` with a short
    timeout and no retries (MLflow's client retries for minutes before it gives up).

    Raises:
        UserError: the server does not answer, naming the URI and the fixes.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            why = f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        why = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        why = str(getattr(err, "reason", err))
    raise UserError(f"tracking URI {uri} does not answer ({why}) within {timeout_s:g} s: start the MLflow "
                    f"server (mlflow server --host 127.0.0.1 --port P), fix --tracking-uri, or leave it out to "
                    f"log to the local store sqlite:///./mlflow.db")


def mlflow_ui_hint(uri: str, experiment_id: Optional[str] = None) -> str:
    """How to look at ``uri``'s runs: for a local sqlite store the ``mlflow ui`` command
    (bound to loopback) and the page to open, for a server the page. The page of an
    experiment carries :data:`UI_WORKFLOW_QUERY`, so MLflow 3's UI opens on its runs table,
    not on GenAI traces."""
    page = f"#/experiments/{experiment_id}?{UI_WORKFLOW_QUERY}" if experiment_id else "#/experiments"
    if uri.startswith("sqlite:"):
        return (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
                f"http://127.0.0.1:5000/{page}")
    return f"{uri.rstrip('/')}/{page}"


#: What the experiments this project creates are, for MLflow's UI: the experiment tag
#: ``mlflow.experimentKind`` (the values of the UI's ``ExperimentKind`` enum) says model
#: training, not GenAI development. MLflow 3.17's UI decides what an experiment page shows
#: from the sidebar's workflow switch (``mlflow.workflowType`` in the browser's local storage,
#: default ``genai``; the page's ``?workflowType=`` overrides it) and reads the tag only where
#: that switch is off; earlier 3.x UIs read the tag. So both: the tag, and links with
#: :data:`UI_WORKFLOW_QUERY`.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW_QUERY = "workflowType=machine_learning"


#: A run's record of its finished epochs (see :meth:`MLflowTracker.logged_epochs`).
EPOCH_METRIC = "test_acc"


class TrackingUnavailable(UserError):
    """The tracking server stopped answering (after MLflow's own retries)."""


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` is MLflow's client giving up on a server that does not answer."""
    text = str(err)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                                   "Connection aborted", "RemoteDisconnected"))


class _ReachableClient:
    """An ``MlflowClient`` whose calls, when the server stops answering, raise
    :class:`TrackingUnavailable`: one line that says what is kept and how to continue, instead
    of MLflow's chained connection tracebacks."""

    def __init__(self, client: Any, uri: str) -> None:
        self._client, self._uri = client, uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as err:
                if not _unreachable(err):
                    raise
                raise TrackingUnavailable(
                    f"the MLflow tracking server {self._uri} stopped answering ({type(err).__name__} in {name}); what "
                    f"was logged before stays. When it is back, run the same command again: training continues from "
                    f"the last checkpoint and logs no epoch twice (a search: add --resume)") from None

        return call


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri`` (mlflow imported only when one is needed); for a server
    (http, https), one whose calls raise :class:`TrackingUnavailable` when it stops answering."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return _ReachableClient(client, uri) if uri.startswith(("http://", "https://")) else client


def _experiment_id(client: Any, uri: str, name: str) -> str:
    """The experiment's id, created if missing, marked as a model-training experiment
    (:data:`EXPERIMENT_KIND_TAG`) unless it already says what it is."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an earlier version, or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Local store: artefacts beside the database, absolute so every process agrees.
        db = Path(uri[len("sqlite:///"):])
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(uri: str, experiment: str, run_name: str, parent_run_id: Optional[str] = None) -> Optional[str]:
    """The id of an existing run with this name in the experiment, if any; with
    ``parent_run_id``, only among that run's children (two searches in one experiment may
    have child runs of the same name)."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    return None if exp is None else _find_in(client, exp.experiment_id, run_name, parent_run_id)


def _find_in(client: Any, experiment_id: str, run_name: str, parent_run_id: Optional[str]) -> Optional[str]:
    flt = f"attributes.run_name = '{run_name}'"
    if parent_run_id:
        flt += f" and tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=1)
    return runs[0].info.run_id if runs else None


#: MLflow's own switch for system metrics, which ``--system-metrics`` (``mixersnn train``,
#: ``mixersnn search``) sets: an environment variable, so every process that starts a run
#: reads it, a search's trial processes on Ray's workers included.
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
# The runs this process samples system metrics into: run id -> MLflow's SystemMetricsMonitor.
_MONITORS: dict[str, Any] = {}


def system_metrics_enabled() -> bool:
    """Whether runs started here get system metrics (:data:`SYSTEM_METRICS_ENV`)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    return bool(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get())


def monitor_system_metrics(uri: str, run_id: str) -> bool:
    """Sample this machine into the run, as MLflow's ``system/*`` metrics: CPU and memory
    (psutil), disk and network, and the GPUs where ``pynvml`` (``nvidia-ml-py``, the ``gpu``
    extra) finds NVIDIA devices. A background thread of MLflow's ``SystemMetricsMonitor``
    logs every ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10), with steps
    continuing those already logged (a resumed run), until :func:`end_run` here or, in any
    process, the run stops being RUNNING. Only when :func:`system_metrics_enabled`.

    Returns:
        Whether a monitor samples the run now.
    """
    for rid in [r for r, m in _MONITORS.items() if m._process is None or not m._process.is_alive()]:
        del _MONITORS[rid]  # stopped by itself: its run ended in another process
    if run_id in _MONITORS:
        return True
    if not system_metrics_enabled():
        return False
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=True)
    monitor.start()
    _MONITORS[run_id] = monitor
    return monitor._process is not None


def _stop_monitor(run_id: str) -> None:
    """Stop sampling the run, flushing what the monitor holds (before the run is closed)."""
    monitor = _MONITORS.pop(run_id, None)
    if monitor is not None:
        monitor.finish()


def reopen_run(uri: str, run_id: str) -> None:
    """Mark an existing run RUNNING again (a resumed job writes into it)."""
    mlflow_client(uri).set_terminated(run_id, "RUNNING")
    monitor_system_metrics(uri, run_id)


@contextmanager
def following_epochs(uri: str, run_id: str, label: str, log: Callable[[str], None], *,
                     every_s: float = 15.0) -> Iterator[None]:
    """While the block runs, log each epoch the run ``run_id`` records (train loss, test
    accuracy), read from the tracking store every ``every_s`` seconds: a Ray Train run's
    workers print nowhere the driver's user sees, so a long phase would otherwise be silent.
    Epochs recorded before the block are not repeated; a store that does not answer is asked
    again next time, never failing the block."""
    client = mlflow_client(uri)
    stop = threading.Event()
    t0 = time.time()

    def history() -> dict[int, dict[str, float]]:
        by_step: dict[int, dict[str, float]] = {}
        for key in ("train_loss", "test_acc"):
            for m in client.get_metric_history(run_id, key):
                by_step.setdefault(m.step, {})[key] = m.value
        return by_step

    def poll(seen: set[int]) -> None:
        try:
            by_step = history()
        except Exception:  # noqa: BLE001 - a busy sqlite file or a server restart: next time
            return
        for step in sorted(set(by_step) - seen):
            m = by_step[step]
            if "test_acc" not in m:
                continue  # the epoch's metrics are being written; take it whole next time
            seen.add(step)
            loss = f"train loss {m['train_loss']:.4f}, " if "train_loss" in m else ""
            log(f"[{time.time() - t0:7.0f}s] {label}: epoch {step + 1}: {loss}test acc {m['test_acc']:.4f}")

    try:
        seen = set(history())
    except Exception:  # noqa: BLE001
        seen = set()

    def follow() -> None:
        while not stop.wait(every_s):
            poll(seen)

    thread = threading.Thread(target=follow, name=f"follow-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll(seen)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    parent_run_id: Optional[str] = None,
    tags: Optional[dict[str, str]] = None,
    reuse: bool = True,
) -> str:
    """Create the run (or, with ``reuse``, return the existing run of that name, among
    ``parent_run_id``'s children when given, so a resumed job keeps its history) and return
    its id."""
    client = mlflow_client(uri)
    exp_id = _experiment_id(client, uri, experiment)
    if reuse:
        rid = _find_in(client, exp_id, run_name, parent_run_id)
        if rid is not None:
            client.set_terminated(rid, "RUNNING")  # reopen_run, with the client at hand
            monitor_system_metrics(uri, rid)
            return rid
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    monitor_system_metrics(uri, run.info.run_id)
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _stop_monitor(run_id)
    mlflow_client(uri).set_terminated(run_id, status)


def close_run(uri: str, run_id: str, status: str) -> None:
    """:func:`end_run` at the end of a job: a job that did not finish (failed, interrupted)
    because the server stopped answering cannot close its run either; its own error is the
    one to report, so that second failure passes."""
    try:
        end_run(uri, run_id, status)
    except TrackingUnavailable:
        if status == "FINISHED":
            raise


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MLflowTracker:
    """Logs into one run by id.

    Args:
        uri: tracking URI.
        run_id: the run (from :func:`start_run`).
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = mlflow_client(uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        existing = self.client.get_run(self.run_id).data.params
        batch = []
        for k, v in flat.items():
            sv = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            sv = sv[:_MAX_PARAM_LEN]
            if k in existing:
                continue  # params are immutable in MLflow; a resumed run logged them already
            batch.append(Param(k, sv))
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def logged_epochs(self) -> set[int]:
        """The epochs this run has logged: the training loop logs :data:`EPOCH_METRIC` once
        per finished epoch, at step = epoch index (a resumed run continues the steps)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_METRIC)}

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), ts, step)
            for k, v in _flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def log_dict(self, d: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, d, artifact_file)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)
