"""MO-ASHA (search.scheduler): the ordering it promotes by, its rungs and decisions, the
record it keeps for a resumed driver, and (in real Tune runs of a sleeping trainable) its limit
on the trials training at once. The scheduler inside a real search is exercised by
tests/test_search.py."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Optional

import pytest

from search.scheduler import MultiObjectiveASHA, non_dominated_fronts, promotion_order, rung_milestones


def _dominates(a, b) -> bool:  # type: ignore[no-untyped-def]
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def test_rungs_are_geometric_below_full_training() -> None:
    assert rung_milestones(1, 3, 9) == [1, 3]
    assert rung_milestones(1, 3, 10) == [1, 3, 9]
    assert rung_milestones(2, 2, 16) == [2, 4, 8]
    assert rung_milestones(1, 3, 1) == []


def test_fronts_are_nsga2_sorting() -> None:
    rng = random.Random(0)
    pts = [(rng.random(), rng.random()) for _ in range(40)]
    fronts = non_dominated_fronts(pts)
    assert sorted(i for f in fronts for i in f) == list(range(40))
    for k, front in enumerate(fronts):
        # Nothing in a front dominates another member; each member of front k > 0 is
        # dominated by some point of front k - 1, and by nothing in a later front.
        for i in front:
            assert not any(_dominates(pts[j], pts[i]) for j in front)
            if k:
                assert any(_dominates(pts[j], pts[i]) for j in fronts[k - 1])
            assert not any(_dominates(pts[j], pts[i]) for later in fronts[k:] for j in later)


def test_promotion_order_puts_fronts_first_then_spreads_along_the_front() -> None:
    # (-accuracy, log energy): a front of five points from cheap/weak to costly/strong, and
    # two dominated points.
    front = [(-0.60, 0.0), (-0.70, 1.0), (-0.80, 2.0), (-0.85, 3.0), (-0.88, 4.0)]
    dominated = [(-0.59, 2.5), (-0.50, 3.5)]
    order = promotion_order(front + dominated)
    assert set(order[:5]) == set(range(5)) and set(order[5:]) == {5, 6}
    # Best accuracy first, then the point farthest from it (the cheapest), then the middle.
    assert order[:3] == [4, 0, 2]


def test_promotion_order_with_one_objective_is_a_ranking() -> None:
    vals = [(0.3,), (0.1,), (0.2,), (0.1,)]
    order = promotion_order(vals)
    assert [vals[i][0] for i in order] == [0.1, 0.1, 0.2, 0.3]


def _sched(tmp_path: Path, name: str = "rungs.json", **kw) -> MultiObjectiveASHA:  # type: ignore[no-untyped-def]
    return MultiObjectiveASHA(metrics=["test_acc", "energy_per_image_uj"], modes=["max", "min"], max_t=9,
                              grace_period=1, reduction_factor=3, state_file=str(tmp_path / name), **kw)


def _r(acc: float, energy: float = 1.0) -> dict:
    return {"test_acc": acc, "energy_per_image_uj": energy}


def test_a_rung_promotes_its_top_third_once_it_holds_three(tmp_path: Path) -> None:
    s = _sched(tmp_path)
    # The first two trials at a rung wait (paused): a rung promotes floor(n / 3) of its n.
    assert s.report("t0", 1, _r(0.50)) == "PAUSE"
    assert s.report("t1", 1, _r(0.40)) == "PAUSE"
    assert s.next_promotion({"t0", "t1"}) is None
    # The third makes one promotion due: the best of the three, t0, still paused.
    assert s.report("t2", 1, _r(0.45)) == "PAUSE"
    assert s.promotable(1) == ["t0"] and s.next_promotion({"t0", "t1", "t2"}) == ("t0", 1)
    s.promote("t0", 1)
    assert s.next_promotion({"t1", "t2"}) is None
    # A trial that arrives in the top share goes straight on (no pause and resume).
    for i, acc in enumerate([0.30, 0.20]):
        assert s.report(f"u{i}", 1, _r(acc)) == "PAUSE"
    assert s.report("best", 1, _r(0.70)) == "CONTINUE"  # 6 recorded: top 2 are best and t0
    # Between rungs nothing is decided; at the next rung the trial is ranked again.
    assert s.report("best", 2, _r(0.10)) == "CONTINUE"
    assert s.report("best", 3, _r(0.80)) == "PAUSE"


def test_higher_rungs_promote_first_and_each_rung_only_its_share(tmp_path: Path) -> None:
    s = _sched(tmp_path)
    # Rung 1: a2 arrives third and best, and goes straight on; later a1 is due (2 of 6).
    got = [s.report(f"a{i}", 1, _r(acc)) for i, acc in enumerate([0.5, 0.6, 0.7, 0.4, 0.3, 0.2])]
    assert got == ["PAUSE", "PAUSE", "CONTINUE", "PAUSE", "PAUSE", "PAUSE"]
    # Rung 3: the best arrived first and waits.
    assert [s.report(f"b{i}", 3, _r(acc)) for i, acc in enumerate([0.9, 0.85, 0.8])] == ["PAUSE"] * 3
    paused = {"a0", "a1", "a3", "a4", "a5", "b0", "b1", "b2"}
    assert s.next_promotion(paused) == ("b0", 3)  # rung 3 before rung 1
    s.promote("b0", 3)
    assert s.next_promotion(paused - {"b0"}) == ("a1", 1)
    s.promote("a1", 1)
    # Rung 1's share (2 of 6) is used up and rung 3's (1 of 3): nothing is due.
    assert s.next_promotion(paused - {"b0", "a1"}) is None


def test_a_cheaper_trial_is_promoted_although_less_accurate(tmp_path: Path) -> None:
    s = _sched(tmp_path)
    for i, (a, e) in enumerate([(0.8, 1.0), (0.7, 1.0), (0.75, 1.0), (0.72, 1.0), (0.6, 0.1)]):
        s.report(f"t{i}", 1, _r(a, e))
    # 6 recorded: two promotions. The most accurate first, then (epsilon-net tie-break along
    # the front) the one ten times cheaper, not the second most accurate.
    s.report("t5", 1, _r(0.55, 0.2))
    assert s.promotable(1) == ["t0", "t4"]


def test_rungs_and_promotions_survive_a_new_driver(tmp_path: Path) -> None:
    s = _sched(tmp_path)
    for i, a in enumerate([0.5, 0.4, 0.45]):
        s.report(f"t{i}", 1, _r(a))
    s.promote("t0", 1)
    state = json.loads((tmp_path / "rungs.json").read_text())
    assert set(state["rungs"]["1"]) == {"t0", "t1", "t2"} and state["promoted"] == ["t0@1"]

    # A resumed driver unpickles a scheduler with empty rungs: it reads the file, so the killed
    # driver's trials count. A promoted trial restored from a checkpoint taken before its rung
    # report goes on; one that a restart resumed past a rung it was never promoted from
    # pauses at its next report.
    again = _sched(tmp_path)
    assert again.report("t0", 1, _r(0.1)) == "CONTINUE"
    assert again.report("t0", 2, _r(0.6)) == "CONTINUE"
    assert again.report("t1", 2, _r(0.9)) == "PAUSE"
    assert again.next_promotion({"t1", "t2"}) is None


def test_records_of_trials_a_resumed_experiment_lost_are_dropped(tmp_path: Path) -> None:
    s = _sched(tmp_path)
    for i, a in enumerate([0.9, 0.4, 0.45]):
        s.report(f"t{i}", 1, _r(a))
    # t0, the best, was started by a killed driver after its last saved state: the resumed
    # experiment does not hold it, so it must not take rung 1's one promotion.
    assert s.forget_unknown({"t1", "t2", "t3"}) == ["t0"]
    s.report("t3", 1, _r(0.3))
    assert s.promotable(1) == ["t2"]
    assert set(json.loads((tmp_path / "rungs.json").read_text())["rungs"]["1"]) == {"t1", "t2", "t3"}


def test_results_without_objectives_are_not_ranked(tmp_path: Path) -> None:
    s = _sched(tmp_path)
    assert s.report("t0", 1, {"test_acc": math.nan, "energy_per_image_uj": 1.0}) == "CONTINUE"
    assert s.report("t0", 1, {"energy_per_image_uj": 1.0}) == "CONTINUE"
    assert not (tmp_path / "rungs.json").exists()


@pytest.mark.parametrize("kw, match", [
    ({"metrics": ["a"], "modes": ["max", "min"]}, "one length"),
    ({"metrics": ["a"], "modes": ["up"]}, "'max' or 'min'"),
    ({"metrics": ["a"], "modes": ["max"], "reduction_factor": 1}, "reduction_factor=1"),
])
def test_bad_arguments_are_named(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiObjectiveASHA(max_t=9, **kw)


@pytest.mark.parametrize("max_running", [0, -1])
def test_max_running_must_be_positive(max_running: int) -> None:
    with pytest.raises(ValueError, match="max_running"):
        MultiObjectiveASHA(metrics=["a"], modes=["max"], max_t=9, max_running=max_running)


# ---------------------------------------------------------------------------- in a real Tune run


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    """One local Ray runtime (2 CPUs) for this module's Tune runs."""
    import ray
    from _helpers import start_local_ray

    start_local_ray()
    yield
    ray.shutdown()


