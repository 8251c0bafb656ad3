"""One search trial: its child run in MLflow, then training on one of two paths.

- **In the trial's own process** (one CPU worker, ``scale.num_workers: 1`` without GPUs): the
  training loop runs inside the Tune trial, which reports each epoch and its checkpoint through
  ``ray.tune.report`` and resumes from ``ray.tune.get_checkpoint()``. Tune reuses the trial's
  actor for the next trial, so what a trial loaded stays loaded (imports, compiled kernels, the
  decoded data set in :mod:`mixersnn.data.memory`): a trial starts training within seconds.
- **Through Ray Train** (several workers or GPUs): the trial launches a ``TorchTrainer``
  (:func:`trainers.ray_train.fit`) with Tune's report callback; multi-node DDP, worker restarts.

Both run :func:`trainers.loop.run_training`, log to the same child run from rank 0 and report
the same metrics, so the scheduler, the searcher and the record cannot tell them apart.

With ``prescreen:`` enabled, a proposed candidate is first scored without training
(:func:`prescreen_trial`: SNASNet's Hamming-kernel score on one fixed batch of training
images); one scoring below the ``drop_fraction`` quantile of the candidates scored before it
never trains (:func:`screen_decision`; its run is settled ``screened``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from search.space import TrialSpec
from search.tracking import BASELINE_TAG, SCORE_METRIC, SEARCH_TAG, STATUS_TAG

__all__ = ["run_trial", "SearchContext", "TrialOutcome", "trial_resources", "in_process", "record_failure",
           "final_report", "trained_before", "screen_decision", "score_quantile", "earlier_scores",
           "prescreen_trial", "scoring_batch", "candidate_model_config", "screened_report"]

#: The pre-screen's initialisations per candidate (SNASNet averages 2) and the first one's seed:
#: every candidate of every search is scored from the same seeds on the same batch.
SCORE_REPEATS = 2
SCORE_SEED = 0


def in_process(scale: dict[str, Any]) -> bool:
    """Whether trials of this ``scale:`` train in their own Tune process: ``in_process`` when
    set (false: always Ray Train), else when there is one worker and no GPU."""
    where = scale.get("in_process", "auto")
    if where != "auto":
        return bool(where)
    return int(scale.get("num_workers", 1)) == 1 and not scale.get("use_gpu", False)


def trial_resources(scale: dict[str, Any]) -> dict[str, float]:
    """What the Tune trial itself holds: the worker's resources when it trains in process,
    else a token 0.01 CPU (its Ray Train workers hold their own; Tune refuses ``{"CPU": 0}``).
    The first of :func:`search.resources.trial_bundles`."""
    from search.resources import trial_bundles

    return trial_bundles(scale)[0]


def _failure_reason(err: BaseException) -> str:
    """The root cause in one line (Ray wraps worker errors in several layers)."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "loss is" in ln:
            return ln[:500]
    return (lines[-1] if lines else type(err).__name__)[:500]


def record_failure(uri: str, run_id: str, err: BaseException) -> bool:
    """Mark a trial's run failed with the root cause of ``err``, unless it was already
    recorded as stopped (:func:`search.tracking.settle_run` keeps a stop).

    Returns:
        Whether the run was marked failed.
    """
    from search.tracking import settle_run

    return settle_run(uri, run_id, "failed", _failure_reason(err)) == "failed"


@dataclass(frozen=True)
class SearchContext:
    """What every trial of a search shares (handed to the trial function by Tune).

    Attributes:
        tracking_uri: the MLflow store.
        experiment: the MLflow experiment.
        parent_run_id: the search's parent run.
        search: the search's name.
        base_model: the registry variant trials start from.
        data: the data the trials train on.
        train: fixed TrainConfig fields for every trial.
        scale: the search's ``scale:`` section.
        train_storage: where Ray Train trials keep their runs.
        max_energy_uj: the user's energy limit (measured energy is checked again), or None.
        resume: whether this driver resumed a killed one.
        prescreen: the search's ``prescreen:`` section (a :class:`search.config.Prescreen`)
            when enabled, else None (every candidate trains).
    """

    tracking_uri: str
    experiment: str
    parent_run_id: str
    search: str
    base_model: str
    data: str
    train: dict[str, Any]
    scale: dict[str, Any]
    train_storage: str
    max_energy_uj: Optional[float] = None
    resume: bool = False
    prescreen: Optional[Any] = None


