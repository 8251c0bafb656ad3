"""``mixersnn report EXPERIMENT``: leaderboard and Pareto front of a search, from MLflow alone."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Print a search's leaderboard and Pareto front from MLflow and write the Pareto plot."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="MLflow experiment of the search")
    p.add_argument("--search", help="search name (default: the latest search in the experiment)")
    p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--top", type=int, default=20, help="leaderboard rows (default 20)")
    p.add_argument("--out", help="Pareto plot file (default <search>-pareto.png)")
    p.add_argument("--params", action="store_true", help="parameters as a third objective of the front")


def run(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from search.tracking import (collect_trials, compare_baselines, find_search_run, format_comparison, format_table,
                                 pareto_figure, pareto_front)
    from trainers.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    parent = find_search_run(uri, args.experiment, args.search)
    if parent is None:
        what = f"search {args.search!r}" if args.search else "any search"
        print(f"error: no {what} in experiment {args.experiment!r} at {uri}; check the name and --tracking-uri")
        return 2
    name = parent.info.run_name
    rows = collect_trials(uri, parent.info.run_id)
    front = pareto_front(rows, with_params=args.params)
    board = sorted(rows, key=lambda r: -(r.test_acc if r.test_acc is not None else -1))[: args.top]
    trials = [r for r in rows if not r.is_baseline]
    counts = {s: sum(r.status == s for r in trials) for s in ("ok", "stopped", "failed", "infeasible", "running")}
    nb = len(rows) - len(trials)
    print(f"search {name!r} ({parent.info.status}) in {args.experiment!r}: {len(trials)} trials "
          + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + (f"; {nb} baseline(s)" if nb else ""))
    print()
    print(format_table(board, title=f"leaderboard (top {args.top} by test accuracy; * = Pareto front, B = baseline)",
                       mark={r.run_id for r in front}))
    print()
    print(format_table(front, title="Pareto front: accuracy (max) vs energy per image (min)"
                       + (" vs parameters (min)" if args.params else "")))
    comparison = format_comparison(compare_baselines(rows, front, with_params=args.params))
    if comparison:
        print()
        print(comparison)
    reg = parent.data.tags.get("mixersnn.registered_model")
    if reg:
        print(f"\nregistered model: {reg} (trial {parent.data.tags.get('mixersnn.best_trial')})")
    out = Path(args.out or f"{name}-pareto.png")
    fig = pareto_figure(rows, front, title=f"{name}: accuracy vs energy per image")
    fig.savefig(out)
    plt.close(fig)
    print(f"\nPareto plot written to {out}")
    return 0