def _epochs_trainable():  # type: ignore[no-untyped-def]
    """A Tune function trainable: ``epochs`` epochs of ``sleep_s`` each, a checkpoint after each
    (a paused trial resumes from it), and each epoch's (trial, acc, epoch, start, end) appended
    to a file in ``log_dir``. The first trial to start waits in its first epoch, up to
    ``company_s``, for a second one to start: a second trial that can start does so meanwhile.
    Made here, so that Ray pickles it by value (workers cannot import the test module)."""

    def train(config):  # type: ignore[no-untyped-def]
        import glob
        import json
        import os
        import tempfile
        import time

        from ray import tune

        start, ckpt = 0, tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d, open(os.path.join(d, "epoch.json")) as f:
                start = json.load(f)["epoch"] + 1
        tid, log_dir = tune.get_context().get_trial_id(), config["log_dir"]
        open(os.path.join(log_dir, f"{tid}.started"), "a").close()
        for epoch in range(start, config["epochs"]):
            t0 = time.time()
            while epoch == 0 and time.time() < t0 + config["company_s"] \
                    and len(glob.glob(os.path.join(log_dir, "*.started"))) < 2:
                time.sleep(0.05)
            time.sleep(config["sleep_s"])
            with open(os.path.join(log_dir, f"{tid}.jsonl"), "a") as f:
                f.write(json.dumps({"trial": tid, "acc": config["acc"], "epoch": epoch, "start": t0,
                                    "end": time.time()}) + "\n")
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "epoch.json"), "w") as f:
                    json.dump({"epoch": epoch}, f)
                # The most accurate trial is also the cheapest: it dominates, and ranks first.
                tune.report({"epoch": epoch, "test_acc": config["acc"] * (epoch + 1) / config["epochs"],
                             "energy_per_image_uj": 2.0 - config["acc"]},
                            checkpoint=tune.Checkpoint.from_directory(d))

    return train


