"""``mixersnn search`` and ``mixersnn report``: architecture search over the Mixer-SNN family
(Ray Tune + Optuna + MLflow), and its leaderboard and Pareto front read back from MLflow."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

HELP = "Search Mixer-SNN architectures and hyperparameters: accuracy vs energy per image (Ray Tune, Optuna, MLflow)."

# The search the README runs; used when --config is not given and the file is present.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "search_fashion_mnist.yaml"
#: MLflow's own variable for the default experiment: used when neither a flag nor the YAML names one.
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"search YAML (default: configs/{DEFAULT_CONFIG.name} when present, else "
                   "built-in defaults); docs/configuration.md lists its keys")
    p.add_argument("--resume", action="store_true",
                   help="continue the search of this name (after the driver was killed): finished trials are kept")
    b = p.add_argument_group("budget (flags override the YAML's budget: section)")
    b.add_argument("--num-trials", type=int, help="trials to sample in total (budget.num_trials; default 12)")
    b.add_argument("--time-budget-s", type=float,
                   help="wall-clock budget of the whole search in seconds (budget.time_budget_s; default: none). "
                   "Each trial's own limit is train.time_budget_s in the YAML, the same key as `train --time-budget-s`")
    b.add_argument("--max-concurrent-trials", type=int,
                   help="trials at once (budget.max_concurrent_trials; default auto: what the cluster's CPUs/GPUs hold)")
    w = p.add_argument_group("where (flags override the YAML's top-level keys)")
    w.add_argument("--name", help="search name: Tune folder and parent MLflow run; the same name resumes (name)")
    w.add_argument("--data", help="'fashion-mnist' (default, built on first use) or a shard root holding train/ and "
                   "test/ splits, local or s3:// (data)")
    w.add_argument("--storage-path", help="where Tune and Train keep state (storage_path; default runs/search)")
    w.add_argument("--tracking-uri", help="MLflow URI (tracking_uri; default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///./mlflow.db)")
    w.add_argument("--experiment", help=f"MLflow experiment (experiment; default ${EXPERIMENT_ENV}, else "
                   "mixersnn-search)")
    w.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else start a local Ray runtime)")
    o = p.add_argument_group("output")
    o.add_argument("--no-register", action="store_true", help="do not register the selected model")
    o.add_argument("--system-metrics", action="store_true",
                   help="log each trial's machine use (CPU, memory, disk, network; NVIDIA GPUs with nvidia-ml-py) to "
                   "its MLflow run as system/* metrics, and the driver's to the parent run")
    o.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    o.add_argument("--verbose", action="store_true", help="show the training workers' logs")
    o.add_argument("--json", action="store_true",
                   help="end with the result as one JSON object on the last line (the front, the best trial, the "
                   "run ids); implies --quiet")


def experiment_from_env(flag: Optional[str], yaml_path: Optional[str], *, section: Optional[str] = None) -> Optional[str]:
    """The experiment to use: the flag, else ``$MLFLOW_EXPERIMENT_NAME`` when the YAML (its
    ``section``, if given) does not name one, else None (the YAML's, or the dataclass default)."""
    env = os.environ.get(EXPERIMENT_ENV)
    if flag or not env:
        return flag
    if yaml_path is not None and Path(yaml_path).is_file():
        import yaml

        raw = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if section is not None and isinstance(raw, dict) and isinstance(raw.get(section), dict):
            raw = raw[section]
        if isinstance(raw, dict) and raw.get("experiment"):
            return None
    return env


def _config(args: argparse.Namespace):  # -> SearchConfig
    from search.config import load_search_config

    path: Optional[str] = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    cfg = load_search_config(path, name=args.name, data=args.data, storage_path=args.storage_path,
                             tracking_uri=args.tracking_uri, experiment=experiment_from_env(args.experiment, path))
    return cfg.replace_budget(num_trials=args.num_trials, time_budget_s=args.time_budget_s,
                              max_concurrent_trials=args.max_concurrent_trials)


def run(args: argparse.Namespace) -> int:
    import sys

    from mixersnn.errors import UserError
    from mixersnn.models.config import ConfigError
    from search.driver import SearchExistsError, run_search
    from trainers.tracking import check_tracking_server, mlflow_ui_hint, resolve_tracking_uri

    try:
        # Every value, the command line's overrides included, the data and the tracking
        # server are checked before Ray starts.
        cfg = _config(args)
        check_tracking_server(resolve_tracking_uri(cfg.tracking_uri))
    except (ConfigError, FileNotFoundError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kw = {"address": args.address} if args.address else {}
    local = not (args.address or os.environ.get("RAY_ADDRESS"))  # a Ray runtime of its own, on this machine
    if args.verbose:
        kw["log_to_driver"] = True
    try:
        if cfg.mode == "oneshot":
            from search.oneshot import run_oneshot

            res = run_oneshot(cfg, resume=args.resume, ray_init_kwargs=kw, register=not args.no_register,
                              system_metrics=args.system_metrics,
                              log=(lambda s: None) if args.json else print)  # fmt: skip
        else:
            res = run_search(cfg, resume=args.resume, ray_init_kwargs=kw, quiet=args.quiet or args.json,
                             register=not args.no_register, system_metrics=args.system_metrics)
    except SearchExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_result_json(res, cfg, local=local), default=str))
        return 0
    trials = [r for r in res.rows if not r.is_baseline]
    scored = [r for r in trials if r.scored]
    nb = len(res.rows) - len(trials)
    print(f"\nsearch {cfg.name!r} finished in {res.wall_s:.0f} s: {len(trials)} trials, {len(scored)} scored, "
          f"{sum(r.status == 'failed' for r in trials)} failed, {sum(r.status == 'infeasible' for r in trials)} infeasible"
          + (f"; {nb} baseline(s)" if nb else ""))
    uri = resolve_tracking_uri(cfg.tracking_uri)
    print(f"report again: mixersnn report {cfg.experiment} --search {cfg.name}"
          + (f" --tracking-uri {cfg.tracking_uri}" if cfg.tracking_uri else ""))
    retrain = retrain_command(cfg, res, local=local)
    if retrain:
        print(f"train the selected model again, for as long as the search ran: {retrain}")
    from trainers.tracking import mlflow_client

    experiment_id = mlflow_client(uri).get_run(res.parent_run_id).info.experiment_id
    print(f"open the MLflow UI: {mlflow_ui_hint(uri, experiment_id)}")
    study_db = cfg.optuna_storage()
    if not study_db.startswith("sqlite:///") or Path(study_db[len("sqlite:///"):]).exists():
        print(f"the Optuna study: optuna-dashboard {study_db}")
    return 0


