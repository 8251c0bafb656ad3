"""One-shot search evidence: does the supernet rank subnets as stand-alone training does, and
does its front beat a trial-by-trial search of the same budget?

Measured, not asserted. In one run:

1. **The one-shot search** of ``--config`` (default ``configs/search_oneshot_fashion_mnist.yaml``),
   its budget rescaled to ``--budget-min`` minutes when given (55% supernet training, 30% the
   finalists' retraining, the scoring what it takes), with its wall time.
2. **Rank agreement.** ``--tau-subnets`` subnets (12 by default) of the scored ones, spread
   evenly over the predicted accuracies, each trained stand-alone here (no Ray, the finalists'
   recipe, ``--tau-train-s`` seconds each) and tested on the test split; Kendall tau and
   Spearman rho between the supernet's held-out accuracy and the stand-alone test accuracy.
   These trainings are evidence, outside the search's budget.
3. **The two fronts side by side.** The one-shot search's finalists (stand-alone, test split)
   against the front of a trial-by-trial search: one already in MLflow (``--compare-search
   NAME --compare-tracking-uri URI``) or one run here from ``--compare-config``. For each
   front, how many of the other's points it dominates, and the 2-D hypervolume of (accuracy,
   energy) both measured against the same reference point.

    .venv/bin/python benchmarks/oneshot.py --budget-min 60 --compare-config configs/search_fashion_mnist_60min.yaml
    .venv/bin/python benchmarks/oneshot.py --compare-search fmnist-demo --compare-tracking-uri sqlite:///mlflow.db
    .venv/bin/python benchmarks/oneshot.py --smoke      # a minute of each part, for CI
    # parts 2 and 3 for a one-shot search already run (by `mixersnn search --config ...`)
    .venv/bin/python benchmarks/oneshot.py --oneshot-tracking-uri sqlite:////path/mlflow.db \
        --compare-search fmnist-demo --compare-tracking-uri sqlite:////other/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

REPO = _HERE.parent


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``(accuracy, energy)`` points and bounded by ``ref`` (accuracy floor,
    energy ceiling): larger is better."""
    pts = sorted((p for p in points if p[0] > ref[0] and p[1] < ref[1]), key=lambda p: p[1])
    area, best = 0.0, ref[0]
    for i, (acc, e) in enumerate(pts):
        best = max(best, acc)
        nxt = pts[i + 1][1] if i + 1 < len(pts) else ref[1]
        area += (best - ref[0]) * (nxt - e)
    return area


