"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

The reference design is MO-ASHA (Schmucker, Donini, Zafar, Salinas, Archambeau, "Multi-objective
Asynchronous Successive Halving", 2021): ASHA's rungs (Li et al., 2020), with the single-metric
ranking replaced by non-dominated sorting and, inside a front, an epsilon-net order that spreads
the promoted trials along the front.

Rungs sit at ``grace_period * reduction_factor**k`` epochs below ``max_t`` (grace 1, factor 3,
9 epochs: rungs at 1 and 3, full training at 9). This is ASHA's promotion variant: a trial that
reaches a rung is recorded there with its objectives at that epoch and pauses (Tune keeps its
checkpoint), unless it already ranks in the top ``floor(n / reduction_factor)`` of the ``n``
trials recorded at the rung, in which case it goes straight on. Whenever Tune can start a trial,
the scheduler first promotes a paused trial that ranks in the top share of its rung (highest
rung first; the trial continues from its checkpoint, never from scratch), and only then lets a
new trial start. So the first trials do not go to full training unopposed: a rung needs
``reduction_factor`` results before it promotes one. Once every trial of the search exists and
none runs or waits to start, the trials still paused stop where they are.

With ``max_running``, at most that many trials train at once: a paused trial is promoted, and
a waiting one started, only while fewer are in flight (running, or pending: Tune starts every
pending trial by itself, the scheduler's choice only comes first). New trials over the limit
(a searcher that proposes them regardless, or a resumed experiment, whose unfinished trials
Tune restarts all at once) wait paused before they ever run, and start as places free, after
the promotions due. A searcher with a ``new_trial_gate`` attribute (the driver's) is given the
scheduler's check there and proposes a trial only when it can start, so the sampler proposes
each with the results so far. (Tune's own ``max_concurrent_trials`` counts paused trials as
running, which would stop new trials once the rungs hold that many.)

The rungs and promotions are kept in a JSON file beside Tune's experiment state (Tune does not
save schedulers), so a resumed search ranks against the trials of the killed driver, and a
trial that a restart resumed past a rung it was not promoted from pauses at its next report
(Tune restarts paused trials; such a trial trains one epoch more than its rung). Records of
trials the resumed experiment does not hold (started after the killed driver's last saved
state) are dropped when the resumed driver first schedules.

Trials whose config marks them as baselines are never ranked or paused: they train the full
schedule. A result carrying ``search_final`` (the trial function's last report) is not a rung
result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mixersnn._atomic import atomic_path

__all__ = ["MultiObjectiveASHA", "promotion_order", "dominates", "non_dominated_fronts", "rung_milestones"]


def rung_milestones(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """The epochs at which trials are judged: ``grace_period * reduction_factor**k < max_t``."""
    out, t = [], int(grace_period)
    while t < max_t:
        out.append(t)
        t *= int(reduction_factor)
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Objectives to minimise: ``a`` is no worse than ``b`` in every one and better in one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_fronts(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of ``points`` (objectives to minimise) grouped into successive non-dominated
    fronts: the first front is dominated by no point, the second only by points of the first,
    and so on (NSGA-II's sorting)."""
    n = len(points)
    beaten_by = [0] * n
    beats: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                beats[i].append(j)
                beaten_by[j] += 1
            elif dominates(points[j], points[i]):
                beats[j].append(i)
                beaten_by[i] += 1
    fronts, current = [], [i for i in range(n) if beaten_by[i] == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in beats[i]:
                beaten_by[j] -= 1
                if beaten_by[j] == 0:
                    nxt.append(j)
        current = sorted(nxt)
    return fronts


def _epsnet(indices: list[int], scaled: list[list[float]]) -> list[int]:
    """``indices`` in epsilon-net order: start with the best in the first objective, then
    repeatedly take the point farthest (Euclidean, in the scaled space) from those taken."""
    left = sorted(indices, key=lambda i: (scaled[i][0], i))
    order = [left.pop(0)]
    dist = {i: math.dist(scaled[i], scaled[order[0]]) for i in left}
    while left:
        far = max(left, key=lambda i: (dist[i], -i))
        left.remove(far)
        order.append(far)
        for i in left:
            dist[i] = min(dist[i], math.dist(scaled[i], scaled[far]))
    return order


def promotion_order(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of ``points`` (objectives to minimise), best first: by non-dominated front, and
    within a front in epsilon-net order over the objectives scaled to [0, 1], starting from the
    point best in the first objective. A tie-break that spreads along the front: after the
    most accurate point comes the one farthest from it (typically the cheapest), then the
    one in the largest gap, and so on."""
    if not points:
        return []
    dims = len(points[0])
    lo = [min(p[d] for p in points) for d in range(dims)]
    hi = [max(p[d] for p in points) for d in range(dims)]
    scaled = [[(p[d] - lo[d]) / (hi[d] - lo[d]) if hi[d] > lo[d] else 0.0 for d in range(dims)] for p in points]
    return [i for front in non_dominated_fronts(points) for i in _epsnet(front, scaled)]


def _tune_scheduler_base() -> type:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class MultiObjectiveASHA(_tune_scheduler_base()):  # type: ignore[misc]
    """MO-ASHA over epochs (the ``epoch`` index each epoch's report carries).

    Args:
        metrics: result keys of the objectives, e.g. ``["test_acc", "energy_per_image_uj"]``.
        modes: ``"max"`` or ``"min"`` per metric.
        max_t: epochs of full training.
        grace_period: the first rung (epochs).
        reduction_factor: promote the top ``1 / reduction_factor`` of each rung (>= 2).
        num_trials: trials the search will create in all (baselines included); once that
            many exist and none runs or waits to start, the paused ones are stopped. None:
            they wait until the search's time budget ends it.
        log_metrics: metrics compared on a log scale (energies span orders of magnitude, so
            the spread along the front is measured in ratios, not differences).
        state_file: where rungs and promotions are kept (None: in memory only).
        log: where a line goes for each pause and promotion (None: nowhere).
        max_running: trials in flight at most (running, or pending: about to start); paused
            ones do not count. None: only the trials' resources bound how many run.
    """

    def __init__(self, *, metrics: Sequence[str], modes: Sequence[str], max_t: int, grace_period: int = 1,
                 reduction_factor: int = 3, num_trials: Optional[int] = None,
                 log_metrics: Sequence[str] = ("energy_per_image_uj",), state_file: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None, max_running: Optional[int] = None) -> None:
        super().__init__()
        if len(metrics) != len(modes) or not metrics:
            raise ValueError(f"metrics={list(metrics)} and modes={list(modes)} must be non-empty and of one length")
        bad = [m for m in modes if m not in ("max", "min")]
        if bad:
            raise ValueError(f"modes={list(modes)}: each must be 'max' or 'min'")
        if reduction_factor < 2 or grace_period < 1:
            raise ValueError(f"reduction_factor={reduction_factor} must be >= 2 and grace_period={grace_period} >= 1")
        if max_running is not None and int(max_running) < 1:
            raise ValueError(f"max_running={max_running} must be >= 1 (or None: no limit)")
        self.metrics, self.modes = list(metrics), list(modes)
        self.log_metrics = set(log_metrics)
        self.reduction_factor = int(reduction_factor)
        self.milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self.num_trials = num_trials
        self.state_file = state_file
        self.log = log
        # rung (epochs, as a string: JSON keys) -> trial id -> objectives (to minimise)
        self.rungs: dict[str, dict[str, list[float]]] = {str(m): {} for m in self.milestones}
        # "<trial id>@<rung>" for every promotion out of a rung
        self.promoted: set[str] = set()
        self._loaded = False
        self._pruned = False
        self.max_running = None if max_running is None else int(max_running)
        # Trial ids seen by choose_trial_to_run, and those it paused before they ever ran
        # (no place free when they were added); Tune's live list of trials (not pickled).
        self._seen: set[str] = set()
        self._held: set[str] = set()
        self._trials: Optional[list[Any]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trials": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A scheduler pickled before max_running existed (a search resumed across versions).
        self.__dict__.update({"max_running": None, "_seen": set(), "_held": set(), "_trials": None, **state})

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.state_file and Path(self.state_file).exists():
            state = json.loads(Path(self.state_file).read_text())
            for m, recs in state.get("rungs", {}).items():
                self.rungs.setdefault(m, {}).update(recs)
            self.promoted.update(state.get("promoted", []))

    def _save(self) -> None:
        if not self.state_file:
            return
        with atomic_path(self.state_file, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps({"milestones": self.milestones, "metrics": self.metrics,
                                             "modes": self.modes, "rungs": self.rungs,
                                             "promoted": sorted(self.promoted)}, indent=1))

    def _objectives(self, result: dict[str, Any]) -> Optional[list[float]]:
        out = []
        for name, mode in zip(self.metrics, self.modes):
            v = result.get(name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(float(v)):
                return None
            v = float(v)
            if name in self.log_metrics:
                v = math.log(max(v, 1e-30))
            out.append(-v if mode == "max" else v)
        return out

    # ------------------------------------------------------------------ ranking
    def promotable(self, milestone: int) -> list[str]:
        """Trials of rung ``milestone`` that rank in its top ``floor(n / reduction_factor)``
        and have not been promoted from it yet, best first."""
        self._load()
        rung = self.rungs.get(str(milestone), {})
        ids = list(rung)
        keep = len(ids) // self.reduction_factor
        order = promotion_order([rung[i] for i in ids])[:keep]
        return [ids[i] for i in order if f"{ids[i]}@{milestone}" not in self.promoted]

    def report(self, trial_id: str, epochs: int, result: dict[str, Any]) -> str:
        """Record ``trial_id`` after ``epochs`` epochs with ``result`` and decide:
        ``"CONTINUE"`` (between rungs, or promoted at once) or ``"PAUSE"`` (wait at this rung,
        or it trained past a rung it was never promoted from)."""
        self._load()
        for m in self.milestones:
            if m < epochs and str(m) in self.rungs and trial_id in self.rungs[str(m)] \
                    and f"{trial_id}@{m}" not in self.promoted:
                return "PAUSE"  # resumed by a restart past a rung it was not promoted from
        if epochs not in self.milestones:
            return "CONTINUE"
        if f"{trial_id}@{epochs}" in self.promoted:
            return "CONTINUE"  # restored from a checkpoint taken before this rung: judged already
        objectives = self._objectives(result)
        if objectives is None:
            return "CONTINUE"  # nothing to rank by (the metrics are missing): not a rung result
        rung = self.rungs.setdefault(str(epochs), {})
        rung[trial_id] = objectives
        decision = "PAUSE"
        if trial_id in self.promotable(epochs):
            self.promoted.add(f"{trial_id}@{epochs}")
            decision = "CONTINUE"
        self._save()
        if self.log is not None:
            shown = ", ".join(f"{k} {result[k]:.4g}" for k in self.metrics)
            what = "goes on at once (top of its rung)" if decision == "CONTINUE" else "pauses"
            self.log(f"trial-{trial_id} {what} after {epochs} epoch(s): {shown}; rung {epochs} holds {len(rung)}, "
                     f"promotes {len(rung) // self.reduction_factor}")
        return decision

    def next_promotion(self, paused: set[str]) -> Optional[tuple[str, int]]:
        """The paused trial to resume, with the rung it leaves: the best promotable one of the
        highest rung that has one, or None."""
        self._load()
        for m in reversed(self.milestones):
            for tid in self.promotable(m):
                if tid in paused:
                    return tid, m
        return None

    def promote(self, trial_id: str, milestone: int) -> None:
        self.promoted.add(f"{trial_id}@{milestone}")
        self._save()
        if self.log is not None:
            self.log(f"trial-{trial_id} promoted past epoch {milestone}: continues from its checkpoint")

    # ------------------------------------------------------------------ Tune
    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        from search.space import TrialSpec

        spec = TrialSpec.from_dict(trial.config["resolved"])
        if spec.is_baseline or result.get("search_final") or result.get("infeasible"):
            return self.CONTINUE
        # Epochs from the loop's own count (its epoch index), which a trial restored from a
        # checkpoint continues; Tune's training_iteration is the fallback.
        epochs = int(result["epoch"]) + 1 if "epoch" in result else int(result.get("training_iteration", 0))
        if "num_params" not in result and "num_params" in self.metrics:
            result = {**result, "num_params": spec.num_params}
        return self.PAUSE if self.report(trial.trial_id, epochs, result) == "PAUSE" else self.CONTINUE

    def forget_unknown(self, known: set[str]) -> list[str]:
        """Drop the rung records of trials not in ``known`` and return their ids: trials a
        killed driver started after its last saved state, which the resumed experiment does
        not hold (their results must not take a place in a rung's share)."""
        self._load()
        lost = sorted({t for rung in self.rungs.values() for t in rung} - known)
        if lost:
            for rung in self.rungs.values():
                for t in lost:
                    rung.pop(t, None)
            self._save()
            if self.log is not None:
                self.log(f"rung records of {len(lost)} trial(s) the resumed experiment does not hold dropped: "
                         f"{', '.join(lost)}")
        return lost

    def _in_flight(self, trials: Sequence[Any], skip: Sequence[Any] = ()) -> int:
        """Trials running or pending (Tune starts every pending trial by itself: one the
        scheduler chose stays PENDING until its process starts), not counting ``skip``."""
        from ray.tune.experiment import Trial

        return sum(1 for t in trials if t.status in (Trial.RUNNING, Trial.PENDING) and t not in skip)

    def accepts_new_trial(self) -> bool:
        """Whether a new trial may start now: fewer than ``max_running`` in flight, and no
        paused trial waiting for a place (one over the limit, or a promotion due), which goes
        first. A searcher's ``new_trial_gate``; it reads Tune's trials as they are now."""
        from ray.tune.experiment import Trial

        if self.max_running is None or self._trials is None:
            return True
        trials = list(self._trials)
        paused = {t.trial_id for t in trials if t.status == Trial.PAUSED}
        return (self._in_flight(trials) < self.max_running and not paused & self._held
                and self.next_promotion(paused) is None)

    def _wire(self, tune_controller: Any) -> list[Any]:
        """Tune's trials (kept for :meth:`accepts_new_trial`), and the scheduler's check put in
        the searcher's ``new_trial_gate`` where it has one (Tune's searcher wrappers unwrapped)."""
        trials = tune_controller.get_trials()
        self._trials = trials
        if self.max_running is not None:
            searcher = getattr(tune_controller, "search_alg", None)
            for _ in range(4):
                if searcher is None or hasattr(searcher, "new_trial_gate"):
                    break
                searcher = getattr(searcher, "searcher", None)
            if searcher is not None and hasattr(searcher, "new_trial_gate"):
                searcher.new_trial_gate = self.accepts_new_trial
        return trials

    def choose_trial_to_run(self, tune_controller: Any) -> Optional[Any]:
        """Called by Tune at each step, before it starts the pending trials itself: hold new
        trials over ``max_running`` (paused), then hand out a promotion due, else a pending
        trial, else a held one, while a place is free; or stop the paused trials once no rung
        can change."""
        from ray.tune.experiment import Trial

        trials = self._wire(tune_controller)
        if not self._pruned:
            self._pruned = True
            self.forget_unknown({t.trial_id for t in trials})
        new = [t for t in trials if t.trial_id not in self._seen and t.status == Trial.PENDING]
        self._seen.update(t.trial_id for t in trials)
        free = None if self.max_running is None else self.max_running - self._in_flight(trials, skip=new)
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED}
        choice = self.next_promotion(set(paused)) if free is None or free > 0 else None
        if free is not None:
            free -= 1 if choice is not None else 0
            # Tune would start these at once: past the free places they wait, paused, before
            # they ever ran (Tune calls this before it starts pending trials, in each step).
            for t in new:
                if free > 0:
                    free -= 1
                else:
                    tune_controller._set_trial_status(t, Trial.PAUSED)
                    self._held.add(t.trial_id)
                    if self.log is not None:
                        self.log(f"trial-{t.trial_id} waits for a place ({self.max_running} at a time)")
        if choice is not None:
            self._held.discard(choice[0])
            self.promote(*choice)
            return paused[choice[0]]
        pending = [t for t in trials if t.status == Trial.PENDING]
        if pending:
            return pending[0]
        held = [t for t in trials if t.trial_id in self._held and t.status == Trial.PAUSED]
        if held:
            if free is None or free > 0:
                self._held.discard(held[0].trial_id)
                return held[0]
            return None
        if free is not None and free <= 0:
            return None  # every place taken: nothing starts, and running trials can change a rung
        running = any(t.status == Trial.RUNNING for t in trials)
        if paused and not running and self.num_trials is not None and len(trials) >= self.num_trials:
            # Every trial exists, none runs or waits to start, so no rung can change: the
            # trials still paused are not promoted, and stop where they are.
            if self.log is not None:
                self.log(f"{len(paused)} paused trial(s) not promoted: they stop where they are")
            for t in paused.values():
                tune_controller.stop_trial(t)
        return None

    def debug_string(self) -> str:
        self._load()
        return "MO-ASHA: " + ", ".join(f"rung {m}: {len(self.rungs.get(str(m), {}))} recorded" for m in self.milestones)
