"""``mixersnn report EXPERIMENT``: leaderboard and Pareto front of a search, from MLflow alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

HELP = "Print a search's leaderboard and Pareto front from MLflow and write the Pareto plot."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="MLflow experiment of the search")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--search", help="search name (default: the latest search in the experiment); with several "
                       "searches of that name (other storage paths), the latest")
    which.add_argument("--run-id", help="the search's MLflow parent run (its <storage_path>/<name>/"
                       "mlflow_parent_run.json names it): one search of several that share a name")
    p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--top", type=int, default=20, help="leaderboard rows (default 20)")
    p.add_argument("--out", help="Pareto plot file (default <search>-pareto.png)")
    p.add_argument("--params", action="store_true", help="parameters as a third objective of the front")
    p.add_argument("--json", action="store_true",
                   help="print the search's trials, Pareto front, baseline comparison and zero-cost pre-screen "
                   "correlation as one JSON object instead of the tables (the plot is written only with --out)")


def run(args: argparse.Namespace) -> int:
    """The tables and plot, or with ``--json`` the same facts as one JSON object."""
    import matplotlib.pyplot as plt

    from search.tracking import (best_first, collect_trials, compare_baselines, format_comparison, format_prescreen,
                                 format_table, held_out, pareto_figure, pareto_front, prescreen_summary)

    uri, parent = find_parent(args, notes=not getattr(args, "json", False))
    if getattr(args, "json", False):
        return _print_json(args, uri, parent)
    name = parent.info.run_name
    rows = collect_trials(uri, parent.info.run_id)
    front = pareto_front(rows, with_params=args.params)
    board = sorted(rows, key=best_first)[: args.top]
    trials = [r for r in rows if not r.is_baseline]
    counts = {s: sum(r.status == s for r in trials)
              for s in ("ok", "stopped", "failed", "infeasible", "screened", "running")}
    nb = len(rows) - len(trials)
    print(f"search {name!r} ({parent.info.status}) in {args.experiment!r}: {len(trials)} trials "
          + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + (f"; {nb} baseline(s)" if nb else ""))
    print()
    print(format_table(board, title=f"leaderboard (top {args.top} by "
                       + ("held-out accuracy" if held_out(rows) else "test accuracy")
                       + "; * = Pareto front, B = baseline)",
                       mark={r.run_id for r in front}))
    print()
    print(format_table(front, title="Pareto front: accuracy (max) vs energy per image (min)"
                       + (" vs parameters (min)" if args.params else "")))
    comparison = format_comparison(compare_baselines(rows, front, with_params=args.params))
    if comparison:
        print()
        print(comparison)
    prescreen = format_prescreen(prescreen_summary(rows))
    if prescreen:
        print()
        print(prescreen)
    from search.oneshot import format_finalists, load_finalists

    oneshot = load_finalists(uri, parent.info.run_id)
    if oneshot is not None:
        print()
        print("\n".join(format_finalists(oneshot["finalists"], oneshot["rank_correlation"])))
    reg = parent.data.tags.get("mixersnn.registered_model")
    if reg:
        print(f"\nregistered model: {reg} (trial {parent.data.tags.get('mixersnn.best_trial')})")
        print(f"train it again, for as long as the search ran: {_retrain(args, parent)}")
    out = Path(args.out or f"{name}-pareto.png")
    fig = pareto_figure(rows, front, title=f"{name}: accuracy vs energy per image")
    fig.savefig(out)
    plt.close(fig)
    print(f"\nPareto plot written to {out}")
    from trainers.tracking import mlflow_ui_hint

    print(f"in the MLflow UI: {mlflow_ui_hint(uri, parent.info.experiment_id)}")
    return 0


def find_parent(args: argparse.Namespace, *, notes: bool = True):  # type: ignore[no-untyped-def]
    """(tracking URI, the search's parent run) that ``args`` name: ``--run-id``, else the
    latest search (of ``--search``'s name) in the experiment; with ``notes``, a line when
    several searches share the name.

    Raises:
        UserError: no store at a sqlite path, no such search, or a run that is not one.
    """
    from mixersnn.errors import UserError
    from search.tracking import find_search_runs
    from trainers.tracking import check_tracking_server, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # MLflow would create an empty store there and report that it holds no search.
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}; give the store the search logged to with "
                        f"--tracking-uri (or run mixersnn report from the folder that holds its mlflow.db)")
    check_tracking_server(uri)
    if args.run_id:
        parent, error = _search_run_by_id(uri, args.experiment, args.run_id)
        if parent is None:
            raise UserError(error)
        return uri, parent
    parents = find_search_runs(uri, args.experiment, args.search)
    if not parents:
        what = f"search {args.search!r}" if args.search else "any search"
        raise UserError(f"no {what} in experiment {args.experiment!r} at {uri}; check the name and --tracking-uri")
    parent = parents[0]
    if notes and args.search and len(parents) > 1:
        others = ", ".join(f"{r.info.run_id} ({_started(r)})" for r in parents[1:])
        print(f"note: {len(parents)} searches named {args.search!r} in {args.experiment!r} (each at its own "
              f"storage path); this is the latest, run {parent.info.run_id} ({_started(parent)}). The "
              f"other(s): {others}; pick one with --run-id.")
        print()
    return uri, parent


def _print_json(args: argparse.Namespace, uri: str, parent) -> int:  # type: ignore[no-untyped-def]
    """``--json``: trials, front, baselines, the zero-cost pre-screen's rank correlation
    (``prescreen``: :func:`search.tracking.prescreen_summary`, null without a pre-screen) and
    the plot, only with ``--out``, as one object."""
    import json

    from search.cli import _row_json
    from search.oneshot import load_finalists
    from search.tracking import collect_trials, compare_baselines, pareto_figure, pareto_front, prescreen_summary

    rows = collect_trials(uri, parent.info.run_id)
    front = pareto_front(rows, with_params=args.params)
    ids = {r.run_id for r in front}
    if args.out:
        import matplotlib.pyplot as plt

        fig = pareto_figure(rows, front, title=f"{parent.info.run_name}: accuracy vs energy per image")
        fig.savefig(args.out)
        plt.close(fig)
    print(json.dumps({
        "search": parent.info.run_name, "experiment": args.experiment, "parent_run_id": parent.info.run_id,
        "status": parent.info.status, "tracking_uri": uri,
        "registered_model": parent.data.tags.get("mixersnn.registered_model"),
        "retrain_command": _retrain(args, parent),
        "front": [_row_json(r, ids) for r in front],
        "trials": [_row_json(r, ids) for r in rows],
        "baselines": compare_baselines(rows, front, with_params=args.params),
        "prescreen": prescreen_summary(rows),
        "oneshot": load_finalists(uri, parent.info.run_id),
        **({"plot": args.out} if args.out else {}),
    }, default=str))
    return 0


def _retrain(args: argparse.Namespace, parent) -> Optional[str]:  # type: ignore[no-untyped-def]
    """The command that trains the search's registered model again for as long as the search
    ran (the one the search printed, less ``--no-ray``: where it will run is not known here);
    None when the search registered none."""
    import json

    from search.cli import retrain_line

    reg = parent.data.tags.get("mixersnn.registered_model")
    if not reg:
        return None
    try:
        budget = json.loads(parent.data.params.get("budget", "{}")).get("time_budget_s")
    except (ValueError, AttributeError):
        budget = None  # a search logged before its config was recorded as parameters
    uri = reg if reg.startswith("models:/") else f"models:/{reg}"
    return retrain_line(f"--from-model {uri}", budget, args.tracking_uri)


def _started(run) -> str:  # type: ignore[no-untyped-def]
    """A run's start time, UTC, to the second."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _search_run_by_id(uri: str, experiment: str, run_id: str):  # type: ignore[no-untyped-def]
    """(the search's parent run, None), or (None, why not) for a run that the store does not
    hold, that is not a search's parent run, or that belongs to another experiment."""
    from mlflow.exceptions import MlflowException

    from trainers.tracking import mlflow_client

    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None, f"no run {run_id!r} at {uri}; check --run-id and --tracking-uri"
    kind = run.data.tags.get("mixersnn.kind")
    if kind != "search":
        return None, (f"run {run_id!r} ({run.info.run_name!r}) is a {kind or 'non-mixersnn'} run, not a search's "
                      f"parent run; give the parent's id (its child runs' mlflow.parentRunId tag)")
    exp = client.get_experiment(run.info.experiment_id)
    if exp.name != experiment:
        return None, (f"run {run_id!r} is search {run.info.run_name!r} in experiment {exp.name!r}, not "
                      f"{experiment!r}; give {exp.name!r} as the experiment")
    return run, None