# Best first: each later trial pauses at rung 1 behind the ones before, so paused trials are
# promoted (the best one twice) while trials that never ran wait for a place.
_ACCS = [0.8, 0.7, 0.6, 0.5]


def _trial_config(log_dir: Path, company_s: float) -> dict:
    from search.space import TrialSpec

    spec = TrialSpec(arch={}, train={}, num_params=1, energy_uj_dense=1.0, energy_uj_est=1.0)
    return {"epochs": 3, "sleep_s": 0.3, "company_s": company_s, "log_dir": str(log_dir), "resolved": spec.to_dict()}


def _gated_searcher_cls() -> type:
    from ray.tune.search import Searcher

    class Gated(Searcher):
        """Proposes the accuracies of ``_ACCS`` in turn, and none while ``new_trial_gate`` (set
        by the scheduler, as for the driver's searcher) says no place is free."""

        def __init__(self, base: dict) -> None:
            super().__init__()
            self.base, self.accs = base, list(_ACCS)
            self.new_trial_gate = None

        def suggest(self, trial_id: str):  # type: ignore[no-untyped-def]
            if self.new_trial_gate is not None and not self.new_trial_gate():
                return None
            return {**self.base, "acc": self.accs.pop(0)} if self.accs else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            pass

    return Gated


def _run_mo_asha(tmp_path: Path, max_running, *, gated: bool = False,  # type: ignore[no-untyped-def]
                 company_s: float = 0.0) -> tuple[list[dict], MultiObjectiveASHA]:
    """Four trials of 0.1 CPU (the 2-CPU runtime holds all at once) under MO-ASHA (3 epochs,
    rungs at 1 and 2), from a grid (all four exist at once) or the gated searcher; their
    epochs' records in start order, and the scheduler."""
    from ray import tune

    log_dir = tmp_path / "epochs"
    log_dir.mkdir(parents=True)
    base = _trial_config(log_dir, company_s)
    sched = MultiObjectiveASHA(metrics=["test_acc", "energy_per_image_uj"], modes=["max", "min"], max_t=3,
                               grace_period=1, reduction_factor=2, num_trials=len(_ACCS), max_running=max_running)
    search = {"search_alg": _gated_searcher_cls()(base)} if gated else {}
    tuner = tune.Tuner(
        tune.with_resources(_epochs_trainable(), {"cpu": 0.1}),
        param_space={} if gated else {**base, "acc": tune.grid_search(_ACCS)},
        tune_config=tune.TuneConfig(scheduler=sched, num_samples=len(_ACCS) if gated else 1, reuse_actors=True,
                                    **search),
        run_config=tune.RunConfig(name="mo", storage_path=str(tmp_path / "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    assert not results.errors and len(results) == len(_ACCS)
    epochs = [json.loads(line) for f in log_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
    return sorted(epochs, key=lambda e: e["start"]), sched


def _most_at_once(epochs: list[dict]) -> int:
    """The most epochs in progress at one instant (an epoch: [start, end])."""
    events = sorted([(e["start"], 1) for e in epochs] + [(e["end"], -1) for e in epochs])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
def test_max_running_keeps_mo_asha_to_one_trial_at_a_time(local_ray: None, tmp_path: Path) -> None:
    # Without a limit, the first trial's wait for company is cut short: Tune starts every
    # pending trial itself, whatever the scheduler chooses.
    epochs, _ = _run_mo_asha(tmp_path / "free", None, company_s=20.0)
    assert _most_at_once(epochs) > 1

    # With max_running=1 the first trial waits alone: the grid's other three trials wait
    # paused before they ever ran, and paused trials are promoted only into a free place.
    epochs, sched = _run_mo_asha(tmp_path / "one", 1, company_s=2.0)
    assert _most_at_once(epochs) == 1
    order = [(e["acc"], e["epoch"]) for e in epochs]
    # The best trial pauses at each rung until a later trial's result promotes it; the
    # others wait paused at rung 1 or 2 and are stopped there once no rung can change.
    assert order == [(0.8, 0), (0.7, 0), (0.8, 1), (0.6, 0), (0.5, 0), (0.7, 1), (0.8, 2)]
    assert len(sched.promoted) == 3

    # A searcher with the gate proposes a trial only when it can start: none waits unstarted.
    epochs, sched = _run_mo_asha(tmp_path / "gated", 1, gated=True)
    assert _most_at_once(epochs) == 1
    assert [(e["acc"], e["epoch"]) for e in epochs] == order
    assert not sched._held and len(sched._seen) == len(_ACCS)
