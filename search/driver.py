"""The search driver: Ray Tune trials, Optuna as the searcher, successive halving as the
scheduler, MLflow as the record. The one file of the search that builds Ray Tune experiments.

Layout of one search (``<storage_path>/<name>/``): Tune's experiment state (the resume point,
each trial's checkpoints), ``mo_asha.json`` (the halving scheduler's rungs and decisions) and,
for trials that train through Ray Train, ``train/`` with their Train runs. In MLflow: a parent
run named after the search and a nested child run ``trial-<id>`` per trial. Names come from the
search name and Tune's trial ids, which Tune keeps on restore, so a resumed driver reuses the
parent run, continues the trials it lost from their last checkpoint, and writes into the same
child runs: no duplicates.

Trials with one CPU worker train inside their Tune trial process, which Tune reuses from trial
to trial (:mod:`search.trial`); larger trials launch Ray Train. In multi-objective mode trials
start at a small budget and MO-ASHA (:mod:`search.scheduler`) promotes the promising ones to
larger budgets; single-objective mode uses Ray's ASHA. Trained baselines are the experiment's
first trials (same schedule, never stopped, never fed to the searcher); estimate-only baselines
are recorded from their parameter count and dense-bound energy without training.

Trials that break the user's constraints never train: the sampler marks them infeasible, the
trial function records a child run tagged ``mixersnn.trial_status=infeasible`` with the
reason (status KILLED) and reports a dominated sentinel (accuracy 0 at its estimated energy)
so the searcher learns to avoid the region. Failed trials (NaN loss, crashed workers) are
tagged ``failed`` with the reason; Tune records the error and the search goes on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mixersnn._atomic import atomic_path
from search.config import SearchConfig
from search.space import Sampler, TrialSpec
from search.tracking import (BASELINE_TAG, REASON_TAG, SEARCH_TAG, STATUS_TAG, TrialRow, collect_trials,
                             epochs_logged, settle_run, stop_reason)
from search.trial import SearchContext, in_process, run_trial, trial_resources
from trainers.ray_train import LOCAL_RUNTIME_ENV, init_local_ray

__all__ = ["run_search", "SearchResult", "SearchExistsError"]

# Tune snapshots its experiment state (the resume point) at most this often; the default
# ("auto") can be minutes apart, and a driver killed in between restarts trials from scratch.
_CHECKPOINT_PERIOD_S = "2"
# The halving scheduler's rungs and decisions, in the search's folder (Tune does not save them).
_SCHEDULER_FILE = "mo_asha.json"
# The search's MLflow parent run, recorded in the search's folder when it is created.
_PARENT_FILE = "mlflow_parent_run.json"
# What a local runtime the search starts gives its workers (the tests' runtimes get the same,
# tests/_helpers.WORKER_ENV): one torch thread per worker, since trials and workers share the
# machine's cores with fractional CPUs; Ray Train's health checks every 0.5 s instead of 2 s,
# so a trial that ends is noticed sooner; no preemption watcher (LOCAL_RUNTIME_ENV).
LOCAL_WORKER_ENV = {**LOCAL_RUNTIME_ENV, "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


class SearchExistsError(RuntimeError):
    """A search of that name already has state on disk (and ``--resume`` was not given)."""


@dataclass
class SearchResult:
    """What a finished search hands back."""

    name: str
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    front: list[TrialRow]
    best: Optional[TrialRow]
    registered_version: Optional[str]
    wall_s: float
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- progress + status
def _tune_callback_cls() -> type:
    from ray.tune import Callback

    class SearchProgress(Callback):
        """Prints one line per finished trial and settles the status of trials the trial
        function could not settle itself (stopped by ASHA or the time budget, crashed actors)."""

        def __init__(self, *, total: int, uri: str, experiment: str, parent_run_id: str,
                     quiet: bool = False, what: str = "trial") -> None:
            self.total = total
            self.what = what
            self.uri = uri
            self.experiment = experiment
            self.parent_run_id = parent_run_id
            self.quiet = quiet
            self.t0 = time.time()
            self.done = 0

        def _child(self, trial: Any) -> Optional[str]:
            from trainers.tracking import find_run

            # A callback restored from a search saved before it had parent_run_id: by name alone.
            spec = TrialSpec.from_dict(trial.config["resolved"])
            return find_run(self.uri, self.experiment, spec.name(trial.trial_id), getattr(self, "parent_run_id", None))

        def note(self, text: str) -> None:
            """A progress line that is not a trial's end (the scheduler's pauses and promotions)."""
            if not self.quiet:
                print(f"[{time.time() - self.t0:6.0f}s]     {text}", flush=True)

        def _line(self, trials: list, trial: Any, status: str, extra: str = "") -> None:
            if self.quiet:
                return
            # Counted here: the trial's own status is not final yet while callbacks run.
            self.done += 1
            print(_progress_line(trial, status, extra, elapsed=time.time() - self.t0, done=self.done,
                                 total=self.total), flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            res = trial.last_result or {}
            if res.get("screened"):
                self._line(trials, trial, "screened", "(zero-cost score too low: never trained)")
                return
            if res.get("infeasible"):
                self._line(trials, trial, "infeasible", f"({(trial.config['resolved']['infeasible'] or '')[:80]})")
                return
            if res.get("search_final"):
                self._line(trials, trial, "done")
                return
            # Stopped at a rung by the scheduler, or a paused trial never promoted (the time
            # budget stops running trials without calling this; finalize() settles those).
            # The count comes from the run's record: a stop can land before any report.
            epochs = _settle_stopped(self.uri, self._child(trial), res)
            self._line(trials, trial, "stopped", f"(after {epochs} epoch(s))")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            status, reason = _settle_errored(self.uri, self._child(trial), trial)
            self._line(trials, trial, status, f"({reason[:100]})")

    return SearchProgress


def _progress_line(trial: Any, status: str, extra: str, *, elapsed: float, done: int, total: int) -> str:
    """The progress line of a trial that ended: count, who, status, accuracy, energy, architecture."""
    res = trial.last_result or {}
    acc = res.get("test_acc")
    val = res.get("val_acc")
    en = res.get("energy_per_image_uj")
    spec = TrialSpec.from_dict(trial.config["resolved"])
    who = f"baseline {spec.label}" if spec.is_baseline else f"trial-{trial.trial_id}"
    return (f"[{elapsed:6.0f}s] {done:>3}/{total} {who} {status:<10} "
            + (f"val acc {val:.4f} " if isinstance(val, (int, float)) and not res.get("infeasible") else "")
            + (f"acc {acc:.4f} " if isinstance(acc, (int, float)) else "")
            + (f"energy {en:.3f} uJ " if isinstance(en, (int, float)) else "")
            + f"| {spec.describe()} {extra}")


def _settle_stopped(uri: str, rid: Optional[str], res: dict[str, Any]) -> int:
    """Record a trial the scheduler stopped (or that stayed paused) as stopped; its epoch count.

    The count comes from the run's record where there is one: a stop can land before any report.
    """
    epochs = int(res.get("epoch", -1)) + 1
    if rid is not None:
        epochs = max(epochs, epochs_logged(uri, rid))
        settle_run(uri, rid, "stopped", stop_reason(epochs), epochs=epochs)
    return epochs


def _settle_errored(uri: str, rid: Optional[str], trial: Any) -> tuple[str, str]:
    """Settle the run of a trial Tune reports as errored; the status and reason to show.

    A run the trial already settled keeps its record; otherwise the trial's process died before
    it could say why, and Tune's error message is recorded as the failure's reason.
    """
    if rid is None:
        return "FAILED", ""
    from trainers.tracking import mlflow_client

    tags = mlflow_client(uri).get_run(rid).data.tags
    if tags.get(STATUS_TAG) not in ("failed", "stopped"):
        # The trial's process died before it could say why: take Tune's record
        # (a stop recorded meanwhile stays a stop).
        settle_run(uri, rid, "failed", str(getattr(trial, "error_msg", "") or "trial process died")[:500])
        tags = mlflow_client(uri).get_run(rid).data.tags
    reason = tags.get(REASON_TAG, "")
    if tags.get(STATUS_TAG) == "stopped":
        # A trial that the scheduler stopped, whose teardown Tune reported as an
        # error: the stop stays on record and is shown as one.
        return "stopped", reason.split(" (")[0]
    return "FAILED", reason


# ---------------------------------------------------------------------------- driver
def _max_concurrent(cfg: SearchConfig, log: Callable[[str], None] = print) -> int:
    """Trials at once: the user's number, or for "auto" what the alive nodes' CPUs and GPUs
    hold (:mod:`search.resources`). A cluster that cannot hold one trial yet (one that scales
    from zero GPU nodes) is asked for one trial's resources, and the search waits up to
    ``budget.autoscale_wait_s`` for them; the number is fixed when the search starts."""
    from search.resources import max_concurrent_auto

    if cfg.budget.max_concurrent_trials != "auto":
        return int(cfg.budget.max_concurrent_trials)
    return max_concurrent_auto(cfg.scale, float(cfg.budget.autoscale_wait_s), log=log)


def _study_storage(cfg: SearchConfig) -> Any:
    """The Optuna study's database (``objective.storage``, default a sqlite file in the search's
    folder), its tables created. A new search refuses a study of its name that already holds
    trials there (another search's history would steer this one's sampler); an empty one (a
    start that died before its first trial) is dropped.

    Raises:
        SearchExistsError: the study exists with trials.
        UserError: the database cannot be opened.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    from mixersnn.errors import UserError

    url = cfg.optuna_storage()
    if cfg.objective.storage is None:
        cfg.search_dir().mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(url)
        study_id = storage.get_study_id_from_name(cfg.name)
    except KeyError:
        return storage
    except SQLAlchemyError as err:
        raise UserError(f"objective.storage: cannot open the Optuna database {url!r} "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the URL, that the server "
                        f"answers and the user may create tables, or leave objective.storage out for a sqlite file "
                        f"beside the search") from None
    n = len(storage.get_all_trials(study_id, deepcopy=False))
    if n:
        raise SearchExistsError(
            f"objective.storage {url!r} already holds an Optuna study named {cfg.name!r} with {n} trial(s) (a search "
            f"of that name whose Tune state is elsewhere or gone); choose another name (--name) or storage, or "
            f"delete it: optuna delete-study --study-name {cfg.name} --storage {url}")
    storage.delete_study(study_id)
    return storage


