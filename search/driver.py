"""The search driver: Ray Tune over Ray Train trials, Optuna as the searcher, MLflow as the
record. The one file of the search that touches Ray Tune's API.

Layout of one search (``<storage_path>/<name>/``): Tune's experiment state (the resume point)
and ``train/`` with each trial's Ray Train run (``trial-<id>``, its checkpoints). In MLflow:
a parent run named after the search and a nested child run ``trial-<id>`` per trial. Names
come from the search name and Tune's trial ids, which Tune keeps on restore, so a resumed
driver reuses the parent run, continues the trials it lost from their last checkpoint, and
writes into the same child runs: no duplicates.

Trials that break the user's constraints never train: the sampler marks them infeasible, the
trial function records a child run tagged ``mixersnn.trial_status=infeasible`` with the
reason (status KILLED) and reports a dominated sentinel (accuracy 0 at its estimated energy)
so the searcher learns to avoid the region. Failed trials (NaN loss, crashed workers) are
tagged ``failed`` with the reason; Tune records the error and the search goes on.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mixersnn._atomic import atomic_path
from search.resources import TRIAL_CPU
from search.space import Sampler, SearchConfig
from search.tracking import BASELINE_TAG, REASON_TAG, SEARCH_TAG, STATUS_TAG, TrialRow
from trainers.ray_train import LOCAL_RUNTIME_ENV

__all__ = ["run_search", "SearchResult", "SearchExistsError"]

# Tune snapshots its experiment state (the resume point) at most this often; the default
# ("auto") can be minutes apart, and a driver killed in between restarts trials from scratch.
_CHECKPOINT_PERIOD_S = "2"
# The baselines' own Tune experiment, inside the search's folder.
_BASELINE_DIR = "baselines"
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


# ---------------------------------------------------------------------------- trial function
def _failure_reason(err: BaseException) -> str:
    """The root cause in one line (Ray wraps worker errors in several layers)."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "loss is" in ln:
            return ln[:500]
    return (lines[-1] if lines else type(err).__name__)[:500]


def record_failure(uri: str, run_id: str, err: BaseException) -> bool:
    """Mark a trial's run failed with the reason, unless it was already recorded as stopped.

    A trial that ASHA stopped also reaches the trial function's error path (``fit()`` sees the
    stop as an error), and that can run after the progress callback, or even ``finalize()``,
    recorded the stop (seen in CI). A stop is not a failure, so that record is kept.

    Returns:
        Whether the run was marked failed.
    """
    from mlflow.tracking import MlflowClient

    from trainers.tracking import MLflowTracker, end_run

    if MlflowClient(uri).get_run(run_id).data.tags.get(STATUS_TAG) == "stopped":
        return False
    MLflowTracker(uri, run_id).set_tags({STATUS_TAG: "failed", REASON_TAG: _failure_reason(err)})
    end_run(uri, run_id, "FAILED")
    return True