def compare_fronts(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Dominance counts and hypervolumes of two fronts of (accuracy, energy) points."""
    from search.scheduler import dominates

    def better(p: tuple[float, float], q: tuple[float, float]) -> bool:  # accuracy up, energy down
        return dominates((-p[0], p[1]), (-q[0], q[1]))

    allp = list(a) + list(b)
    ref = (min(p[0] for p in allp) - 0.01, max(p[1] for p in allp) * 1.1)
    return {"reference": ref,
            "a_dominates_b": sum(any(better(p, q) for p in a) for q in b),
            "b_dominates_a": sum(any(better(q, p) for q in b) for p in a),
            "hypervolume_a": hypervolume(a, ref), "hypervolume_b": hypervolume(b, ref),
            "a_points": len(a), "b_points": len(b)}


def _rescale(cfg: Any, minutes: Optional[float], smoke: bool) -> Any:
    """The search with its budget set to ``minutes`` (or a smoke-sized one)."""
    o = cfg.oneshot
    if smoke:
        train = {**o.train, "time_budget_s": 20, "epochs": 2, "samples_per_epoch": 1280}
        fin = {**o.finalist_train, "time_budget_s": 10, "epochs": 1, "samples_per_epoch": 640}
        return replace(cfg, oneshot=replace(o, train=train, finalist_train=fin, num_evals=6, finalists=2,
                                            eval_images=250, calib_images=128))
    if minutes is None:
        return cfg
    budget = minutes * 60
    train = {**o.train, "time_budget_s": round(0.55 * budget)}
    fin = {**o.finalist_train, "time_budget_s": round(0.30 * budget / o.finalists)}
    return replace(cfg, oneshot=replace(o, train=train, finalist_train=fin))


def _spread(scores: list[Any], n: int, seed: int) -> list[Any]:
    """``n`` distinct subnets spread evenly over the predicted accuracies."""
    uniq: dict[str, Any] = {}
    for s in scores:
        uniq.setdefault(json.dumps(s.spec, sort_keys=True), s)
    pool = sorted(uniq.values(), key=lambda s: s.acc)
    if len(pool) <= n:
        return pool
    idx = sorted({round(i * (len(pool) - 1) / (n - 1)) for i in range(n)})
    rest = [i for i in range(len(pool)) if i not in idx]
    random.Random(seed).shuffle(rest)
    idx += rest[: n - len(idx)]
    return [pool[i] for i in sorted(idx)]


def _train_standalone(cfg: Any, spec: dict[str, Any], seconds: float, out: Path, smoke: bool) -> dict[str, Any]:
    """One subnet trained here with the finalists' recipe, tested on the test split."""
    from search.oneshot import spec_overrides
    from trainers.config import TrainConfig
    from trainers.local import run_local

    shape = {"img_size": cfg.shape.img_size, "in_chans": cfg.shape.in_chans, "num_classes": cfg.shape.num_classes}
    train = {**cfg.train, **cfg.oneshot.finalist_train, "time_budget_s": seconds}
    if smoke:
        train.update(epochs=1, samples_per_epoch=640, max_eval_batches=1)
    tc = TrainConfig.from_dict({**train, "model": cfg.base_model, "data": cfg.data, "log_model": False,
                                "model_overrides": {**shape, **spec_overrides(spec)}})
    metrics, _ = run_local(tc, out)
    return {"test_acc": float(metrics["test_acc"]), "energy_uj": float(metrics.get("energy_per_image_uj", float("nan")))}


def _trial_front(uri: str, experiment: str, name: str) -> list[tuple[float, float]]:
    from search.tracking import collect_trials, find_search_runs, pareto_front

    runs = find_search_runs(uri, experiment, name)
    if not runs:
        raise SystemExit(f"no search named {name!r} in experiment {experiment!r} at {uri}")
    rows = collect_trials(uri, runs[0].info.run_id)
    return [(r.test_acc, r.energy_uj) for r in pareto_front(rows)]


def _finished_oneshot(uri: str, cfg: Any) -> tuple[list[Any], list[tuple[float, float]], dict[str, Any]]:
    """The scores (from the parent run's ``search/oneshot_scores.csv``), the finalists' (test
    accuracy, energy) and the parent's metrics of the newest one-shot search named ``cfg.name``."""
    import csv

    from search.oneshot import Score, spec_of_row
    from search.tracking import collect_trials, find_search_runs
    from trainers.tracking import mlflow_client

    runs = find_search_runs(uri, cfg.experiment, cfg.name)
    if not runs:
        raise SystemExit(f"no search named {cfg.name!r} in experiment {cfg.experiment!r} at {uri}")
    parent = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as d:
        text = Path(mlflow_client(uri).download_artifacts(parent, "search/oneshot_scores.csv", d)).read_text()
    scores = [Score(spec=spec_of_row(r), acc=float(r["heldout_acc"]), energy_uj=float(r["energy_uj"]),
                    num_params=int(r["num_params"]), firing_rate=float(r["firing_rate"]), seconds=float(r["seconds"]),
                    number=int(r["number"]))
              for r in csv.DictReader(text.splitlines())]
    rows = collect_trials(uri, parent)
    finalists = [(r.test_acc, r.energy_uj) for r in rows if r.scored and not r.is_baseline]
    return scores, finalists, dict(runs[0].data.metrics)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/search_oneshot_fashion_mnist.yaml"))
    p.add_argument("--budget-min", type=float, default=None, help="rescale the one-shot search to this many minutes")
    p.add_argument("--tau-subnets", type=int, default=12, help="subnets trained stand-alone for the rank agreement")
    p.add_argument("--tau-train-s", type=float, default=60.0, help="training seconds of each of them")
    p.add_argument("--compare-config", default=None, help="a trial-mode search file to run here for the front comparison")
    p.add_argument("--compare-search", default=None, help="a finished trial-mode search (by name) to compare with")
    p.add_argument("--compare-experiment", default="mixersnn-search")
    p.add_argument("--compare-tracking-uri", default=None)
    p.add_argument("--oneshot-tracking-uri", default=None,
                   help="take the finished one-shot search of --config's name from this MLflow store instead of running it")
    p.add_argument("--root", default=None, help="folder for the runs and the MLflow store (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--smoke", action="store_true", help="tiny budgets: checks the script runs")
    args = p.parse_args(argv)

    import torch

    from mixersnn.accounting.zero_cost import rank_correlation
    from search.config import load_search_config
    from search.oneshot import run_oneshot, _score_of

    torch.set_num_threads(2)
    root = Path(args.root or tempfile.mkdtemp(prefix="oneshot-bench-")).resolve()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_search_config(args.config, storage_path=str(root / "runs"), tracking_uri=uri)
    cfg = _rescale(cfg, args.budget_min, args.smoke)
    out: dict[str, Any] = {"config": args.config, "budget_min": args.budget_min, "smoke": args.smoke}

    if args.oneshot_tracking_uri:
        scores, finalists, out["oneshot_summary"] = _finished_oneshot(args.oneshot_tracking_uri, cfg)
        out["oneshot_wall_s"] = out["oneshot_summary"].get("search_wall_s")
    else:
        t0 = time.time()
        res = run_oneshot(cfg, register=False)
        out["oneshot_wall_s"] = time.time() - t0
        out["oneshot_summary"] = res.summary
        import optuna

        study = optuna.load_study(study_name=f"{cfg.name}-oneshot", storage=cfg.optuna_storage())
        stages = len(cfg.oneshot.space["depths"])
        scores = [_score_of(t, stages) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
        finalists = [(r.test_acc, r.energy_uj) for r in res.rows if r.scored and not r.is_baseline]
    out["oneshot_front"] = finalists

    n = 3 if args.smoke else args.tau_subnets
    picked = _spread(scores, n, cfg.seed)
    pairs = []
    for i, s in enumerate(picked):
        real = _train_standalone(cfg, s.spec, args.tau_train_s, root / "tau" / f"s{i}", args.smoke)
        pairs.append({"spec": s.spec, "predicted_acc": s.acc, "predicted_energy_uj": s.energy_uj, **real})
        print(f"stand-alone {i + 1}/{len(picked)}: {s.spec} predicted {s.acc:.4f} real {real['test_acc']:.4f}", flush=True)
    out["tau_subnets"] = pairs
    out["rank_agreement"] = rank_correlation([q["predicted_acc"] for q in pairs], [q["test_acc"] for q in pairs])

    trial_front = None
    if args.compare_search:
        trial_front = _trial_front(args.compare_tracking_uri or uri, args.compare_experiment, args.compare_search)
    elif args.compare_config:
        from search.driver import run_search

        tcfg = load_search_config(args.compare_config, storage_path=str(root / "runs"), tracking_uri=uri)
        t1 = time.time()
        tres = run_search(tcfg, register=False, quiet=True)
        out["trials_wall_s"] = time.time() - t1
        trial_front = [(r.test_acc, r.energy_uj) for r in tres.front]
    if trial_front is not None and finalists:
        out["trial_front"] = trial_front
        out["fronts"] = compare_fronts(finalists, trial_front)  # a = one-shot, b = trial-by-trial

    _print(out, len(scores), finalists, trial_front)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


def _print(out: dict[str, Any], scored: int, finalists: list, trial_front: Optional[list]) -> None:
    ra = out["rank_agreement"]
    wall = out.get("oneshot_wall_s")
    print(f"\none-shot search: {wall:.0f} s; {scored} subnets scored" if wall else f"\none-shot search: {scored} subnets scored")
    print(f"rank agreement over {ra['n']} subnets: Kendall tau {ra['kendall_tau']:.3f}, Spearman {ra['spearman_rho']:.3f}")
    if "fronts" in out:
        f = out["fronts"]
        print(f"fronts: one-shot {f['a_points']} points, trial-by-trial {f['b_points']}; one-shot dominates "
              f"{f['a_dominates_b']} of theirs, they dominate {f['b_dominates_a']} of ours; hypervolume "
              f"{f['hypervolume_a']:.4f} vs {f['hypervolume_b']:.4f}")
        for name, front in (("one-shot", finalists), ("trial-by-trial", trial_front)):
            print(f"  {name:>15}: " + ", ".join(f"{a:.4f}@{e:.3f}uJ" for a, e in sorted(front, key=lambda x: x[1])))


if __name__ == "__main__":
    raise SystemExit(main())