def _searcher(cfg: SearchConfig, baselines: list[dict[str, Any]], first_rung: Optional[int] = None,
              storage: Any = None) -> Any:
    """Optuna through Tune's ``OptunaSearch`` (define-by-run :class:`search.space.Sampler`),
    behind :class:`Proposals`: the trained baselines come first and stay out of the study,
    and with MO-ASHA (``first_rung``) the study learns each trial's result at the first rung.
    The study is named after the search and kept in ``storage`` (an Optuna RDB storage;
    None: in memory, pickled with Tune's searcher state only)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if cfg.objective.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=cfg.objective.population_size, seed=cfg.seed)
    else:
        # Few trials: start modelling after a handful of random ones.
        startup = cfg.objective.startup_trials or max(2, min(8, cfg.budget.num_trials // 3))
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)
    names, modes = cfg.objective.metrics(cfg.acc_metric)
    if cfg.objective.mode == "multi":
        # Multi-objective: metric/mode on the searcher, TuneConfig's left unset.
        inner = OptunaSearch(space=Sampler(cfg), metric=names, mode=modes, sampler=sampler, study_name=cfg.name,
                             storage=storage)
    else:
        # Single objective: metric/mode on the searcher too. Tune hands TuneConfig's metric/mode
        # to a searcher only through set_search_properties, which it calls only with a
        # param_space, and OptunaSearch ignores it once it has a space (ours, define-by-run):
        # without them here the first suggestion raises. TuneConfig keeps them as well, for ASHA.
        inner = OptunaSearch(space=Sampler(cfg), metric=names[0], mode=modes[0], sampler=sampler,
                             study_name=cfg.name, storage=storage)
    return _proposals_cls()(inner, baselines, first_rung)


def _proposals_cls() -> type:
    from ray.tune.search import Searcher

    class Proposals(Searcher):
        """The search's searcher: the trained baselines first, then the inner searcher's
        proposals. Baseline trials' results never reach the inner searcher: they are
        references, not samples of the space.

        With ``first_rung`` (MO-ASHA pauses trials at rungs), each trial's result at that
        epoch completes its Optuna trial: most trials wait paused there, and Optuna, which
        takes no intermediate values with several objectives, would otherwise learn nothing
        from them until the search ends. The sampler so models every trial at one fidelity.

        ``new_trial_gate`` (set by MO-ASHA with ``max_running``): no proposal while it says no
        place is free, so the sampler proposes a trial only when it can start.
        """

        def __init__(self, inner: Any, baselines: list[dict[str, Any]], first_rung: Optional[int] = None) -> None:
            super().__init__(metric=inner.metric, mode=inner.mode)
            self.inner = inner
            self.pending = list(baselines)
            self.baseline_ids: set[str] = set()
            self.first_rung = first_rung
            self.told: set[str] = set()
            self.new_trial_gate: Optional[Callable[[], bool]] = None

        def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec: Any) -> bool:
            return self.inner.set_search_properties(metric, mode, config, **spec)

        def suggest(self, trial_id: str) -> Optional[dict[str, Any]]:
            gate = getattr(self, "new_trial_gate", None)  # absent from a searcher pickled before it existed
            if gate is not None and not gate():
                return None  # Tune asks again at its next step
            if self.pending:
                self.baseline_ids.add(trial_id)
                return {"resolved": self.pending.pop(0)}
            config = self.inner.suggest(trial_id)
            trial = self._study_trials().get(trial_id)
            if trial is not None and config is not None:
                _label_study_trial(trial, trial_id, config)
            return config

        def _study_trials(self) -> dict[str, Any]:
            """Tune trial id -> the Optuna trial asked for it (``OptunaSearch``'s own record;
            Ray's API gives no public view of it)."""
            return getattr(self.inner, "_ot_trials", {})

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            if trial_id in self.baseline_ids or trial_id in self.told:
                return
            _mark_screened(self._study_trials().get(trial_id), result)
            if self.first_rung is not None and int(result.get("epoch", -1)) + 1 == self.first_rung:
                self.told.add(trial_id)
                self.inner.on_trial_complete(trial_id, result=result)
                return
            self.inner.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: Optional[dict[str, Any]] = None, error: bool = False) -> None:
            if trial_id not in self.baseline_ids and trial_id not in self.told:
                _mark_screened(self._study_trials().get(trial_id), result)
                self.inner.on_trial_complete(trial_id, result=result, error=error)

        def save(self, checkpoint_path: str) -> None:
            _save_proposals(self, checkpoint_path)

        def restore(self, checkpoint_path: str) -> None:
            _restore_proposals(self, checkpoint_path)

    return Proposals