def _run_name(resolved: dict[str, Any], trial_id: str) -> str:
    """The child run's name (also the Train run's): ``trial-<Tune trial id>``, or the name the
    baseline carries (``<search>-baseline-<label>``: baselines have no random id, so the
    search name keeps two searches in one experiment apart)."""
    return resolved.get("run_name") or f"trial-{trial_id}"


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: record the child run, then train through Ray Train (or skip if infeasible).

    Args:
        config: Tune's config for the trial: the sampled Optuna values and ``resolved``
            (see :func:`search.space.suggest`).
        ctx: the search context (tracking, parent run, fixed training fields, scale).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.config import ScaleConfig, TrainConfig
    from trainers.ray_train import fit
    from trainers.tracking import MLflowTracker, end_run, start_run

    trial_id = ray.tune.get_context().get_trial_id()
    r = config["resolved"]
    kind = r.get("kind", "trial")  # "trial" (sampled) or "baseline" (a fixed model, see baselines:)
    run_name = _run_name(r, trial_id)
    uri = ctx["tracking_uri"]
    # Created here (before fit) so infeasible and crashed trials have a run too; fit() finds
    # it by name and logs into it. Reuse by name also makes a restarted trial write here.
    tags = {SEARCH_TAG: ctx["search"], "mixersnn.trial_id": trial_id, "mixersnn.kind": kind}
    if kind == "baseline":
        tags[BASELINE_TAG] = r["label"]
    run_id = start_run(uri, ctx["experiment"], run_name, parent_run_id=ctx["parent_run_id"], tags=tags)
    tr = MLflowTracker(uri, run_id)
    # Only on --resume: only a resumed search has runs of its own that may have trained.
    final = _trained_before(tr, r) if ctx["resume"] else None
    if final is not None:
        # Trained by the killed driver, which died before Tune recorded the trial's end (the
        # run is "ok" once fit returned): report the run's record instead of launching Train
        # again, which would restore the final checkpoint, train nothing and upload the same
        # model again (about 30 s of worker start-up for nothing).
        end_run(uri, run_id, "FINISHED")
        ray.tune.report(final)
        return

    sampled = {f"optuna.{k}": json.dumps(v) for k, v in config.items() if k != "resolved"}
    searched = {
        **sampled,
        **{f"arch.{k}": v for k, v in r["arch"].items()},
        **{f"hp.{k}": v for k, v in r["train"].items()},
        "trial_id": trial_id,
        "distributions": json.dumps(r.get("distributions", {})),
        **{k: r[k] for k in ("sampler", "sampler_generation", "model", "label") if r.get(k) is not None},
    }
    tr.log_params({f"search.{k}": v for k, v in searched.items()})
    tr.log_metrics({"num_params": r["num_params"], "search.energy_uj_dense": r["energy_uj_dense"],
                    "search.energy_uj_est": r["energy_uj_est"]}, step=0)

    if r.get("infeasible"):
        tr.set_tags({STATUS_TAG: "infeasible", REASON_TAG: r["infeasible"]})
        end_run(uri, run_id, "KILLED")
        ray.tune.report({"test_acc": 0.0, "energy_per_image_uj": float(r["energy_uj_est"]),
                         "num_params": float(r["num_params"]), "infeasible": 1, "search_final": 1})
        return

    tr.set_tags({STATUS_TAG: "running"})
    cfg = TrainConfig.from_dict({
        **ctx["train"], **r["train"], "model": r.get("model", ctx["base_model"]), "data": ctx["data"],
        "model_overrides": dict(r["arch"]), "tracking_uri": uri, "experiment": ctx["experiment"],
        "run_name": run_name, "parent_run_id": ctx["parent_run_id"],
    })
    scale = ScaleConfig(**ctx["scale"], storage_path=ctx["train_storage"], name=run_name)
    try:
        res = fit(cfg, scale, callbacks=[TuneReportCallback()])
    except Exception as err:
        record_failure(uri, run_id, err)
        raise
    m = res.metrics
    energy = m.get("energy_per_image_uj")
    cap = ctx.get("max_energy_uj")
    tags: dict[str, Any] = {STATUS_TAG: "ok"}
    if cap is not None and energy is not None and energy > cap and kind == "trial":
        # Passed the pre-training estimate (an assumed firing rate below 1) but not the
        # measurement: keep the result, never register it.
        tags.update({"mixersnn.over_energy_limit": True,
                     REASON_TAG: f"measured energy {energy:.4g} uJ > constraints.max_energy_uj={cap:g}"})
    tr.set_tags(tags)
    tr.log_metrics({"epochs_completed": int(m.get("epoch", -1)) + 1}, step=0)
    ray.tune.report(_final_report(r, m.get("test_acc"), energy))


def _final_report(resolved: dict[str, Any], test_acc: Optional[float], energy: Optional[float]) -> dict[str, Any]:
    """A trained trial's last Tune report: it carries every objective (parameters are not in
    Train's epoch reports)."""
    return {"test_acc": float(test_acc if test_acc is not None else 0.0),
            "energy_per_image_uj": float(energy if energy is not None else resolved["energy_uj_est"]),
            "num_params": float(resolved["num_params"]), "infeasible": 0, "search_final": 1}


