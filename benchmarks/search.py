"""What a search trial costs beyond training, on each trial path, and where a search's CPU goes.

Measured, not asserted. Two parts, in one run on one local Ray runtime:

1. **Overhead per trial, side by side.** The same ``--trials`` tiny trials (one epoch of a few
   steps on real Fashion-MNIST) on the in-process path (the loop inside a reused Tune trial
   process) and on the Ray Train path (``scale.in_process: false``: a ``TorchTrainer`` per
   trial). Per trial: wall seconds from Tune starting the trial to its first training step
   (the first report's arrival, less the epoch's training and evaluation time it reports),
   and CPU seconds of the whole machine per trial (``/proc/stat``, every process).
2. **A search of ``--minutes``** (5 by default) of the README demo's space and schedule, in
   process: trials and training images per minute, and the share of the machine's CPU time
   spent in training steps (the trials' summed step time, one torch thread each, over the
   machine's busy CPU time).

    .venv/bin/python benchmarks/search.py              # both parts, about 8 minutes
    .venv/bin/python benchmarks/search.py --json out.json
    .venv/bin/python benchmarks/search.py --smoke      # seconds of each, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable as a script from anywhere: the repository first, and not this script's own folder,
# whose search.py would shadow the search package here and in the Ray workers (they get the
# driver's sys.path).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

REPO = Path(__file__).resolve().parents[1]
CONCURRENT = 2  # trials at once in part 1: what the 2-core machines hold
TINY_SPACE = {"spe": False, "num_stages": 2, "blocks_per_stage": 1, "embed_dim": 12, "mlp_ratio": 2, "T": 1,
              "patch_size": 7, "batch_size": 64, "lr": 0.005, "weight_decay": 0.01, "label_smoothing": 0.0}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _clock_cls() -> type:
    from ray.tune import Callback

    class TrialClock(Callback):
        """When Tune started each trial and when its first result reached the driver."""

        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.first: dict[str, tuple[float, dict[str, Any]]] = {}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started.setdefault(trial.trial_id, time.time())

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if "epoch_time_s" in result:
                self.first.setdefault(trial.trial_id, (time.time(), dict(result)))

    return TrialClock


def _search_cfg(name: str, root: Path, uri: str, **extra: Any) -> Any:
    from search.config import load_search_config

    d: dict[str, Any] = {"name": name, "experiment": "bench-search", "tracking_uri": uri,
                         "storage_path": str(root / "runs"), "seed": 0, "objective": {"mode": "multi"}}
    d.update(extra)
    path = root / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(d))
    return load_search_config(path)


def _step_seconds(uri: str, run_ids: list[str]) -> tuple[float, float]:
    """Summed training-step seconds and training images of runs, from their epoch records."""
    from trainers.tracking import mlflow_client

    client = mlflow_client(uri)
    secs = images = 0.0
    for rid in run_ids:
        t = {m.step: m.value for m in client.get_metric_history(rid, "epoch_time_s")}
        r = {m.step: m.value for m in client.get_metric_history(rid, "images_per_s")}
        secs += sum(t.values())
        images += sum(t[s] * r.get(s, 0.0) for s in t)
    return secs, images


def _metric_sum(uri: str, run_ids: list[str], key: str) -> float:
    """A metric summed over every step of the runs."""
    from trainers.tracking import mlflow_client

    client = mlflow_client(uri)
    return float(sum(m.value for rid in run_ids for m in client.get_metric_history(rid, key)))


def overhead(path: str, n: int, root: Path, uri: str) -> dict[str, Any]:
    """``n`` tiny trials on one path; the per-trial start-up and CPU figures."""
    from search.driver import run_search

    cfg = _search_cfg(f"overhead-{path}", root, uri, space=TINY_SPACE,
                      train={"epochs": 1, "max_steps_per_epoch": 5, "max_eval_batches": 1, "eval_batch_size": 250,
                             "warmup_epochs": 0.0, "log_model": False},
                      scale={"num_workers": 1, "cpus_per_worker": 0.9, "in_process": path == "in-process"},
                      budget={"num_trials": n, "max_concurrent_trials": CONCURRENT})
    clock = _clock_cls()()
    cpu0, t0 = busy_cpu_s(), time.time()
    res = run_search(cfg, quiet=True, register=False, log=lambda s: None, callbacks=[clock])
    wall, cpu = time.time() - t0, busy_cpu_s() - cpu0
    startup = []
    for tid, (arrived, result) in clock.first.items():
        if tid in clock.started:
            startup.append(arrived - result["epoch_time_s"] - result.get("eval_time_s", 0.0) - clock.started[tid])
    steps, _ = _step_seconds(uri, [r.run_id for r in res.rows])
    evals = _metric_sum(uri, [r.run_id for r in res.rows], "eval_time_s")
    trials = max(1, len(res.rows))
    return {"path": path, "trials": len(res.rows), "wall_s": wall, "startup_s_median": statistics.median(startup),
            # Trial slots the search held (wall x trials at once), less the training and
            # evaluation done in them: everything else a trial cost, per trial.
            "slot_overhead_s": wall * CONCURRENT / trials - (steps + evals) / trials,
            "startup_s_max": max(startup), "startup_s_first": startup[0] if startup else None,
            "cpu_s_per_trial": cpu / max(1, len(res.rows)), "step_s_per_trial": steps / max(1, len(res.rows))}


def search_minutes(minutes: float, root: Path, uri: str, smoke: bool) -> dict[str, Any]:
    """A search of the README demo's space and schedule for ``minutes``, in process."""
    from search.driver import run_search
    from search.config import load_search_config

    demo = load_search_config(REPO / "configs" / "search_fashion_mnist.yaml").to_dict()
    train = dict(demo["train"])
    if smoke:
        train.update(samples_per_epoch=640, max_eval_batches=1, log_model=False, full_final_eval=False)
    cfg = _search_cfg("minutes", root, uri, space=demo["space"], train=train, scale=demo["scale"],
                      constraints=demo["constraints"], asha=demo["asha"],
                      budget={"num_trials": 1000, "time_budget_s": minutes * 60, "max_concurrent_trials": "auto"})
    cpu0, t0 = busy_cpu_s(), time.time()
    res = run_search(cfg, quiet=True, register=False, log=lambda s: None)
    wall, cpu = time.time() - t0, busy_cpu_s() - cpu0
    steps, images = _step_seconds(uri, [r.run_id for r in res.rows])
    return {"minutes": minutes, "wall_s": wall, "trials": len(res.rows),
            "trials_per_min": len(res.rows) / minutes, "images_per_min": images / minutes,
            "step_cpu_share": steps / cpu, "cpu_s": cpu, "step_s": steps,
            # The selected trial's test accuracy (chosen on held-out shards where the config has them).
            "best_acc": res.best.test_acc if res.best is not None else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8, help="tiny trials per path (part 1)")
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the demo-space search (part 2)")
    ap.add_argument("--smoke", action="store_true", help="2 trials per path and a 30-second search")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.trials, args.minutes = 2, 0.5

    import ray

    from search.driver import LOCAL_WORKER_ENV

    os.environ.update(LOCAL_WORKER_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": dict(LOCAL_WORKER_ENV)}, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        rows = [overhead(p, args.trials, root, uri) for p in ("in-process", "ray-train")]
        long = search_minutes(args.minutes, root, uri, args.smoke)
    ray.shutdown()

    print(f"\nper-trial overhead, {args.trials} tiny trials per path ({CONCURRENT} at a time, 2 cores):")
    print(f"  {'path':<11} {'start->1st step (median / max / first)':>40} {'slot s/trial':>13} {'CPU s/trial':>12} "
          f"{'step s/trial':>13} {'wall s':>7}")
    for r in rows:
        first = f"{r['startup_s_first']:.1f}" if r["startup_s_first"] is not None else "-"
        print(f"  {r['path']:<11} {r['startup_s_median']:>21.2f} / {r['startup_s_max']:5.2f} / {first:>5} s "
              f"{r['slot_overhead_s']:>13.2f} {r['cpu_s_per_trial']:>12.2f} {r['step_s_per_trial']:>13.2f} "
              f"{r['wall_s']:>7.1f}")
    ip, rt = rows
    print("  (slot s/trial: the trial slots' time, wall x trials at once, less training and evaluation, per trial)")
    print(f"  Ray Train path / in-process: start-up {rt['startup_s_median'] / ip['startup_s_median']:.1f}x, "
          f"slot overhead {rt['slot_overhead_s'] / ip['slot_overhead_s']:.1f}x, "
          f"CPU per trial {rt['cpu_s_per_trial'] / ip['cpu_s_per_trial']:.1f}x")
    print(f"\nsearch of {long['minutes']:g} min (demo space, in process): {long['trials']} trials "
          f"({long['trials_per_min']:.1f}/min), {long['images_per_min']:,.0f} training images/min, "
          f"{100 * long['step_cpu_share']:.0f}% of the machine's CPU time in training steps "
          f"({long['step_s']:.0f} of {long['cpu_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"overhead": rows, "search": long}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
