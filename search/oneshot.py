"""One-shot search (``mode: oneshot``): train a weight-sharing supernet once, score its
subnets in seconds each, retrain the front's finalists stand-alone.

The phases, each resumable (``--resume`` skips what is done; ``<search dir>/oneshot.json``
records it):

1. **Supernet.** One Ray Train run of :class:`mixersnn.models.MixerSNNSupernet` over
   ``oneshot.space`` (sandwich rule, :func:`trainers.loop._sandwich_step`), on the training
   split less its last ``holdout_shards`` shards, as the child run ``<name>-supernet`` (DDP
   over as many workers and GPUs as ``scale:`` gives it).
2. **Scoring.** Optuna's sampler (``objective.sampler``: NSGA-II or multi-objective TPE)
   proposes subnets; each is scored by a Ray task: the subnet is extracted, its BatchNorm
   statistics re-estimated on ``calib_images`` training images, its accuracy measured on the
   held-out shards (never the test split) and its energy from the firing rates of that pass.
   ``parallel`` tasks are in flight at once; the study lives in the search's Optuna database.
3. **Finalists.** ``finalists`` subnets spread along the scored front are retrained
   stand-alone through Ray Train, as the search's trials (child runs with the same tags,
   parameters and run spec as trial-mode trials, so ``mixersnn report``, ``train
   --from-run`` and the registry treat them alike), and the search is summarised like a
   trial-mode search, plus predicted (supernet, held-out) against real (stand-alone, test)
   accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from search.config import SearchConfig
from search.tracking import SEARCH_TAG

__all__ = ["run_oneshot", "Score", "score_subnets", "pick_finalists", "score_fronts", "format_finalists",
           "load_finalists", "STATE_FILE"]

#: Phase record of a one-shot search, in its folder.
STATE_FILE = "oneshot.json"
#: Batch size of the scoring passes (calibration and held-out evaluation).
SCORE_BATCH = 250


@dataclass
class Score:
    """One subnet scored on the supernet.

    Attributes:
        spec: the subnet (:class:`mixersnn.models.SubnetSpec` as a dict).
        acc: held-out accuracy after BatchNorm recalibration (the prediction).
        energy_uj: energy per image from the firing rates of the held-out pass.
        num_params: the subnet's parameter count.
        firing_rate: mean input firing rate of its spiking layers.
        seconds: wall time of the scoring (calibration and evaluation).
        number: the Optuna trial number.
    """

    spec: dict[str, Any]
    acc: float
    energy_uj: float
    num_params: int
    firing_rate: float
    seconds: float
    number: int = -1


# ----------------------------------------------------------------------------- scoring (Ray tasks)
_CACHE: dict[str, Any] = {}


def _scoring_data(data: str, holdout_shards: int, calib_images: int, eval_images: Optional[int]) -> tuple[list, list]:
    """Calibration batches (the first ``calib_images`` of the training shards the supernet
    trained on) and evaluation batches (the held-out shards), decoded once per process."""
    key = json.dumps([data, holdout_shards, calib_images, eval_images])
    if key not in _CACHE:
        from mixersnn.data import build_loader, eval_preset
        from trainers.loop import holdout_source, resolve_data, train_source

        spec = resolve_data(data)
        tf = eval_preset(spec.img_size, source_size=spec.img_size)

        def take(source: Any, limit: Optional[int]) -> list:
            out, n = [], 0
            loader = build_loader(source, batch_size=SCORE_BATCH, train=False, transform=tf, rank=0, world_size=1)
            for x, y in loader:
                if limit is not None and n >= limit:
                    break
                if limit is not None and n + len(y) > limit:
                    x, y = x[: limit - n], y[: limit - n]
                out.append((x, y))
                n += len(y)
            return out

        _CACHE[key] = (take(train_source(spec, holdout_shards), calib_images),
                       take(holdout_source(spec, holdout_shards), eval_images))
    return _CACHE[key]


def _supernet(state: dict[str, Any]) -> Any:
    """The supernet of a state (``{"key", "config", "space", "model"}``), built once per process."""
    cached = _CACHE.get("supernet")
    if cached is not None and cached[0] == state["key"]:
        return cached[1]
    from mixersnn.models import MixerSNNConfig
    from mixersnn.models.supernet import MixerSNNSupernet, SupernetSpace

    net = MixerSNNSupernet(MixerSNNConfig.from_dict(state["config"]), SupernetSpace.from_dict(state["space"]))
    net.load_state_dict(state["model"])
    net.eval()
    _CACHE["supernet"] = (state["key"], net)
    return net


def score_subnets(state: dict[str, Any], specs: Sequence[dict[str, Any]], *, data: str, holdout_shards: int,
                  calib_images: int, eval_images: Optional[int], threads: int = 1) -> list[Score]:
    """Score ``specs`` on the supernet of ``state`` (see the module docstring, phase 2).

    Args:
        state: ``{"key": a name unique to these weights, "config": the largest subnet's
            MixerSNNConfig dict, "space": the SupernetSpace dict, "model": the state dict}``.
        specs: subnets (SubnetSpec dicts).
        data, holdout_shards: the search's data and held-out shards.
        calib_images: training images for BatchNorm recalibration.
        eval_images: held-out images to score on (None: all).
        threads: torch threads of this process.
    """
    import torch

    from mixersnn.models.supernet import SubnetSpec
    from trainers.energy import EnergyMeter

    torch.set_num_threads(max(1, int(threads)))
    net = _supernet(state)
    calib, held = _scoring_data(data, holdout_shards, calib_images, eval_images)
    out = []
    for d in specs:
        t0 = time.perf_counter()
        spec = SubnetSpec.from_dict(d)
        model = net.extract_calibrated(spec, (x for x, _ in calib))
        meter = EnergyMeter(model)
        correct = seen = 0
        with torch.no_grad(), meter.recording():
            for x, y in held:
                correct += int((model(x).mean(0).argmax(1) == y).sum())
                seen += len(y)
        summ = meter.summary(model.config)
        out.append(Score(spec=spec.to_dict(), acc=correct / max(seen, 1), energy_uj=float(summ["energy_per_image_uj"]),
                         num_params=sum(p.numel() for p in model.parameters()),
                         firing_rate=float(summ["mean_firing_rate"]), seconds=time.perf_counter() - t0))
    return out


# ----------------------------------------------------------------------------- fronts
def score_fronts(scores: Sequence[Score]) -> list[list[int]]:
    """Indices of ``scores`` by non-dominated sorting of (accuracy up, energy down), the front
    first (MO-ASHA's sorting, :func:`search.scheduler.non_dominated_fronts`)."""
    from search.scheduler import non_dominated_fronts

    return non_dominated_fronts([(-s.acc, s.energy_uj) for s in scores])


def pick_finalists(scores: Sequence[Score], k: int) -> list[Score]:
    """``k`` scored subnets spread along the front: the front's points sorted by energy, taken
    at evenly spaced positions (both ends included); a front with fewer than ``k`` points is
    filled from the next layers, most accurate first. Duplicate subnets count once."""
    unique: dict[str, Score] = {}
    for s in scores:
        unique.setdefault(json.dumps(s.spec, sort_keys=True), s)
    pool = list(unique.values())
    layers = score_fronts(pool)
    chosen: list[Score] = []
    for layer in layers:
        members = sorted((pool[i] for i in layer), key=lambda s: (s.energy_uj, -s.acc))
        need = k - len(chosen)
        if need <= 0:
            break
        if len(members) <= need:
            chosen.extend(members)
        elif need == 1:
            chosen.append(max(members, key=lambda s: s.acc))
        else:
            picks = sorted({round(i * (len(members) - 1) / (need - 1)) for i in range(need)})
            chosen.extend(members[i] for i in picks)
    return chosen


# ----------------------------------------------------------------------------- the search
class _State:
    """``<search dir>/oneshot.json``: which phases are done (atomically rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        from mixersnn._atomic import atomic_path

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(self.data, indent=2))


def run_oneshot(cfg: SearchConfig, *, resume: bool = False, ray_init_kwargs: Optional[dict[str, Any]] = None,
                register: bool = True, log: Callable[[str], None] = print, system_metrics: bool = False) -> Any:
    """Run (or ``resume``) a one-shot search and summarise it like a trial-mode search.

    Returns:
        The :class:`search.driver.SearchResult` of the finalists, with ``summary`` holding the
        one-shot figures (``oneshot_*``: evaluations, seconds per evaluation, the Kendall tau
        of predicted against real accuracy over the finalists).

    Raises:
        SearchExistsError: state exists and ``resume`` is False, or none exists and it is True.
    """
    import ray

    from search.driver import (SearchExistsError, _init_local_ray, _log_search_config, _open_parent,
                               _record_estimates, finalize, timed)
    from trainers.tracking import SYSTEM_METRICS_ENV, end_run, resolve_tracking_uri

    if system_metrics:
        os.environ[SYSTEM_METRICS_ENV] = "true"
    t0 = time.time()
    state = _State(cfg.search_dir() / STATE_FILE)
    if resume and not state.path.exists():
        raise SearchExistsError(f"--resume: no one-shot search state at {state.path}; start it without --resume")
    if not resume and state.path.exists():
        raise SearchExistsError(f"a search named {cfg.name!r} already exists at {cfg.search_dir()}; continue it "
                                f"with --resume, or choose another name (--name) or storage_path")
    state.save()
    uri = resolve_tracking_uri(cfg.tracking_uri)
    parent = _open_parent(cfg, uri, resume)
    _log_search_config(cfg, uri, parent, resume)
    _record_estimates(cfg, uri, parent)
    if not ray.is_initialized():
        _init_local_ray(ray_init_kwargs)
    status = "FAILED"
    try:
        sup = _train_supernet(cfg, uri, parent, state, log)
        scores = _score(cfg, sup, state, log)
        finalists = pick_finalists(scores, cfg.oneshot.finalists)
        log(f"finalists ({len(finalists)}, spread along the scored front): "
            + "; ".join(f"{_arch(s.spec)} predicted {s.acc:.4f} at {s.energy_uj:.3f} uJ" for s in finalists))
        for i, s in enumerate(finalists):
            _retrain(cfg, uri, parent, state, i, s, log)
        _train_baselines(cfg, uri, parent, state, log)
        result = finalize(cfg, uri, parent, register=register, log=log)
        result.summary.update(_summarise(cfg, uri, parent, scores, finalists, state, log))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_run(uri, parent, status)
    return timed(result, uri, parent, t0)


def _arch(spec: dict[str, Any]) -> str:
    width = (f"w={'-'.join(str(w) for w in spec['widths'])}" if spec.get("widths") is not None
             else f"C={spec['embed_dim']}")  # fmt: skip
    return f"{width} d={'-'.join(str(d) for d in spec['depths'])} r={spec['mlp_ratio']:g} T={spec['T']}"


def spec_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    """The model overrides of a subnet (a SubnetSpec dict): its stage-1 width, depths, ratio and
    T, and its per-stage widths as ``stage_dims`` when the space chose them."""
    arch = {"embed_dim": spec["embed_dim"], "depths": list(spec["depths"]), "mlp_ratio": spec["mlp_ratio"],
            "T": spec["T"]}
    if spec.get("widths") is not None:
        arch["stage_dims"] = list(spec["widths"])
    return arch


def _shape_overrides(cfg: SearchConfig) -> dict[str, Any]:
    return {"img_size": cfg.shape.img_size, "in_chans": cfg.shape.in_chans, "num_classes": cfg.shape.num_classes}


def _train_supernet(cfg: SearchConfig, uri: str, parent: str, state: _State, log: Callable[[str], None]) -> dict[str, Any]:
    """Phase 1: the supernet's Ray Train run (resumed by name), then its weights from MLflow."""
    import torch

    from search.resources import scale_config
    from trainers.config import TrainConfig
    from trainers.ray_train import fit
    from trainers.tracking import following_epochs, mlflow_client, start_run

    name = f"{cfg.name}-supernet"
    if "supernet_run_id" not in state.data:
        o = cfg.oneshot
        tc = TrainConfig.from_dict({
            **cfg.train, **o.train, "model": cfg.base_model, "data": cfg.data, "model_overrides": _shape_overrides(cfg),
            "supernet": o.space, "holdout_shards": o.holdout_shards, "measure_energy": False, "log_model": True,
            "tracking_uri": uri, "experiment": cfg.experiment, "run_name": name, "parent_run_id": parent,
        })
        run_id = start_run(uri, cfg.experiment, name, parent_run_id=parent,
                           tags={"mixersnn.kind": "supernet", SEARCH_TAG: cfg.name})
        log(f"training the supernet ({name}, {o.train.get('time_budget_s') or 'no'} s budget): {o.space}, "
            f"holding out the last {o.holdout_shards} training shard(s)")
        t0 = time.time()
        with following_epochs(uri, run_id, "supernet (largest subnet)", log):
            res = fit(tc, scale_config(cfg.scale, storage_path=str(cfg.search_dir() / "train"), name=name))
        state.data.update(supernet_run_id=res.mlflow_run_id, supernet_s=time.time() - t0,
                          supernet_metrics={k: v for k, v in res.metrics.items() if isinstance(v, (int, float))})
        state.save()
        log(f"supernet trained in {state.data['supernet_s']:.0f} s: largest subnet test_acc "
            f"{res.metrics.get('test_acc', float('nan')):.4f}")
    rid = state.data["supernet_run_id"]
    # From MLflow, not Ray Train's storage: the driver of a cluster search may not see that.
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    bar = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # one file: no bar in the search's output
    try:
        with tempfile.TemporaryDirectory() as d:
            path = mlflow_client(uri).download_artifacts(rid, "model/model.pt", d)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    finally:
        if bar is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = bar
    return {"key": rid, "config": obj["config"], "space": obj["supernet"], "model": obj["model"]}


def _sampler(cfg: SearchConfig) -> Any:
    import optuna

    if cfg.objective.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.objective.population_size, seed=cfg.seed)
    startup = cfg.objective.startup_trials or max(4, min(16, cfg.oneshot.num_evals // 5))
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup, multivariate=True)


def _distributions(space: dict[str, Any]) -> dict[str, Any]:
    """Optuna's distributions of a SupernetSpace dict: ``embed_dim`` (a stage-1 width space) or
    ``width0``, ``width1``, ... (a per-stage ``widths`` space), ``mlp_ratio``, ``T`` and
    ``depth0``, ``depth1``, ..."""
    from optuna.distributions import CategoricalDistribution

    d: dict[str, Any] = {}
    if space.get("widths"):
        for s, choices in enumerate(space["widths"]):
            d[f"width{s}"] = CategoricalDistribution(list(choices))
    else:
        d["embed_dim"] = CategoricalDistribution(list(space["embed_dims"]))
    d.update({"mlp_ratio": CategoricalDistribution([float(r) for r in space["mlp_ratios"]]),
              "T": CategoricalDistribution(list(space["Ts"]))})
    for s, choices in enumerate(space["depths"]):
        d[f"depth{s}"] = CategoricalDistribution(list(choices))
    return d


def _spec_of(params: dict[str, Any], stages: int) -> dict[str, Any]:
    """The SubnetSpec dict of Optuna's parameters (see :func:`_distributions`)."""
    widths = [int(params[f"width{s}"]) for s in range(stages)] if "width0" in params else None
    spec = {"embed_dim": widths[0] if widths else int(params["embed_dim"]),
            "depths": [int(params[f"depth{s}"]) for s in range(stages)],
            "mlp_ratio": float(params["mlp_ratio"]), "T": int(params["T"])}
    if widths:
        spec["widths"] = widths
    return spec


def _score(cfg: SearchConfig, sup: dict[str, Any], state: _State, log: Callable[[str], None]) -> list[Score]:
    """Phase 2: ``num_evals`` subnets proposed by Optuna and scored by Ray tasks, ``parallel``
    at a time; the study (in the search's Optuna database) makes it resumable."""
    import optuna
    import ray

    o = cfg.oneshot
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"{cfg.name}-oneshot", storage=cfg.optuna_storage(),
                                directions=["maximize", "minimize"], sampler=_sampler(cfg), load_if_exists=True)
    # A proposal whose task never came back (a killed driver) is not a result.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    dists = _distributions(sup["space"])
    stages = len(sup["space"]["depths"])
    done = [_score_of(t, stages) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    seen = {json.dumps(s.spec, sort_keys=True): s for s in done}
    if done:
        log(f"scoring: {len(done)} of {o.num_evals} subnets scored before; going on")
    state_ref = ray.put(sup)
    task = ray.remote(num_cpus=o.cpus_per_eval)(score_subnets)
    kw = dict(data=cfg.data, holdout_shards=o.holdout_shards, calib_images=o.calib_images, eval_images=o.eval_images,
              threads=max(1, int(o.cpus_per_eval)))
    pending: dict[Any, Any] = {}
    t0 = time.time()
    while len(done) + len(pending) < o.num_evals or pending:
        while len(done) + len(pending) < o.num_evals and len(pending) < o.parallel:
            trial = study.ask(dists)
            spec = _spec_of(trial.params, stages)
            key = json.dumps(spec, sort_keys=True)
            if key in seen:  # proposed before: the same weights give the same score
                _tell(study, trial, seen[key])
                done.append(Score(**{**seen[key].__dict__, "number": trial.number}))
                continue
            pending[task.remote(state_ref, [spec], **kw)] = trial
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        trial = pending.pop(ready[0])
        s = ray.get(ready[0])[0]
        s.number = trial.number
        _tell(study, trial, s)
        seen[json.dumps(s.spec, sort_keys=True)] = s
        done.append(s)
        if len(done) % 10 == 0 or len(done) == o.num_evals:
            log(f"[{time.time() - t0:7.0f}s] scored {len(done)}/{o.num_evals} subnets; best held-out accuracy "
                f"{max(d.acc for d in done):.4f}; last {_arch(s.spec)}: {s.acc:.4f} at {s.energy_uj:.3f} uJ "
                f"({s.seconds:.1f} s)")
    state.data["scoring_s"] = state.data.get("scoring_s", 0.0) + time.time() - t0
    state.save()
    return done


def _tell(study: Any, trial: Any, s: Score) -> None:
    """Record a score in the study: the objectives, and what the report reads back as user attributes."""
    for k in ("num_params", "firing_rate", "seconds"):
        trial.set_user_attr(k, getattr(s, k))
    study.tell(trial, [s.acc, s.energy_uj])


def _score_of(t: Any, stages: int) -> Score:
    a = t.user_attrs
    return Score(spec=_spec_of(t.params, stages), acc=float(t.values[0]), energy_uj=float(t.values[1]),
                 num_params=int(a.get("num_params", 0)), firing_rate=float(a.get("firing_rate", float("nan"))),
                 seconds=float(a.get("seconds", float("nan"))), number=t.number)


def _retrain(cfg: SearchConfig, uri: str, parent: str, state: _State, i: int, s: Score,
             log: Callable[[str], None]) -> None:
    """Phase 3, one finalist: a stand-alone Ray Train run recorded as a trial of the search."""
    arch = spec_overrides(s.spec)
    _train_run(cfg, uri, parent, state, f"finalist-{i}", model=cfg.base_model, arch=arch,
               train=_held_out(cfg, cfg.oneshot.finalist_train), log=log,
               extra_tags={"mixersnn.oneshot_finalist": "true"},
               extra_metrics={"search.predicted_acc": s.acc, "search.predicted_energy_uj": s.energy_uj},
               what=f"finalist {_arch(s.spec)} (predicted {s.acc:.4f})")


def _held_out(cfg: SearchConfig, train: dict[str, Any]) -> dict[str, Any]:
    """``train`` holding out the shards the supernet never saw: finalists and baselines train
    without them, and the registered finalist is chosen on them, not on the test split."""
    return {**train, "holdout_shards": cfg.oneshot.holdout_shards}


def _train_baselines(cfg: SearchConfig, uri: str, parent: str, state: _State, log: Callable[[str], None]) -> None:
    """The search file's trained baselines, on the finalists' schedule (estimate-only ones
    were recorded at the start)."""
    from search.space import baseline_spec
    from search.tracking import BASELINE_TAG

    for b in cfg.baselines:
        if b.estimate_only:
            continue
        spec = baseline_spec(cfg, b)
        _train_run(cfg, uri, parent, state, spec.run_name, model=b.model, arch=dict(spec.arch),
                   train=_held_out(cfg, {**cfg.oneshot.finalist_train, **spec.train}), log=log, kind="baseline",
                   extra_tags={BASELINE_TAG: b.label}, what=f"baseline {b.label}")


def _train_run(cfg: SearchConfig, uri: str, parent: str, state: _State, trial_id: str, *, model: str,
               arch: dict[str, Any], train: dict[str, Any], log: Callable[[str], None], kind: str = "trial",
               extra_tags: Optional[dict[str, Any]] = None, extra_metrics: Optional[dict[str, float]] = None,
               what: str = "") -> None:
    """One stand-alone Ray Train run, recorded as a trial (or baseline) of the search: the
    tags, ``search.*`` parameters, run spec and status a trial-mode trial has."""
    from mixersnn.models import model_config
    from search.resources import scale_config
    from search.tracking import STATUS_TAG, settle_run
    from trainers.config import TrainConfig
    from trainers.ray_train import fit
    from trainers.spec import RunSpec, log_run_spec
    from trainers.tracking import MLflowTracker, following_epochs, start_run

    done = state.data.setdefault("finalists_done", [])
    if trial_id in done:
        return
    name = trial_id if kind == "baseline" else f"{cfg.name}-{trial_id}"
    mc = model_config(model, **{**_shape_overrides(cfg), **arch})
    tc = TrainConfig.from_dict({
        **cfg.train, **train, "model": model, "data": cfg.data,
        "model_overrides": {**_shape_overrides(cfg), **arch}, "tracking_uri": uri, "experiment": cfg.experiment,
        "run_name": name, "parent_run_id": parent,
    })
    run_id = start_run(uri, cfg.experiment, name, parent_run_id=parent,
                       tags={SEARCH_TAG: cfg.name, "mixersnn.trial_id": trial_id, "mixersnn.kind": kind,
                             STATUS_TAG: "running", **(extra_tags or {})})
    tr = MLflowTracker(uri, run_id)
    tr.log_params({"search.trial_id": trial_id, "search.model": model,
                   **{f"search.arch.{k}": (json.dumps(v) if isinstance(v, list) else v) for k, v in arch.items()},
                   "search.arch.patch_size": mc.patch_size, "search.arch.spe": mc.spe})
    tr.log_metrics({"num_params": float(mc.closed_form_num_params()), **(extra_metrics or {})}, step=0)
    log_run_spec(tr, RunSpec.of(tc, kind=kind, num_workers=int(cfg.scale.get("num_workers", 1))))
    log(f"training {what or trial_id} stand-alone")
    try:
        with following_epochs(uri, run_id, what or trial_id, log):
            m = fit(tc, scale_config(cfg.scale, storage_path=str(cfg.search_dir() / "train"), name=name)).metrics
    except Exception as err:
        settle_run(uri, run_id, "failed", f"{type(err).__name__}: {str(err)[:300]}")
        raise
    settle_run(uri, run_id, "ok", epochs=int(m.get("epoch", -1)) + 1)
    done.append(trial_id)
    state.save()


def _summarise(cfg: SearchConfig, uri: str, parent: str, scores: list[Score], finalists: list[Score], state: _State,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Phase 4: every score (CSV), the scored front with the finalists (PNG), and predicted
    against real accuracy (JSON, table, Kendall tau) on the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixersnn.accounting.zero_cost import rank_correlation
    from search.tracking import collect_trials
    from trainers.tracking import MLflowTracker

    tr = MLflowTracker(uri, parent)
    buf = io.StringIO()
    _write_scores_csv(buf, scores)
    tr.client.log_text(parent, buf.getvalue(), "search/oneshot_scores.csv")

    real = {r.trial_id: r for r in collect_trials(uri, parent)}
    pairs = []
    for i, s in enumerate(finalists):
        r = real.get(f"finalist-{i}")
        if r is not None and r.test_acc is not None:
            pairs.append({"trial_id": r.trial_id, "architecture": _arch(s.spec), "predicted_acc": s.acc,
                          "real_test_acc": r.test_acc, "predicted_energy_uj": s.energy_uj,
                          "real_energy_uj": r.energy_uj, "run_id": r.run_id})
    corr = rank_correlation([p["predicted_acc"] for p in pairs], [p["real_test_acc"] for p in pairs])
    tr.log_dict({"finalists": pairs, "rank_correlation": corr}, "search/oneshot_finalists.json")

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([s.energy_uj for s in scores], [s.acc for s in scores], s=12, c="0.6", label="scored subnets (held-out)")
    front = score_fronts(scores)[0] if scores else []
    fr = sorted((scores[i] for i in front), key=lambda s: s.energy_uj)
    ax.plot([s.energy_uj for s in fr], [s.acc for s in fr], "-o", c="tab:blue", ms=4, label="scored front")
    if pairs:
        ax.scatter([p["real_energy_uj"] for p in pairs], [p["real_test_acc"] for p in pairs], marker="*", s=120,
                   c="tab:red", label="finalists retrained (test)", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("energy per image (uJ)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{cfg.name}: one-shot scores and retrained finalists")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tr.log_figure(fig, "search/oneshot_front.png")
    plt.close(fig)

    secs = [s.seconds for s in scores if math.isfinite(s.seconds)]
    summary = {"oneshot_evals": float(len(scores)),
               "oneshot_eval_s_mean": sum(secs) / len(secs) if secs else float("nan"),
               "oneshot_supernet_s": float(state.data.get("supernet_s", float("nan"))),
               "oneshot_scoring_s": float(state.data.get("scoring_s", float("nan"))),
               "oneshot_kendall_tau": float(corr["kendall_tau"]), "oneshot_finalists": float(len(pairs))}
    tr.log_metrics(summary, step=0)
    log("")
    log(f"one-shot: supernet {summary['oneshot_supernet_s']:.0f} s, {len(scores)} subnets scored in "
        f"{summary['oneshot_scoring_s']:.0f} s ({summary['oneshot_eval_s_mean']:.1f} s each)")
    for line in format_finalists(pairs, corr):
        log(line)
    return summary


def _write_scores_csv(buf: io.StringIO, scores: Sequence[Score]) -> None:
    """Every score as a row of ``oneshot_scores.csv``; a per-stage widths space adds a
    ``widths`` column (stage widths joined by ``-``) after ``embed_dim``."""
    per_stage = any(s.spec.get("widths") is not None for s in scores)
    w = csv.writer(buf)
    w.writerow(["number", "embed_dim", *(["widths"] if per_stage else []), "depths", "mlp_ratio", "T", "heldout_acc",
                "energy_uj", "num_params", "firing_rate", "seconds"])
    for s in sorted(scores, key=lambda s: s.number):
        widths = ["-".join(map(str, s.spec.get("widths") or ()))] if per_stage else []
        w.writerow([s.number, s.spec["embed_dim"], *widths, "-".join(map(str, s.spec["depths"])), s.spec["mlp_ratio"],
                    s.spec["T"], f"{s.acc:.5f}", f"{s.energy_uj:.5f}", s.num_params, f"{s.firing_rate:.4f}",
                    f"{s.seconds:.2f}"])


def spec_of_row(row: dict[str, str]) -> dict[str, Any]:
    """The SubnetSpec dict of a row of ``oneshot_scores.csv`` (read with ``csv.DictReader``)."""
    spec: dict[str, Any] = {"embed_dim": int(row["embed_dim"]), "depths": [int(x) for x in row["depths"].split("-")],
                            "mlp_ratio": float(row["mlp_ratio"]), "T": int(row["T"])}
    if row.get("widths"):
        spec["widths"] = [int(x) for x in row["widths"].split("-")]
    return spec


def format_finalists(pairs: Sequence[dict[str, Any]], corr: dict[str, Any]) -> list[str]:
    """The finalists' predicted (supernet, held-out) against real (stand-alone, test) accuracy."""
    lines = [f"{'finalist':<12} {'architecture':<28} {'predicted':>9} {'real':>7}"]
    for p in pairs:
        lines.append(f"{p['trial_id']:<12} {p['architecture']:<28} {p['predicted_acc']:>9.4f} {p['real_test_acc']:>7.4f}")
    lines.append(f"predicted vs real accuracy over {corr['n']} finalists: Kendall tau {corr['kendall_tau']:.2f}"
                 + (" (too few finalists for a meaningful correlation; benchmarks/oneshot.py measures it over 12+)"
                    if corr["n"] < 5 else ""))
    return lines


def load_finalists(uri: str, parent_run_id: str) -> Optional[dict[str, Any]]:
    """A one-shot search's ``search/oneshot_finalists.json`` (``finalists``, ``rank_correlation``),
    or None for a trial-mode search (or one that has not reached its summary)."""
    from trainers.tracking import mlflow_client

    client = mlflow_client(uri)
    if "search/oneshot_finalists.json" not in [f.path for f in client.list_artifacts(parent_run_id, "search")]:
        return None
    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client.download_artifacts(parent_run_id, "search/oneshot_finalists.json", d)).read_text())