def _trained_before(tr: Any, resolved: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The final report of a trial whose run (``tr``, an ``MLflowTracker``) already finished
    training (tagged ``ok``, which the trial function does only after ``fit`` returned, the
    final model logged), or None. Logs ``epochs_completed`` from the run's epoch record if the
    kill came before it."""
    from search.tracking import epochs_logged

    data = tr.client.get_run(tr.run_id).data
    if data.tags.get(STATUS_TAG) != "ok":
        return None
    if "epochs_completed" not in data.metrics:
        tr.log_metrics({"epochs_completed": epochs_logged(tr.uri, tr.run_id)}, step=0)
    return _final_report(resolved, data.metrics.get("test_acc"), data.metrics.get("energy_per_image_uj"))


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
            return find_run(self.uri, self.experiment, _run_name((trial.config or {}).get("resolved", {}), trial.trial_id),
                            getattr(self, "parent_run_id", None))

        def _line(self, trials: list, trial: Any, status: str, extra: str = "") -> None:
            if self.quiet:
                return
            # Counted here: the trial's own status is not final yet while callbacks run.
            self.done += 1
            done = self.done
            res = trial.last_result or {}
            acc = res.get("test_acc")
            en = res.get("energy_per_image_uj")
            resolved = (trial.config or {}).get("resolved", {})
            arch = resolved.get("arch", {})
            if resolved.get("kind") == "baseline":
                who = f"baseline {resolved['label']}"
                desc = f"{resolved.get('model')} " + (" ".join(f"{k}={v}" for k, v in arch.items()) or "(registry variant)")
            else:
                who = f"trial-{trial.trial_id}"
                desc = (f"C={arch.get('embed_dim')} d={arch.get('depths')} T={arch.get('T')} "
                        f"p={arch.get('patch_size')} spe={arch.get('spe')}")
            print(
                f"[{time.time() - self.t0:6.0f}s] {done:>3}/{self.total} {who} {status:<10} "
                + (f"acc {acc:.4f} " if isinstance(acc, (int, float)) else "")
                + (f"energy {en:.3f} uJ " if isinstance(en, (int, float)) else "")
                + f"| {desc} {extra}",
                flush=True,
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            res = trial.last_result or {}
            if res.get("infeasible"):
                self._line(trials, trial, "infeasible", f"({(trial.config['resolved'].get('infeasible') or '')[:80]})")
                return
            if res.get("search_final"):
                self._line(trials, trial, "done")
                return
            # Stopped between epochs by ASHA (the time budget stops trials without calling
            # this; finalize() settles those). The count comes from the run's record: Train
            # forwards the epoch index, but a stop can land before any epoch was reported.
            rid = self._child(trial)
            epochs = int(res.get("epoch", -1)) + 1
            if rid is not None:
                from search.tracking import epochs_logged

                epochs = max(epochs, epochs_logged(self.uri, rid))
            reason = f"stopped after {epochs} epoch(s) (ASHA early stopping or the search time budget)"
            if rid is not None:
                from trainers.tracking import MLflowTracker, end_run

                tr = MLflowTracker(self.uri, rid)
                tr.set_tags({STATUS_TAG: "stopped", REASON_TAG: reason})
                tr.log_metrics({"epochs_completed": epochs}, step=0)
                end_run(self.uri, rid, "KILLED")
            self._line(trials, trial, "stopped", f"({reason.split(' (')[0]})")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            rid = self._child(trial)
            status, reason = "FAILED", ""
            if rid is not None:
                from mlflow.tracking import MlflowClient

                tags = MlflowClient(self.uri).get_run(rid).data.tags
                if tags.get(STATUS_TAG) not in ("failed", "stopped"):
                    # The trial's process died before it could say why: take Tune's record
                    # (record_failure still keeps a stop recorded meanwhile).
                    err = RuntimeError(str(getattr(trial, "error_msg", "") or "trial process died"))
                    record_failure(self.uri, rid, err)
                    tags = MlflowClient(self.uri).get_run(rid).data.tags
                reason = tags.get(REASON_TAG, "")
                if tags.get(STATUS_TAG) == "stopped":
                    # A trial that ASHA stopped, whose teardown Tune reported as an error: the
                    # stop stays on record and is shown as one.
                    status, reason = "stopped", reason.split(" (")[0]
            self._line(trials, trial, status, f"({reason[:100]})")

    return SearchProgress


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


def _searcher(cfg: SearchConfig) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if cfg.objective.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=cfg.objective.population_size, seed=cfg.seed)
    else:
        # Few trials: start modelling after a handful of random ones.
        startup = cfg.objective.startup_trials or max(2, min(8, cfg.budget.num_trials // 3))
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)
    names, modes = cfg.objective.metrics()
    if cfg.objective.mode == "multi":
        # Multi-objective: metric/mode on the searcher, TuneConfig's left unset (no scheduler).
        return OptunaSearch(space=Sampler(cfg), metric=names, mode=modes, sampler=sampler)
    # Single objective: metric/mode on the searcher too. Tune hands TuneConfig's metric/mode to
    # a searcher only through set_search_properties, which it calls only with a param_space,
    # and OptunaSearch ignores it once it has a space (ours, define-by-run): without them here
    # the first suggestion raises. TuneConfig keeps them as well, for ASHA.
    return OptunaSearch(space=Sampler(cfg), metric=names[0], mode=modes[0], sampler=sampler)


def _ctx(cfg: SearchConfig, uri: str, parent_run_id: str, resume: bool) -> dict[str, Any]:
    return {
        "resume": resume,
        "tracking_uri": uri,
        "experiment": cfg.experiment,
        "parent_run_id": parent_run_id,
        "search": cfg.name,
        "base_model": cfg.base_model,
        "data": cfg.data,
        "train": dict(cfg.train),
        "scale": dict(cfg.scale),
        "train_storage": str(cfg.search_dir() / "train"),
        "max_energy_uj": cfg.constraints.max_energy_uj,
    }


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

    Raises:
        SearchExistsError: state exists and ``resume`` is False, or none exists and it is True.
    """
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", _CHECKPOINT_PERIOD_S)
    import ray
    from ray import tune

    from trainers.tracking import MLflowTracker, end_run, resolve_tracking_uri

    t0 = time.time()
    uri = resolve_tracking_uri(cfg.tracking_uri)
    sdir = cfg.search_dir()
    bdir = sdir / _BASELINE_DIR
    exists = (sdir / "tuner.pkl").exists() or (bdir / "tuner.pkl").exists()
    if resume and not exists:
        raise SearchExistsError(f"--resume: no search state at {sdir}; start it without --resume "
                                f"(or point storage_path/name at the search to resume)")
    if not resume and exists:
        raise SearchExistsError(f"a search named {cfg.name!r} already exists at {sdir}; continue it with --resume, "
                                f"or choose another name (--name) or storage_path")

    parent = _open_parent(cfg, uri, resume)
    ptr = MLflowTracker(uri, parent)
    flat = cfg.to_dict()
    ptr.log_params({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in flat.items()})
    ptr.log_dict(flat, "search/search.json")
    if resume:
        ptr.set_tags({"mixersnn.resumed": True})

    if not ray.is_initialized():
        env = dict(LOCAL_WORKER_ENV)
        # A new local runtime unless told otherwise (--address, or RAY_ADDRESS as set by `ray job
        # submit`): a bare ray.init() would join whatever cluster `ray start` last recorded in
        # /tmp/ray/ray_current_cluster on this machine, another user's or a dead one.
        kw: dict[str, Any] = {"address": os.environ.get("RAY_ADDRESS") or "local", "include_dashboard": True,
                              "dashboard_host": "127.0.0.1", "log_to_driver": False, "runtime_env": {"env_vars": env}}
        kw.update(ray_init_kwargs or {})
        ray.init(**kw)

    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=_ctx(cfg, uri, parent, resume)), {"CPU": TRIAL_CPU})
    # Trials at once, decided once for the baselines and the trials alike (with "auto" the
    # cluster could have grown or shrunk while the baselines trained), and only if something
    # new starts: a resumed Tune experiment keeps its own.
    concurrency = functools.cache(lambda: _max_concurrent(cfg, log))
    status = "FAILED"
    try:
        if cfg.baselines:
            _fit_baselines(cfg, trainable, uri, parent, resume=resume, quiet=quiet, log=log, concurrency=concurrency)
        if resume and (sdir / "tuner.pkl").exists():
            log(f"resuming search {cfg.name!r} from {sdir}")
            tuner = _restore(sdir, trainable)
        else:
            names, modes = cfg.objective.metrics()
            single = cfg.objective.mode == "single"
            scheduler = None
            if single:
                from ray.tune.schedulers import ASHAScheduler

                epochs = int(cfg.train.get("epochs", 10))
                # max_t one past the last epoch: ASHA stops a trial that reaches max_t at once,
                # which would cut off the final model upload after the last epoch's report.
                scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                                          grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)
            n_conc = concurrency()
            log(f"search {cfg.name!r}: {cfg.budget.num_trials} trials, {n_conc} at a time"
                + (f", time budget {cfg.budget.time_budget_s:.0f} s" if cfg.budget.time_budget_s else "")
                + f", objectives {list(zip(names, modes))}" + (" with ASHA" if single else ""))
            callback = _tune_callback_cls()(total=cfg.budget.num_trials, uri=uri, experiment=cfg.experiment,
                                            parent_run_id=parent, quiet=quiet)
            tuner = _new_tuner(
                sdir, trainable, callback,
                search_alg=_searcher(cfg),
                scheduler=scheduler,
                metric="test_acc" if single else None,
                mode="max" if single else None,
                num_samples=cfg.budget.num_trials,
                max_concurrent_trials=n_conc,
                time_budget_s=cfg.budget.time_budget_s,
            )  # fmt: skip
        tuner.fit()
        result = finalize(cfg, uri, parent, register=register, log=log)
        status = "FINISHED"
    finally:
        end_run(uri, parent, status)
    result.wall_s = time.time() - t0
    MLflowTracker(uri, parent).log_metrics({"search_wall_s": result.wall_s}, step=0)
    return result