@dataclass(frozen=True)
class TrialOutcome:
    """A trial's last Tune report: every objective (parameters are not in the epoch reports)
    and ``search_final``, which tells the progress callback and the scheduler that the trial
    ended on its own (trained, or never trained because it is infeasible). ``val_acc``, the
    held-out shards' accuracy, is reported when the trial had them (and as the sentinel 0 by
    a trial that never trained, whichever accuracy the search ranks on)."""

    test_acc: float
    energy_per_image_uj: float
    num_params: float
    infeasible: bool = False
    screened: bool = False
    val_acc: Optional[float] = None

    def report(self) -> dict[str, Any]:
        """The report; a screened candidate's also says ``screened`` (it is reported as
        infeasible too: the scheduler and the searcher treat both alike)."""
        out = {"test_acc": self.test_acc, "energy_per_image_uj": self.energy_per_image_uj,
               "num_params": self.num_params, "infeasible": int(self.infeasible or self.screened), "search_final": 1}
        if self.screened:
            out["screened"] = 1
        if self.val_acc is not None or self.infeasible or self.screened:
            out["val_acc"] = self.val_acc if self.val_acc is not None else self.test_acc
        return out


def screened_report(spec: TrialSpec) -> dict[str, Any]:
    """The report of a candidate the pre-screen dropped: the infeasible path's dominated
    sentinel (accuracy 0 at its estimated energy), so the sampler learns it is poor."""
    return TrialOutcome(0.0, float(spec.energy_uj_est), float(spec.num_params), screened=True).report()


