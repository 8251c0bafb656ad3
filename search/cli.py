"""``mixersnn search``: architecture search over the Mixer-SNN family (Ray Tune + Optuna + MLflow)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

HELP = "Search Mixer-SNN architectures and hyperparameters: accuracy vs energy per image (Ray Tune, Optuna, MLflow)."

# The search the README runs; used when --config is not given and the file is present.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "search_fashion_mnist.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"search YAML (default: {DEFAULT_CONFIG.name} when present, else built-in defaults)")
    p.add_argument("--resume", action="store_true",
                   help="continue the search of this name (after the driver was killed): finished trials are kept")
    p.add_argument("--num-trials", type=int, help="trial budget (overrides budget.num_trials)")
    p.add_argument("--time-budget-s", type=float, help="wall-clock budget of the search in seconds (overrides budget.time_budget_s)")
    p.add_argument("--max-concurrent-trials", type=int, help="trials at once (default: what the cluster's CPUs/GPUs hold)")
    p.add_argument("--name", help="search name (Tune folder and parent MLflow run; the same name resumes)")
    p.add_argument("--data", help="'fashion-mnist' or a folder with train/ and test/ shards")
    p.add_argument("--storage-path", help="where Tune and Train keep state (default runs/search)")
    p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray runtime)")
    p.add_argument("--no-register", action="store_true", help="do not register the selected model")
    p.add_argument("--system-metrics", action="store_true",
                   help="log each trial's machine use (CPU, memory, disk, network; NVIDIA GPUs with nvidia-ml-py) to "
                   "its MLflow run as system/* metrics, and the driver's to the parent run")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    p.add_argument("--verbose", action="store_true", help="show the training workers' logs")


def _config(args: argparse.Namespace):  # -> SearchConfig
    from search.config import load_search_config

    path: Optional[str] = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    cfg = load_search_config(path, name=args.name, data=args.data, storage_path=args.storage_path,
                             tracking_uri=args.tracking_uri, experiment=args.experiment)
    return cfg.replace_budget(num_trials=args.num_trials, time_budget_s=args.time_budget_s,
                              max_concurrent_trials=args.max_concurrent_trials)


def run(args: argparse.Namespace) -> int:
    import sys

    from mixersnn.errors import UserError
    from mixersnn.models.config import ConfigError
    from search.driver import SearchExistsError, run_search
    from trainers.tracking import mlflow_ui_hint, resolve_tracking_uri

    from trainers.tracking import check_tracking_server

    try:
        # Every value, the command line's overrides included, the data and the tracking
        # server are checked before Ray starts.
        cfg = _config(args)
        check_tracking_server(resolve_tracking_uri(cfg.tracking_uri))
    except (ConfigError, FileNotFoundError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kw = {"address": args.address} if args.address else {}
    if args.verbose:
        kw["log_to_driver"] = True
    try:
        res = run_search(cfg, resume=args.resume, ray_init_kwargs=kw, quiet=args.quiet, register=not args.no_register,
                         system_metrics=args.system_metrics)
    except SearchExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trials = [r for r in res.rows if not r.is_baseline]
    scored = [r for r in trials if r.scored]
    nb = len(res.rows) - len(trials)
    print(f"\nsearch {cfg.name!r} finished in {res.wall_s:.0f} s: {len(trials)} trials, {len(scored)} scored, "
          f"{sum(r.status == 'failed' for r in trials)} failed, {sum(r.status == 'infeasible' for r in trials)} infeasible"
          + (f"; {nb} baseline(s)" if nb else ""))
    uri = resolve_tracking_uri(cfg.tracking_uri)
    print(f"report again: mixersnn report {cfg.experiment} --search {cfg.name}"
          + (f" --tracking-uri {cfg.tracking_uri}" if cfg.tracking_uri else ""))
    from trainers.tracking import mlflow_client

    experiment_id = mlflow_client(uri).get_run(res.parent_run_id).info.experiment_id
    print(f"open the MLflow UI: {mlflow_ui_hint(uri, experiment_id)}")
    study_db = cfg.optuna_storage()
    if not study_db.startswith("sqlite:///") or Path(study_db[len("sqlite:///"):]).exists():
        print(f"the Optuna study: optuna-dashboard {study_db}")
    return 0