def _save_proposals(searcher: Any, checkpoint_path: str) -> None:
    """Tune's snapshot of the searcher; not the gate: the running scheduler's, which sets it
    again after a restore."""
    import pickle

    with open(checkpoint_path, "wb") as f:
        pickle.dump({k: v for k, v in searcher.__dict__.items() if k != "new_trial_gate"}, f)


def _restore_proposals(searcher: Any, checkpoint_path: str) -> None:
    """Tune's last snapshot of the searcher (``--resume``). With a study database the study is
    the database's, which is ahead of the snapshot: trials asked after it (by a driver killed
    before Tune saved them) stay RUNNING there, though Tune never runs them: they are closed as
    failed, so the sampler and the dashboard do not wait on them."""
    import pickle

    with open(checkpoint_path, "rb") as f:
        searcher.__dict__.update(pickle.load(f))
    study = getattr(searcher.inner, "_ot_study", None)
    if study is None or getattr(searcher.inner, "_storage", None) is None:
        return
    _fail_lost_trials(study, known={t.number for t in searcher._study_trials().values()})


#: The ``screened`` user attribute of a study trial the zero-cost pre-screen dropped.
SCREENED_NOTE = "dropped by the zero-cost pre-screen (prescreen:); never trained, its values are placeholders"


def _mark_screened(trial: Any, result: Optional[dict[str, Any]]) -> None:
    """A candidate the pre-screen dropped is told to Optuna with the infeasible path's dominated
    values (so the sampler moves away from it); the ``screened`` attribute tells the
    dashboard's reader that it never trained."""
    if trial is not None and result and result.get("screened"):
        trial.set_user_attr("screened", SCREENED_NOTE)