def _fit_baselines(cfg: SearchConfig, trainable: Any, uri: str, parent: str, *, resume: bool, quiet: bool,
                   log: Callable[[str], None], concurrency: Callable[[], int]) -> None:
    """Train the search file's baselines, before the sampled trials: one fixed Tune trial each
    (a grid over their configs) through the same trial function, so each is trained once with
    the search's ``train:``, ``scale`` and per-trial budget and recorded as a child run tagged
    ``mixersnn.kind=baseline``. Constraints are not applied to them, and neither ASHA nor the
    search's ``budget.time_budget_s`` (which bounds the sampled trials) stops them; the
    per-trial ``train.time_budget_s`` bounds their training. Their own Tune experiment
    (``<search>/baselines``) makes them resumable like the trials: after a kill, finished
    baselines are kept and an unfinished one continues from its checkpoint."""
    from ray import tune

    from search.space import baseline_resolved

    bdir = cfg.search_dir() / _BASELINE_DIR
    callback = _tune_callback_cls()(total=len(cfg.baselines), uri=uri, experiment=cfg.experiment,
                                    parent_run_id=parent, quiet=quiet, what="baseline")
    if resume and (bdir / "tuner.pkl").exists():
        log(f"resuming the baselines of {cfg.name!r} from {bdir}")
        tuner = _restore(bdir, trainable)
    else:
        log(f"baselines of {cfg.name!r}: {', '.join(b.label for b in cfg.baselines)} (trained once each, before the "
            f"search's trials, with the same train config and per-trial budget; constraints not applied)")
        tuner = _new_tuner(bdir, trainable, callback, num_samples=1, max_concurrent_trials=concurrency(),
                           param_space={"resolved": tune.grid_search([baseline_resolved(cfg, b) for b in cfg.baselines])})
    tuner.fit()