def retrain_command(cfg: Any, res: Any, *, local: bool = False) -> Optional[str]:
    """The one command that trains the search's selected model again (:func:`retrain_line`);
    None when nothing was selected. ``local``: the search ran on a Ray runtime of its own on
    this machine; where its trials trained in process (one CPU worker) the retrain then does
    too (``--no-ray``: no Ray Train controllers beside the one worker)."""
    from search.trial import in_process

    if res.best is None:
        return None
    src = (f"--from-model models:/{cfg.registered_model_name()}/{res.registered_version}"
           if res.registered_version else f"--from-run {res.best.run_id}")
    return retrain_line(src, cfg.budget.time_budget_s, cfg.tracking_uri, no_ray=local and in_process(cfg.scale))


def retrain_line(source: str, time_budget_s: Optional[float], tracking_uri: Optional[str], *,
                 no_ray: bool = False) -> str:
    """``mixersnn train`` of ``source`` (``--from-model URI`` or ``--from-run ID``) from fresh
    weights, for ``time_budget_s`` (the search's own budget; the cosine follows the clock, so
    it anneals fully) and without a search trial's per-epoch and evaluation caps."""
    length = f"--epochs 40 --time-budget-s {time_budget_s:g}" if time_budget_s else "--epochs 30 --time-budget-s none"
    return (f"mixersnn train {source} {length} --samples-per-epoch none --max-eval-batches none"
            + (f" --tracking-uri {tracking_uri}" if tracking_uri else "") + (" --no-ray" if no_ray else ""))


def _row_json(row: Any, front_ids: set[str]) -> dict[str, Any]:
    """One trial or baseline (a ``search.tracking.TrialRow``) as plain JSON."""
    from dataclasses import asdict

    return {"name": row.name, **asdict(row), "architecture": row.arch(), "pareto": row.run_id in front_ids}


def _result_json(res: Any, cfg: Any, *, local: bool = False) -> dict[str, Any]:
    """``search --json``: the finished search, with the keys ``report --json`` gives it too
    (``baselines``, ``prescreen``, ``oneshot``: null where the search had none)."""
    from search.oneshot import load_finalists
    from search.tracking import compare_baselines, prescreen_summary

    front_ids = {r.run_id for r in res.front}
    return {"search": cfg.name, "experiment": cfg.experiment, "parent_run_id": res.parent_run_id,
            "tracking_uri": res.tracking_uri, "wall_s": res.wall_s,
            "best": _row_json(res.best, front_ids) if res.best is not None else None,
            "registered_version": res.registered_version, "retrain_command": retrain_command(cfg, res, local=local),
            "front": [_row_json(r, front_ids) for r in res.front],
            "trials": [_row_json(r, front_ids) for r in res.rows],
            "baselines": compare_baselines(res.rows, res.front),
            "prescreen": prescreen_summary(res.rows),
            "oneshot": load_finalists(res.tracking_uri, res.parent_run_id) if cfg.mode == "oneshot" else None}