def _label_study_trial(trial: Any, trial_id: str, config: dict[str, Any]) -> None:
    """What the dashboard shows beside Optuna's number: Tune's trial id, which names the MLflow
    child run (trial-<id>), and why a proposal never trained."""
    trial.set_user_attr("tune_trial_id", trial_id)
    why = (config.get("resolved") or {}).get("infeasible")
    if why:
        trial.set_user_attr("infeasible", str(why)[:500])


#: The study attribute listing proposals lost with a killed driver (closed as failed), and why.
LOST_TRIALS_ATTR = "lost_trials"
LOST_REASON = "asked by a driver killed before Tune saved the trial; never run"


def _fail_lost_trials(study: Any, *, known: set[int]) -> None:
    """Close as failed the study's RUNNING trials that Tune's searcher snapshot does not know
    (asked by a driver killed before Tune saved them; Tune never runs them)."""
    from optuna.trial import TrialState

    lost = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in known]
    for number in lost:
        study.tell(number, state=TrialState.FAIL)
    if lost:
        # Optuna's public API sets user attributes only on running trials it handed out, so
        # the record is the study's: which numbers were lost, and why.
        before = list(study.user_attrs.get(LOST_TRIALS_ATTR, []))
        study.set_user_attr(LOST_TRIALS_ATTR, sorted(set(before) | set(lost)))
        study.set_user_attr(LOST_TRIALS_ATTR + "_reason", LOST_REASON)


def _scheduler(cfg: SearchConfig, num_trials: int, log: Optional[Callable[[str], None]] = None,
               max_running: Optional[int] = None) -> Any:
    """Successive halving over epochs, or None (no early stopping, or a single epoch).

    Single-objective mode: Ray's ASHA on accuracy. Multi-objective mode: MO-ASHA
    (:class:`search.scheduler.MultiObjectiveASHA`), its state kept in the search's folder, at
    most ``max_running`` trials training at once (paused ones not counted).
    """
    epochs = int(cfg.train.get("epochs", 10))
    if not cfg.asha.enabled or epochs <= cfg.asha.grace_period:
        return None
    if cfg.objective.mode == "single":
        from ray.tune.schedulers import ASHAScheduler

        # max_t one past the last epoch: ASHA stops a trial that reaches max_t at once, which
        # would cut off the final model upload after the last epoch's report.
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                             grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)
    from search.scheduler import MultiObjectiveASHA

    names, modes = cfg.objective.metrics(cfg.acc_metric)
    return MultiObjectiveASHA(metrics=names, modes=modes, max_t=epochs, grace_period=cfg.asha.grace_period,
                              reduction_factor=cfg.asha.reduction_factor, num_trials=num_trials,
                              state_file=str(cfg.search_dir() / _SCHEDULER_FILE), log=log, max_running=max_running)