def _new_tuner(directory: Path, trainable: Any, callback: Any, *, param_space: Optional[dict[str, Any]] = None,
               **tune_config: Any) -> Any:
    """A Tune experiment stored at ``directory`` (sampled trials and baselines alike): no
    actor reuse, no automatic retries (a failed trial stays failed and is reported), Tune's
    own console output off (``callback`` prints progress)."""
    from ray import tune

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=False, **tune_config),
        run_config=tune.RunConfig(name=directory.name, storage_path=str(directory.parent), callbacks=[callback],
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0),
    )


def _restore(directory: Path, trainable: Any) -> Any:
    """Continue the Tune experiment at ``directory``: unfinished trials restart from their last
    checkpoint, finished ones are kept, errored ones stay errored."""
    from ray import tune

    return tune.Tuner.restore(str(directory), trainable=trainable, resume_unfinished=True, resume_errored=False)


def finalize(cfg: SearchConfig, uri: str, parent: str, *, register: bool = True,
             log: Callable[[str], None] = print) -> SearchResult:
    """Settle leftover statuses, then log the Pareto front, plots and registry entry."""
    from search.tracking import (collect_trials, compare_baselines, epochs_logged, format_comparison, format_table,
                                 log_summary, pareto_front, register_best, select_best)
    from trainers.tracking import MLflowTracker, end_run

    rows = collect_trials(uri, parent)
    for r in rows:
        if r.status == "running":
            # Nothing runs after tuner.fit() returns: a run still marked running was cut off
            # (the search's time budget stops trials without a callback, or the trial process
            # was killed before it could close the run). Its epochs are the ones it logged.
            r.epochs = epochs_logged(uri, r.run_id)
            reason = f"stopped after {r.epochs} epoch(s) (the search time budget, or the trial was killed)"
            tr = MLflowTracker(uri, r.run_id)
            tr.set_tags({STATUS_TAG: "stopped", REASON_TAG: reason})
            tr.log_metrics({"epochs_completed": r.epochs}, step=0)
            end_run(uri, r.run_id, "KILLED")
            r.status, r.reason = "stopped", reason
        elif r.status == "stopped":
            # Stopped by ASHA: the trial function may have seen the stop as an error from fit()
            # and closed the run FAILED after the callback closed it KILLED; settle it now that
            # nothing runs any more.
            end_run(uri, r.run_id, "KILLED")
            # Its workers may also have finished another epoch while the stop travelled to
            # them (after the callback counted): count again.
            n = epochs_logged(uri, r.run_id)
            if n != r.epochs:
                r.epochs = n
                r.reason = f"stopped after {n} epoch(s) (ASHA early stopping or the search time budget)"
                MLflowTracker(uri, r.run_id).set_tags({REASON_TAG: r.reason})
                MLflowTracker(uri, r.run_id).log_metrics({"epochs_completed": n}, step=0)
    with_params = cfg.objective.include_params
    front = pareto_front(rows, with_params=with_params)
    names, modes = cfg.objective.metrics()
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
    log("")
    log(format_table(sorted(rows, key=lambda r: -(r.test_acc if r.test_acc is not None else -1)),
                     title=f"trials of {cfg.name!r} (best first; * = Pareto front, B = baseline)",
                     mark={r.run_id for r in front}))
    log("")
    log(format_table(front, title="Pareto front: accuracy (max) vs energy per image (min)"
                     + (" vs parameters (min)" if with_params else "")))
    comparison = format_comparison(compare_baselines(rows, front, with_params=with_params))
    if comparison:
        log("")
        log(comparison)
    if best is not None:
        log(f"\nselected ({cfg.select.criterion}): trial-{best.trial_id} acc {best.test_acc:.4f}, "
            f"{best.energy_uj:.3f} uJ/image, {best.num_params:,} params"
            + (f" -> registered as {cfg.registered_model_name()} version {version}" if version else ""))
    return SearchResult(cfg.name, parent, uri, rows, front, best, version, 0.0, summary)