def final_report(spec: TrialSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """A trained trial's :class:`TrialOutcome` report from its last ``metrics`` (its
    estimate stands in for energy it never measured)."""
    energy, acc, val = (metrics.get(k) for k in ("energy_per_image_uj", "test_acc", "val_acc"))
    return TrialOutcome(float(acc if acc is not None else 0.0), float(energy if energy is not None else spec.energy_uj_est),
                        float(spec.num_params), val_acc=None if val is None else float(val)).report()


def trained_before(tr: Any, spec: TrialSpec) -> Optional[dict[str, Any]]:
    """The final report of a trial whose run (``tr``, an ``MLflowTracker``) already finished
    training (tagged ``ok``, which the trial function does only after training returned, the
    final model logged), or None. Logs ``epochs_completed`` from the run's epoch record if the
    kill came before it."""
    from search.tracking import epochs_logged

    data = tr.client.get_run(tr.run_id).data
    if data.tags.get(STATUS_TAG) != "ok":
        return None
    if "epochs_completed" not in data.metrics:
        tr.log_metrics({"epochs_completed": epochs_logged(tr.uri, tr.run_id)}, step=0)
    return final_report(spec, data.metrics)


def _train_here(cfg: Any, tracker: Any, threads: int) -> dict[str, Any]:
    """The training loop in this Tune trial's process: each epoch's metrics and checkpoint go
    to ``ray.tune.report``; a restored trial resumes from Tune's last checkpoint."""
    import ray
    import ray.tune
    import torch

    from trainers.loop import WorkerContext, run_training
    from trainers.ray_train import local_checkpoint

    torch.set_num_threads(max(1, threads))
    node_id = ray.get_runtime_context().get_node_id()
    tracker.set_tags({"mixersnn.node_ids": node_id, "mixersnn.num_nodes": 1})

    def report(metrics: dict[str, Any], ckpt_dir: Optional[Path]) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.tune.report({**metrics, "num_nodes": 1, "worker_node_ids": node_id}, checkpoint=checkpoint)

    with local_checkpoint(ray.tune.get_checkpoint()) as resume_dir:
        return run_training(cfg, WorkerContext(report=report, resume_dir=resume_dir, tracker=tracker,
                                               log=lambda s: print(s, flush=True)))


def _record_spec(tr: Any, spec: TrialSpec, config: dict[str, Any], trial_id: str) -> None:
    """The trial's proposal on its run: what Optuna sampled, the architecture and
    hyperparameters, and what is known before training (parameters, energy estimates)."""
    sampled = {f"optuna.{k}": json.dumps(v) for k, v in config.items() if k != "resolved"}
    searched = {
        **sampled,
        **{f"arch.{k}": v for k, v in spec.arch.items()},
        **{f"hp.{k}": v for k, v in spec.train.items()},
        "trial_id": trial_id,
        "distributions": json.dumps(spec.distributions),
        **{k: getattr(spec, k) for k in ("sampler", "sampler_generation", "model", "label")
           if getattr(spec, k) not in (None, "")},
    }
    tr.log_params({f"search.{k}": v for k, v in searched.items()})
    tr.log_metrics({"num_params": spec.num_params, "search.energy_uj_dense": spec.energy_uj_dense,
                    "search.energy_uj_est": spec.energy_uj_est}, step=0)


# ---------------------------------------------------------------------------- zero-cost pre-screen
def score_quantile(values: Any, q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation between order statistics
    (numpy's default, "type 7"): the sorted values at positions ``0 .. n-1`` and position
    ``q * (n - 1)`` between them.

    Raises:
        ValueError: no values, or ``q`` outside [0, 1].
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("score_quantile of no values: give at least one score")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q!r} must be in [0, 1]")
    h = q * (len(xs) - 1)
    lo = int(math.floor(h))
    frac = h - lo
    if frac == 0.0 or xs[lo] == xs[lo + 1]:
        return xs[lo]
    return (1.0 - frac) * xs[lo] + frac * xs[lo + 1]  # no overflow between huge values of both signs


def screen_decision(score: float, earlier: Any, drop_fraction: float, warmup: int) -> bool:
    """Whether a candidate never trains: at least ``warmup`` (and at least one) candidates
    were scored before it, and its ``score`` is strictly below the ``drop_fraction`` quantile
    of their scores (:func:`score_quantile`). ``drop_fraction`` 0 never screens (the 0
    quantile is the lowest earlier score, which a new low score would fall below).

    Args:
        score: the candidate's zero-cost score.
        earlier: the scores of the search's candidates scored before it (baselines excluded).
        drop_fraction: ``prescreen.drop_fraction``, in [0, 1).
        warmup: ``prescreen.warmup``, >= 0.

    Raises:
        ValueError: ``drop_fraction`` or ``warmup`` out of range, or a NaN score.
    """
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction={drop_fraction!r} must be in [0, 1) (0.3: the lowest-scoring 30% never train)")
    if warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an integer >= 0")
    earlier = [float(v) for v in earlier]
    if math.isnan(score) or any(math.isnan(v) for v in earlier):
        raise ValueError(f"score={score!r} or an earlier score is NaN: a zero-cost score is a number or -inf")
    if drop_fraction == 0.0 or not earlier or len(earlier) < warmup:
        return False
    return float(score) < score_quantile(earlier, drop_fraction)


def earlier_scores(uri: str, parent_run_id: str, exclude_run_id: Optional[str] = None) -> list[float]:
    """The zero-cost scores (``search.zero_cost_score``) logged so far by the search's
    candidates: the child runs of ``parent_run_id``, less baselines and ``exclude_run_id``."""
    from trainers.tracking import mlflow_client

    client = mlflow_client(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000)
    return [float(r.data.metrics[SCORE_METRIC]) for r in runs
            if SCORE_METRIC in r.data.metrics and r.info.run_id != exclude_run_id
            and r.data.tags.get("mixersnn.kind") != "baseline"]


#: The scoring batch of this process, by (split, held-out shards, image size, batch size):
#: Tune reuses a trial's process for the next trial, which so reads it once.
_BATCHES: dict[tuple[str, int, int, int], Any] = {}


def scoring_batch(data: str, *, img_size: int, batch_size: int, holdout_shards: int = 0) -> Any:
    """The pre-screen's images: the first ``batch_size`` images of the training split of
    ``data`` (less its held-out shards), in stored order, with the evaluation transform at
    ``img_size``: the same images for every candidate. Cached per process.

    Returns:
        A float tensor ``[B, C, img_size, img_size]`` (B < ``batch_size`` only for a smaller split).
    """
    from mixersnn.data import build_loader, eval_preset
    from trainers.loop import resolve_data, train_source

    spec = resolve_data(data)
    key = (str(spec.train), int(holdout_shards), int(img_size), int(batch_size))
    if key not in _BATCHES:
        loader = build_loader(train_source(spec, holdout_shards), batch_size=batch_size, train=False,
                              transform=eval_preset(img_size, source_size=spec.img_size), rank=0, world_size=1)
        images, _ = next(iter(loader))
        _BATCHES[key] = images
    return _BATCHES[key]


def candidate_model_config(cfg: Any) -> Any:
    """The :class:`~mixersnn.models.MixerSNNConfig` that training builds from ``cfg`` (a
    TrainConfig): the registry variant at the data's image size, channels and classes, then
    the trial's ``model_overrides`` (as :func:`trainers.loop.run_training` does)."""
    from mixersnn.models import model_config
    from trainers.loop import resolve_data

    spec = resolve_data(cfg.data)
    overrides = {"img_size": spec.img_size, "in_chans": spec.in_chans, "num_classes": spec.num_classes}
    overrides.update(cfg.model_overrides)
    return model_config(cfg.model, **overrides)


def prescreen_trial(tr: Any, cfg: Any, prescreen: Any, parent_run_id: str) -> Optional[str]:
    """Score a candidate before it trains and decide whether it trains.

    Scores in this process, on the CPU (:func:`mixersnn.accounting.zero_cost.score_config`,
    :data:`SCORE_REPEATS` initialisations from :data:`SCORE_SEED`, on :func:`scoring_batch`).
    Logs the score on the candidate's run (``search.zero_cost_score``, step 0; a singular
    kernel's ``-inf`` as the lowest float, as MLflow would store it), then compares it with
    the scores of the search's other candidates on record (:func:`earlier_scores`,
    :func:`screen_decision`).

    Args:
        tr: the candidate's run (an ``MLflowTracker``).
        cfg: the TrainConfig it would train with.
        prescreen: the search's ``prescreen:`` section.
        parent_run_id: the search's parent run.

    Returns:
        Why it is screened out, or None when it trains.
    """
    from mixersnn.accounting.zero_cost import score_config

    mc = candidate_model_config(cfg)
    images = scoring_batch(cfg.data, img_size=mc.img_size, batch_size=prescreen.batch_size,
                           holdout_shards=cfg.holdout_shards)
    score = score_config(mc, images, seed=SCORE_SEED, repeats=SCORE_REPEATS)
    score = min(max(score, -sys.float_info.max), sys.float_info.max)
    tr.log_metrics({SCORE_METRIC: score}, step=0)
    earlier = earlier_scores(tr.uri, parent_run_id, exclude_run_id=tr.run_id)
    if not screen_decision(score, earlier, prescreen.drop_fraction, prescreen.warmup):
        return None
    cut = score_quantile(earlier, prescreen.drop_fraction)
    return (f"screened out before training: zero-cost score {score:.4g} < {cut:.4g}, the "
            f"{prescreen.drop_fraction:g} quantile of the {len(earlier)} candidates scored before it "
            f"(prescreen.drop_fraction)")


def run_trial(config: dict[str, Any], ctx: SearchContext) -> None:
    """One Tune trial: record the child run, then train (or skip if infeasible, or screened
    out by the zero-cost pre-screen: ``ctx.prescreen``, only when the run is first entered,
    never for a baseline; a paused, promoted or resumed trial keeps its first decision).

    Args:
        config: Tune's config for the trial: the sampled Optuna values and ``resolved`` (a
            :class:`~search.space.TrialSpec` as a dict).
        ctx: what the search's trials share.
    """
    import ray.tune

    from search.tracking import settle_run
    from trainers.config import TrainConfig
    from trainers.tracking import MLflowTracker, start_run

    trial_id = ray.tune.get_context().get_trial_id()
    spec = TrialSpec.from_dict(config["resolved"])
    name = spec.name(trial_id)
    uri = ctx.tracking_uri
    # Created here (before training) so infeasible and crashed trials have a run too; training
    # finds it by name and logs into it. Reuse by name also makes a restarted or promoted
    # trial write here.
    tags = {SEARCH_TAG: ctx.search, "mixersnn.trial_id": trial_id, "mixersnn.kind": spec.kind}
    if spec.is_baseline:
        tags[BASELINE_TAG] = spec.label
    run_id = start_run(uri, ctx.experiment, name, parent_run_id=ctx.parent_run_id, tags=tags)
    tr = MLflowTracker(uri, run_id)
    # Only on --resume: only a resumed search has runs of its own that may have trained.
    final = trained_before(tr, spec) if ctx.resume else None
    if final is not None:
        # Trained by the killed driver, which died before Tune recorded the trial's end (the
        # run is "ok" once training returned): report the run's record instead of training
        # again, which would restore the final checkpoint, train nothing and upload the same
        # model again.
        settle_run(uri, run_id, "ok")
        ray.tune.report(final)
        return

    data = tr.client.get_run(run_id).data
    if data.tags.get(STATUS_TAG) == "screened":
        # Screened out by the killed driver, before Tune recorded the trial's end: the same end.
        settle_run(uri, run_id, "screened")
        ray.tune.report(screened_report(spec))
        return
    first_entry = "num_params" not in data.metrics  # not when a paused trial resumes, or a promoted one
    if first_entry:
        _record_spec(tr, spec, config, trial_id)

    if spec.infeasible:
        settle_run(uri, run_id, "infeasible", spec.infeasible)
        ray.tune.report(TrialOutcome(0.0, float(spec.energy_uj_est), float(spec.num_params), infeasible=True).report())
        return

    here = in_process(ctx.scale)
    cfg = TrainConfig.from_dict({
        **ctx.train, **spec.train, "model": spec.model or ctx.base_model, "data": ctx.data,
        "model_overrides": dict(spec.arch), "tracking_uri": uri, "experiment": ctx.experiment,
        "run_name": name, "parent_run_id": ctx.parent_run_id,
    })
    if ctx.prescreen is not None and first_entry and not spec.is_baseline:
        try:
            why = prescreen_trial(tr, cfg, ctx.prescreen, ctx.parent_run_id)
        except Exception as err:
            record_failure(uri, run_id, err)
            raise
        if why is not None:
            settle_run(uri, run_id, "screened", why)
            ray.tune.report(screened_report(spec))
            return
    m = _train_trial(cfg, tr, ctx, spec, name, here=here)
    _settle_trained(tr, ctx, spec, m)


def _train_trial(cfg: Any, tr: Any, ctx: SearchContext, spec: TrialSpec, name: str, *, here: bool) -> dict[str, Any]:
    """Train the trial in this process (``here``) or through Ray Train; returns the last
    epoch's metrics. A failure is recorded on the run and raised."""
    from search.resources import scale_config

    uri, run_id = ctx.tracking_uri, tr.run_id
    tr.set_tags({STATUS_TAG: "running", "mixersnn.trial_path": "in-process" if here else "ray-train"})
    try:
        # The one typed record of what this trial trains: `mixersnn train --from-run` reads it.
        from trainers.spec import RunSpec, log_run_spec

        log_run_spec(tr, RunSpec.of(cfg, kind=spec.kind, num_workers=int(ctx.scale.get("num_workers", 1))))
        if here:
            m = _train_here(cfg, tr, int(float(ctx.scale.get("cpus_per_worker", 1.0))))
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            from trainers.ray_train import fit

            scale = scale_config(ctx.scale, storage_path=ctx.train_storage, name=name)
            m = fit(cfg, scale, callbacks=[TuneReportCallback()]).metrics
    except Exception as err:
        record_failure(uri, run_id, err)
        raise
    return m


def _settle_trained(tr: Any, ctx: SearchContext, spec: TrialSpec, m: dict[str, Any]) -> None:
    """Close a trained trial's run ("ok", tagged when its measured energy broke the limit)
    and report its outcome to Tune."""
    import ray.tune

    from search.tracking import settle_run

    uri, run_id = ctx.tracking_uri, tr.run_id
    energy = m.get("energy_per_image_uj")
    reason, over = None, {}
    if ctx.max_energy_uj is not None and energy is not None and energy > ctx.max_energy_uj and not spec.is_baseline:
        # Passed the pre-training estimate (an assumed firing rate below 1) but not the
        # measurement: keep the result, never register it.
        reason = f"measured energy {energy:.4g} uJ > constraints.max_energy_uj={ctx.max_energy_uj:g}"
        over = {"mixersnn.over_energy_limit": True}
    settle_run(uri, run_id, "ok", reason, epochs=int(m.get("epoch", -1)) + 1, tags=over)
    ray.tune.report(final_report(spec, m))