def _ctx(cfg: SearchConfig, uri: str, parent_run_id: str, resume: bool) -> SearchContext:
    return SearchContext(tracking_uri=uri, experiment=cfg.experiment, parent_run_id=parent_run_id, search=cfg.name,
                         base_model=cfg.base_model, data=cfg.data, train=dict(cfg.train), scale=dict(cfg.scale),
                         train_storage=str(cfg.search_dir() / "train"), max_energy_uj=cfg.constraints.max_energy_uj,
                         resume=resume, prescreen=cfg.prescreen if cfg.prescreen.enabled else None)


def _record_estimates(cfg: SearchConfig, uri: str, parent: str) -> None:
    """A child run for each estimate-only baseline: its parameters and dense-bound energy,
    tagged ``mixersnn.trial_status=estimate``; nothing trains (reused on ``--resume``)."""
    from search.space import baseline_spec
    from trainers.tracking import MLflowTracker, start_run

    for b in cfg.baselines:
        if not b.estimate_only:
            continue
        spec = baseline_spec(cfg, b)
        rid = start_run(uri, cfg.experiment, spec.run_name, parent_run_id=parent,
                        tags={SEARCH_TAG: cfg.name, "mixersnn.kind": "baseline", BASELINE_TAG: b.label,
                              "mixersnn.trial_id": spec.run_name})
        tr = MLflowTracker(uri, rid)
        tr.log_params({"search.model": b.model, "search.label": b.label,
                       **{f"search.arch.{k}": v for k, v in spec.arch.items()}})
        tr.log_metrics({"num_params": spec.num_params, "search.energy_uj_dense": spec.energy_uj_dense}, step=0)
        settle_run(uri, rid, "estimate", "estimate only: not trained (baselines[].estimate_only)")


def _open_parent(cfg: SearchConfig, uri: str, resume: bool) -> str:
    """The search's MLflow parent run, recorded in the search's folder (``_PARENT_FILE``).

    A new search gets a new run, even when the experiment holds a search of the same name (at
    another storage path: a different search, whose runs must stay as they are); its child
    runs are then looked up under it alone. A search that has a record (``--resume``, or a
    start that died before Tune saved anything) reopens that run. A search resumed from
    before the record existed reopens its run found by name, as before.

    Raises:
        SearchExistsError: the record names another tracking URI than the search's, or, on
            ``--resume``, a run that store does not hold.
    """
    from trainers.tracking import find_run, reopen_run, start_run

    record = cfg.search_dir() / _PARENT_FILE
    if record.exists():
        rec = json.loads(record.read_text())
        if rec["tracking_uri"] != uri:
            raise SearchExistsError(
                f"the search at {cfg.search_dir()} is tracked at {rec['tracking_uri']!r} (run {rec['run_id']}), not "
                f"{uri!r}: set tracking_uri to {rec['tracking_uri']!r} to continue it, or choose another name (--name) "
                f"or storage_path for a new search")
        from mlflow.exceptions import MlflowException

        try:
            reopen_run(uri, rec["run_id"])
            return rec["run_id"]
        except MlflowException as err:
            if resume:
                raise SearchExistsError(
                    f"--resume: the search's parent run {rec['run_id']} (recorded in {record}) is not in {uri!r} "
                    f"({err.error_code}); point tracking_uri at the store that holds it, or start a new search "
                    f"under another name (--name) or storage_path") from None
            # A start that died before Tune saved anything, tracked in a store since replaced.
    legacy = find_run(uri, cfg.experiment, cfg.name) if resume else None
    if legacy is not None:
        reopen_run(uri, legacy)
        return legacy
    run_id = start_run(uri, cfg.experiment, cfg.name, tags={"mixersnn.kind": "search", SEARCH_TAG: cfg.name},
                       reuse=False)
    with atomic_path(record, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps({"tracking_uri": uri, "experiment": cfg.experiment, "run_id": run_id}))
    return run_id


def run_search(
    cfg: SearchConfig,
    *,
    resume: bool = False,
    ray_init_kwargs: Optional[dict[str, Any]] = None,
    quiet: bool = False,
    register: bool = True,
    log: Callable[[str], None] = print,
    callbacks: Optional[list[Any]] = None,
    system_metrics: bool = False,
) -> SearchResult:
    """Run (or resume) a search and summarise it in MLflow.

    Args:
        cfg: the search.
        resume: continue the search of this name from ``<storage_path>/<name>`` (the driver
            was killed): unfinished trials restart from their last checkpoint, finished ones
            are kept; errored trials stay errored.
        ray_init_kwargs: ``ray.init`` arguments when no Ray runtime is up (local runs).
        quiet: no per-trial progress lines.
        register: register the selected model in the MLflow model registry.
        log: where progress and the summary go.
        callbacks: more Tune callbacks (``ray.tune.Callback``) for a new search, e.g. to time trials.
        system_metrics: log each run's machine use (CPU, memory, GPU where present) as MLflow
            system metrics: the trials' runs from their processes, the parent run from this
            driver's (``trainers.tracking.monitor_system_metrics``). Trial processes learn it
            from the environment of a Ray runtime this driver starts; give a runtime started
            elsewhere ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true`` in its workers' environment.

    Raises:
        SearchExistsError: state exists and ``resume`` is False, or none exists and it is True,
            or (new search) its Optuna study database already holds a study of its name.
    """
    _set_tune_env()
    import ray
    from ray import tune

    from trainers.tracking import SYSTEM_METRICS_ENV, end_run, resolve_tracking_uri

    if system_metrics:
        os.environ[SYSTEM_METRICS_ENV] = "true"  # MLflow's switch: this driver's runs, and (below) Ray's workers
    t0 = time.time()
    uri = resolve_tracking_uri(cfg.tracking_uri)
    sdir = cfg.search_dir()
    _check_state(cfg, resume)
    # A resumed search's study comes back with Tune's searcher state, connected to its database.
    storage = None if resume else _study_storage(cfg)

    parent = _open_parent(cfg, uri, resume)
    _log_search_config(cfg, uri, parent, resume)
    _record_estimates(cfg, uri, parent)
    if not ray.is_initialized():
        _init_local_ray(ray_init_kwargs)

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=_ctx(cfg, uri, parent, resume)),
                                    trial_resources(cfg.scale))
    status = "FAILED"
    try:
        if resume:
            log(f"resuming search {cfg.name!r} from {sdir}")
            tuner = _restore(sdir, trainable)
        else:
            tuner = _new_search(cfg, trainable, uri, parent, quiet=quiet, log=log, callbacks=callbacks,
                                storage=storage)
        tuner.fit()
        result = finalize(cfg, uri, parent, register=register, log=log)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        _settle_interrupted(uri, parent)
        raise
    finally:
        end_run(uri, parent, status)
    return timed(result, uri, parent, t0)


def timed(result: SearchResult, uri: str, parent: str, t0: float) -> SearchResult:
    """``result`` with its wall time since ``t0``, also logged on the parent run (``search_wall_s``)."""
    from trainers.tracking import MLflowTracker

    result.wall_s = time.time() - t0
    MLflowTracker(uri, parent).log_metrics({"search_wall_s": result.wall_s}, step=0)
    return result


def _set_tune_env() -> None:
    """Tune's settings the search relies on, unless the user set them."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", _CHECKPOINT_PERIOD_S)
    # Ctrl-C raises KeyboardInterrupt in run_search (settled there) instead of Tune's graceful
    # stop, after which fit() returns as if the experiment had ended and the search would finalize.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Every epoch's checkpoint forces a snapshot of the experiment (num_to_keep), which is what
    # makes --resume lose at most one epoch; Tune warns about each burst of them.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _check_state(cfg: SearchConfig, resume: bool) -> None:
    """A new search needs a free folder, ``--resume`` one with Tune's state.

    Raises:
        SearchExistsError: naming the folder and the fix.
    """
    sdir = cfg.search_dir()
    exists = (sdir / "tuner.pkl").exists()
    if resume and not exists:
        raise SearchExistsError(f"--resume: no search state at {sdir}; start it without --resume "
                                f"(or point storage_path/name at the search to resume)")
    if not resume and exists:
        raise SearchExistsError(f"a search named {cfg.name!r} already exists at {sdir}; continue it with --resume, "
                                f"or choose another name (--name) or storage_path")


def _log_search_config(cfg: SearchConfig, uri: str, parent: str, resume: bool) -> None:
    """The whole search file on the parent run: as parameters and as ``search/search.json``."""
    from trainers.tracking import MLflowTracker

    ptr = MLflowTracker(uri, parent)
    flat = cfg.to_dict()
    ptr.log_params({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in flat.items()})
    ptr.log_dict(flat, "search/search.json")
    if resume:
        ptr.set_tags({"mixersnn.resumed": True})


def _init_local_ray(ray_init_kwargs: Optional[dict[str, Any]]) -> None:
    """Start a local Ray runtime (or join ``RAY_ADDRESS``'s, or ``--address``'s), its workers given
    ``LOCAL_WORKER_ENV`` and the system-metrics switch; their output stays in Ray's logs."""
    from trainers.tracking import SYSTEM_METRICS_ENV

    env = dict(LOCAL_WORKER_ENV)
    if os.environ.get(SYSTEM_METRICS_ENV):
        env[SYSTEM_METRICS_ENV] = os.environ[SYSTEM_METRICS_ENV]
    init_local_ray(ray_init_kwargs, env_vars=env, log_to_driver=False)


def _settle_interrupted(uri: str, parent: str) -> None:
    """After Ctrl-C (Tune's own handler is off: it would end the experiment as if finished): the
    trials that were training stop as they are; --resume continues them from Tune's last saved
    state and their checkpoints."""
    import ray

    ray.shutdown()  # the trials' processes end with the driver: none writes to its run after this
    for r in collect_trials(uri, parent):
        if r.status == "running":
            settle_run(uri, r.run_id, "stopped", "interrupted by the user (SIGINT); --resume continues it",
                       epochs=0)


def _new_search(cfg: SearchConfig, trainable: Any, uri: str, parent: str, *, quiet: bool,
                log: Callable[[str], None], callbacks: Optional[list[Any]], storage: Any = None) -> Any:
    """The Tune experiment of a new search: its trained baselines first, then the sampler's
    trials, under successive halving when ``asha`` is on; one line says what will run."""
    from search.space import baseline_spec

    baselines = [baseline_spec(cfg, b).to_dict() for b in cfg.baselines if not b.estimate_only]
    total = cfg.budget.num_trials + len(baselines)
    names, modes = cfg.objective.metrics(cfg.acc_metric)
    single = cfg.objective.mode == "single"
    progress = _tune_callback_cls()(total=total, uri=uri, experiment=cfg.experiment, parent_run_id=parent,
                                    quiet=quiet)
    n_conc = _max_concurrent(cfg, log)
    scheduler = _scheduler(cfg, total, progress.note, max_running=n_conc)
    # MO-ASHA pauses trials at rungs; Tune's concurrency limit would count them as running and
    # stop starting new ones. MO-ASHA keeps to n_conc itself (paused trials not counted).
    pausing = scheduler is not None and not single
    halving = ""
    if scheduler is not None:
        from search.scheduler import rung_milestones

        epochs = int(cfg.train.get("epochs", 10))
        rungs = rung_milestones(cfg.asha.grace_period, cfg.asha.reduction_factor, epochs)
        halving = f", {'ASHA' if single else 'MO-ASHA'} rungs at epochs {rungs} of {epochs}"
    log(f"search {cfg.name!r}: {cfg.budget.num_trials} trials"
        + (f" after {len(baselines)} baseline(s)" if baselines else "") + f", {n_conc} at a time"
        + (f", time budget {cfg.budget.time_budget_s:.0f} s" if cfg.budget.time_budget_s else "")
        + f", objectives {list(zip(names, modes))}{halving}; trials train "
        + ("in their own reused Tune processes" if in_process(cfg.scale) else "through Ray Train"))
    searcher = _searcher(cfg, baselines, cfg.asha.grace_period if pausing else None, storage)
    if storage is not None:
        import optuna

        study = optuna.load_study(study_name=cfg.name, storage=storage)  # the one the searcher created
        for k, v in {"search": cfg.name, "mlflow_experiment": cfg.experiment, "mlflow_parent_run_id": parent,
                     "tracking_uri": uri, "tune_state": str(cfg.search_dir())}.items():
            study.set_user_attr(k, v)
        log(f"Optuna study {cfg.name!r} in {cfg.optuna_storage()}; watch it live: "
            f"optuna-dashboard {cfg.optuna_storage()}")
    return _new_tuner(
        cfg.search_dir(), trainable, [progress, *(callbacks or [])], reuse_actors=in_process(cfg.scale),
        search_alg=searcher,
        scheduler=scheduler,
        metric=cfg.acc_metric if single else None,
        mode="max" if single else None,
        num_samples=total,
        max_concurrent_trials=None if pausing else n_conc,
        time_budget_s=cfg.budget.time_budget_s,
    )  # fmt: skip


def _new_tuner(directory: Path, trainable: Any, callbacks: list[Any], *, reuse_actors: bool,
               **tune_config: Any) -> Any:
    """A Tune experiment stored at ``directory``: no automatic retries (a failed trial stays
    failed and is reported), Tune's own console output off (the first callback prints progress),
    the last two checkpoints of each trial kept; with ``reuse_actors`` a finished trial's
    process takes the next trial (in-process training keeps what it loaded)."""
    from ray import tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors, **tune_config),
        run_config=tune.RunConfig(name=directory.name, storage_path=str(directory.parent), callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def link_selected_model(uri: str, parent: str, model_name: str, version: str) -> Optional[str]:
    """Record the registered model (an MLflow 3 logged model of the selected trial's run) as
    an output of the search's parent run: what the search produced. MLflow's UI tells a
    training run from an evaluation run by its model outputs (a run without one is listed
    under "Evaluation runs"), so the parent then reads as the training run it is.

    Returns:
        The logged model's id, or None when the version has none (a model registered from
        files rather than a logged model).
    """
    from mlflow.entities import LoggedModelOutput

    from trainers.tracking import mlflow_client

    client = mlflow_client(uri)
    mv = client.get_model_version(model_name, version)
    model_id = getattr(mv, "model_id", None)
    if not model_id and (mv.source or "").startswith("models:/m-"):
        # MLflow 3.17 leaves model_id empty on versions registered by log_model; the source
        # names the logged model.
        model_id = mv.source[len("models:/"):].split("/")[0]
    if not model_id:
        return None
    client.log_outputs(parent, [LoggedModelOutput(model_id=model_id, step=0)])
    return model_id


def _restore(directory: Path, trainable: Any) -> Any:
    """Continue the Tune experiment at ``directory``: unfinished trials restart from their last
    checkpoint, finished ones are kept, errored ones stay errored."""
    from ray import tune

    return tune.Tuner.restore(str(directory), trainable=trainable, resume_unfinished=True, resume_errored=False)


def finalize(cfg: SearchConfig, uri: str, parent: str, *, register: bool = True,
             log: Callable[[str], None] = print) -> SearchResult:
    """Settle leftover statuses, then log the Pareto front, plots and registry entry."""
    from search.tracking import (best_first, compare_baselines, format_comparison, format_prescreen, format_table,
                                 log_summary, pareto_front, prescreen_summary, register_best, select_best)
    from trainers.tracking import MLflowTracker

    rows = collect_trials(uri, parent)
    for r in rows:
        if r.status in ("running", "stopped"):
            # Nothing runs after tuner.fit() returns. A run still marked running was cut off
            # (the time budget stops trials without a callback, or the trial process was
            # killed before it could close its run); a stopped one may have finished another
            # epoch after the callback counted, or been closed FAILED by a late error path.
            # Either way its epochs are the ones it logged.
            why = "the search time budget, or the trial was killed" if r.status == "running" else None
            r.epochs = epochs_logged(uri, r.run_id)
            r.reason = stop_reason(r.epochs, why) if why else stop_reason(r.epochs)
            r.status = settle_run(uri, r.run_id, "stopped", r.reason, epochs=r.epochs)
    with_params = cfg.objective.include_params
    front = pareto_front(rows, with_params=with_params)
    names, modes = cfg.objective.metrics(cfg.acc_metric)
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    if cfg.objective.mode == "single":
        directions = ["maximize", "minimize"]  # the plots still show the accuracy/energy trade-off
    summary = log_summary(uri, parent, rows, front, title=f"{cfg.name}: accuracy vs energy per image",
                          directions=directions)
    best = select_best(rows, cfg.select.criterion, cfg.select.max_energy_uj)
    version = None
    if best is not None and register:
        version = register_best(uri, best, cfg.registered_model_name())
        MLflowTracker(uri, parent).set_tags({"mixersnn.best_run_id": best.run_id, "mixersnn.best_trial": best.trial_id,
                                             "mixersnn.registered_model": f"{cfg.registered_model_name()}/{version}"})
        link_selected_model(uri, parent, cfg.registered_model_name(), version)
    log("")
    if cfg.acc_metric == "test_acc" and cfg.mode == "trials":
        log("note: no training shards held out (train.holdout_shards: 0): trials were ranked and selected on the "
            "test split, so the selected trial's test accuracy is optimistic (the best of many noisy figures)")
    log(format_table(sorted(rows, key=best_first),
                     title=f"trials of {cfg.name!r} (best first; * = Pareto front, B = baseline)",
                     mark={r.run_id for r in front}))
    log("")
    log(format_table(front, title="Pareto front: accuracy (max) vs energy per image (min)"
                     + (" vs parameters (min)" if with_params else "")))
    comparison = format_comparison(compare_baselines(rows, front, with_params=with_params))
    if comparison:
        log("")
        log(comparison)
    prescreen = format_prescreen(prescreen_summary(rows))
    if prescreen:
        log("")
        log(prescreen)
    if best is not None:
        log(f"\nselected ({cfg.select.criterion}): trial-{best.trial_id} "
            + (f"val acc {best.val_acc:.4f} (held-out shards), " if best.val_acc is not None else "")
            + f"test acc {best.test_acc:.4f}, "
            f"{best.energy_uj:.3f} uJ/image, {best.num_params:,} params"
            + (f" -> registered as {cfg.registered_model_name()} version {version}" if version else ""))
    if best is not None and cfg.select.scale_family:
        from search.family import train_family

        train_family(cfg, uri, parent, best, log=log)  # the selected trial at the sizes asked for
    return SearchResult(cfg.name, parent, uri, rows, front, best, version, 0.0, summary)
