"""MLflow side of a search: the parent run, the trial table read back from the child runs,
the Pareto front (table + plot), Optuna's plots and the model registry.

MLflow is the record: everything here is computed from the child runs of the parent run, so
``mixersnn report`` gives the same answer as the end of the search, and a resumed search
(whose trials ran in two driver processes) is summarised as one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from search.scheduler import dominates
from trainers.tracking import mlflow_client

__all__ = [
    "TrialRow",
    "best_first",
    "held_out",
    "collect_trials",
    "pareto_front",
    "format_table",
    "pareto_figure",
    "log_summary",
    "select_best",
    "register_best",
    "find_search_runs",
    "epochs_logged",
    "compare_baselines",
    "format_comparison",
    "leaderboard",
    "LEADERBOARD_FILE",
    "STATUS_TAG",
    "settle_run",
    "stop_reason",
    "SCORE_METRIC",
    "prescreen_summary",
    "format_prescreen",
]

STATUS_TAG = "mixersnn.trial_status"  # ok | failed | infeasible | screened | stopped | running | estimate
REASON_TAG = "mixersnn.reason"
SEARCH_TAG = "mixersnn.search"
BASELINE_TAG = "mixersnn.baseline"  # the label of a baseline run (tag mixersnn.kind=baseline)
#: A trial's zero-cost pre-screen score (``prescreen:``; :mod:`mixersnn.accounting.zero_cost`),
#: logged at step 0 before it trains.
SCORE_METRIC = "search.zero_cost_score"


@dataclass
class TrialRow:
    """One trial as MLflow recorded it.

    Attributes:
        run_id: the child run.
        trial_id: Tune's trial id.
        status: ok, failed, infeasible, screened (its zero-cost score was in the lowest
            ``prescreen.drop_fraction`` of the candidates scored before it: never trained),
            stopped (by ASHA or the time budget) or running.
        test_acc: last test accuracy (None if no epoch finished): the figure reported.
        energy_uj: measured energy per image (last epoch), or the estimate if it never trained.
        num_params: parameter count.
        epochs: epochs finished.
        reason: why it failed / was infeasible / was stopped.
        params: the sampled parameters (``search.*`` params of the run, prefix dropped).
        over_energy: measured energy exceeded the user's limit (never registered).
        kind: "trial" (proposed by the sampler) or "baseline" (a fixed reference model from
            the search file's ``baselines:``; never on the front, never registered).
        label: the baseline's label ("" for trials).
        zero_cost_score: the zero-cost pre-screen score (``search.zero_cost_score``), or None
            when the trial was not scored (no ``prescreen:``, a baseline, infeasible).
        val_acc: last accuracy on the training shards held out from it
            (``train.holdout_shards``), or None when nothing was held out.
    """

    run_id: str
    trial_id: str
    status: str
    test_acc: Optional[float]
    energy_uj: Optional[float]
    num_params: Optional[int]
    epochs: int
    reason: str = ""
    params: dict[str, str] = field(default_factory=dict)
    over_energy: bool = False
    kind: str = "trial"
    label: str = ""
    zero_cost_score: Optional[float] = None
    val_acc: Optional[float] = None

    @property
    def acc(self) -> Optional[float]:
        """The accuracy the search ranks, keeps and selects on: on the held-out training
        shards when the trial had them, else on the test split. Selecting on the test split
        makes the chosen trial's test figure the best of many noisy draws (optimistic);
        with held-out shards its test accuracy is an unbiased estimate."""
        return self.val_acc if self.val_acc is not None else self.test_acc

    @property
    def is_baseline(self) -> bool:
        return self.kind == "baseline"

    @property
    def name(self) -> str:
        """What tables call it: the trial id, or ``baseline:<label>``."""
        return f"baseline:{self.label}" if self.is_baseline else self.trial_id

    @property
    def scored(self) -> bool:
        """Trained and measured: eligible for the Pareto front."""
        return self.status in ("ok", "stopped") and self.acc is not None and self.energy_uj is not None

    def arch(self) -> str:
        p = self.params
        if self.is_baseline:
            # A baseline's overrides only (the rest is the registry variant's).
            over = " ".join(f"{k[len('arch.'):]}={v}" for k, v in sorted(p.items()) if k.startswith("arch."))
            return f"{p.get('model', '?')} " + (over or "(registry variant)")
        spe = p.get("arch.spe", "?")
        # A finalist of a per-stage widths space records its stage widths (a JSON list).
        width = f"w={p['arch.stage_dims']}" if p.get("arch.stage_dims") else f"C={p.get('arch.embed_dim', '?')}"
        return (f"{width} d={p.get('arch.depths', '?')} T={p.get('arch.T', '?')} "
                f"p={p.get('arch.patch_size', '?')} r={p.get('arch.mlp_ratio', '?')} spe={spe}")


def best_first(row: TrialRow) -> tuple[Any, ...]:
    """Sort key: the highest :attr:`TrialRow.acc` first, rows without one last, then trial id."""
    return (row.acc is None, -(row.acc or 0.0), row.trial_id)


def held_out(rows: Sequence[TrialRow]) -> bool:
    """Whether the trials were ranked on held-out shards (any row has a ``val_acc``)."""
    return any(r.val_acc is not None for r in rows)


def find_search_runs(uri: str, experiment: str, name: Optional[str] = None) -> list[Any]:
    """The parent runs of searches in ``experiment``, newest first: those named ``name``, or
    every search when name is None. Searches of one name at different storage paths each have
    their own parent run (``search.driver``), so a name can match several."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = "tags.`mixersnn.kind` = 'search'"
    if name:
        flt += f" and attributes.run_name = '{name}'"
    return list(client.search_runs([exp.experiment_id], filter_string=flt,
                                   order_by=["attributes.start_time DESC"], max_results=1000))


def collect_trials(uri: str, parent_run_id: str) -> list[TrialRow]:
    """Every child run of the search, in trial-id order."""
    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000)
    rows = []
    for r in runs:
        if r.data.tags.get("mixersnn.kind") == "supernet":
            continue  # a one-shot search's shared weights (search.oneshot), not a candidate
        m, t, p = r.data.metrics, r.data.tags, r.data.params
        status = t.get(STATUS_TAG, "running")
        # Measured energy; before training, the estimate (an estimate-only baseline: the
        # dense bound, every spike-layer input firing).
        energy = m.get("energy_per_image_uj", m.get("search.energy_uj_dense" if status == "estimate"
                                                    else "search.energy_uj_est"))
        n = m.get("num_params")
        trained = status not in ("infeasible", "screened")
        rows.append(TrialRow(
            run_id=r.info.run_id,
            trial_id=t.get("mixersnn.trial_id", r.info.run_name),
            status=status,
            test_acc=m.get("test_acc") if trained else None,
            energy_uj=energy,
            num_params=int(n) if n is not None else None,
            epochs=int(m.get("epochs_completed", 0)),
            reason=t.get(REASON_TAG, ""),
            params={k[len("search."):]: v for k, v in p.items() if k.startswith("search.")},
            over_energy=t.get("mixersnn.over_energy_limit") == "True",
            kind="baseline" if t.get("mixersnn.kind") == "baseline" else "trial",
            label=t.get(BASELINE_TAG, ""),
            zero_cost_score=m.get(SCORE_METRIC),
            val_acc=m.get("val_acc") if trained else None,
        ))
    return sorted(rows, key=lambda r: r.trial_id)


#: The MLflow run status that goes with each final trial status.
RUN_STATUS = {"ok": "FINISHED", "estimate": "FINISHED", "stopped": "KILLED", "infeasible": "KILLED",
              "screened": "KILLED", "failed": "FAILED"}


def settle_run(uri: str, run_id: str, status: str, reason: Optional[str] = None, *,
               epochs: Optional[int] = None, tags: Optional[dict[str, Any]] = None) -> str:
    """Record a trial run's outcome: the one place a run's status is decided.

    Sets ``mixersnn.trial_status`` to ``status`` (``ok``, ``stopped``, ``failed``,
    ``infeasible``, ``screened``, ``estimate``), the reason when given, ``epochs_completed``
    when given (the epochs its record holds, :func:`epochs_logged`, if more), extra ``tags``,
    and closes the MLflow run with the matching status (:data:`RUN_STATUS`). Safe to call again: a second settlement
    updates the count and the run's closing status.

    One rule spans the callers: a failure never overwrites a stop. A stopped trial can reach
    the trial function's error path after the stop was recorded (Ray Train's ``fit()`` sees
    the stop as an error; Tune reports the teardown as one), and a stop is not a failure.

    Returns:
        The status on record afterwards.

    Raises:
        ValueError: ``status`` is not one of :data:`RUN_STATUS`.
    """
    from trainers.tracking import MLflowTracker, end_run

    if status not in RUN_STATUS:
        raise ValueError(f"status={status!r} is not a final trial status; use one of {sorted(RUN_STATUS)}")
    tr = MLflowTracker(uri, run_id)
    if status == "failed" and tr.client.get_run(run_id).data.tags.get(STATUS_TAG) == "stopped":
        status = "stopped"
        reason = None
    new_tags: dict[str, Any] = {STATUS_TAG: status, **(tags or {})}
    if reason is not None:
        new_tags[REASON_TAG] = reason
    tr.set_tags(new_tags)
    if epochs is not None:
        tr.log_metrics({"epochs_completed": max(epochs, epochs_logged(uri, run_id))}, step=0)
    end_run(uri, run_id, RUN_STATUS[status])
    return status


def stop_reason(epochs: int, why: str = "successive halving or the search time budget") -> str:
    """The recorded reason of a trial stopped from outside after ``epochs`` epochs."""
    return f"stopped after {epochs} epoch(s) ({why})"


def epochs_logged(uri: str, run_id: str) -> int:
    """Epochs a run finished, from its record (``MLflowTracker.logged_epochs``): the last
    epoch logged + 1.

    The reliable count for a trial cut off from outside: Tune stops trials at the end of its
    time budget without telling callbacks, and a killed trial never reports its end.
    """
    from trainers.tracking import MLflowTracker

    return max(MLflowTracker(uri, run_id).logged_epochs(), default=-1) + 1


def _objectives(row: TrialRow, with_params: bool, *, test: bool = False) -> tuple[float, ...]:
    """Objectives as minimisation: (-accuracy, energy[, params]); the accuracy is the one
    the search selects on (:attr:`TrialRow.acc`), or with ``test`` the test split's."""
    v = (-float(row.test_acc if test else row.acc), float(row.energy_uj))
    return v + ((float(row.num_params or 0),) if with_params else ())


def pareto_front(rows: Sequence[TrialRow], *, with_params: bool = False) -> list[TrialRow]:
    """Non-dominated scored trials over (accuracy max, energy min[, parameters min]),
    sorted by energy. A trial is dominated when another is no worse in every objective and
    better in one. Baselines are references, not candidates: never on the front."""
    scored = [r for r in rows if r.scored and not r.is_baseline]
    front = []
    for a in scored:
        va = _objectives(a, with_params)
        dominated = False
        for b in scored:
            vb = _objectives(b, with_params)
            if b is not a and all(x <= y for x, y in zip(vb, va)) and any(x < y for x, y in zip(vb, va)):
                dominated = True
                break
        if not dominated:
            front.append(a)
    return sorted(front, key=lambda r: (r.energy_uj, -r.acc))


def compare_baselines(rows: Sequence[TrialRow], front: Sequence[TrialRow], *,
                      with_params: bool = False) -> list[dict[str, Any]]:
    """Each baseline against the search's Pareto front, on test accuracy and energy.

    The front is chosen on :attr:`TrialRow.acc` (held-out shards where the search has them),
    so the test figures compared here were not used to pick the points that beat a baseline.

    Returns one dict per baseline: ``label``, ``status``, ``test_acc``, ``energy_uj``,
    ``num_params``, ``dominated_by`` (how many front points dominate it) and ``by``: the
    dominating front point with the lowest energy (``{"trial_id", "run_id", "test_acc",
    "energy_uj", "num_params"}``), or None when no front point dominates it (or it has no
    score: it failed or was stopped before its first epoch).
    """
    out = []
    for b in (r for r in rows if r.is_baseline):
        d: dict[str, Any] = {"label": b.label, "run_id": b.run_id, "status": b.status, "test_acc": b.test_acc,
                             "energy_uj": b.energy_uj, "num_params": b.num_params, "dominated_by": 0, "by": None}
        if b.scored and b.test_acc is not None:
            vb = _objectives(b, with_params, test=True)
            dom = [f for f in front if f.test_acc is not None and dominates(_objectives(f, with_params, test=True), vb)]
            d["dominated_by"] = len(dom)
            if dom:
                f = min(dom, key=lambda r: (r.energy_uj, -r.test_acc))
                d["by"] = {"trial_id": f.trial_id, "run_id": f.run_id, "test_acc": f.test_acc,
                           "energy_uj": f.energy_uj, "num_params": f.num_params}
        out.append(d)
    return out


def format_comparison(comps: Sequence[dict[str, Any]]) -> str:
    """The baselines against the front, one line each: the baseline's accuracy and energy,
    then the cheapest front point that dominates it (side by side), or that none does."""
    if not comps:
        return ""
    lines = ["baselines vs the Pareto front (same data, same training config and per-trial budget; "
             "constraints not applied to baselines):"]
    for c in comps:
        if c["status"] == "estimate":
            n = c["num_params"]
            lines.append(f"  {c['label']:<22} not trained (estimate only): {n / 1e6:.2f}M params, "
                         f"{c['energy_uj']:.3f} uJ/img dense bound (every spike-layer input firing)")
            continue
        if c["test_acc"] is None or c["energy_uj"] is None:
            lines.append(f"  {c['label']:<22} no score ({c['status']})")
            continue
        head = f"  {c['label']:<22} acc {c['test_acc']:.4f} {c['energy_uj']:9.3f} uJ/img"
        by = c["by"]
        if by is None:
            lines.append(f"{head} | not dominated by any front point")
        else:
            ratio = c["energy_uj"] / by["energy_uj"] if by["energy_uj"] > 0 else float("inf")
            lines.append(f"{head} | dominated by trial {by['trial_id']}: acc {by['test_acc']:.4f} "
                         f"{by['energy_uj']:9.3f} uJ/img ({ratio:.3g}x less energy, "
                         f"{100 * (by['test_acc'] - c['test_acc']):+.2f} acc points; "
                         f"{c['dominated_by']} front point(s) dominate it)")
    return "\n".join(lines)


def prescreen_summary(rows: Sequence[TrialRow]) -> Optional[dict[str, Any]]:
    """How well the zero-cost pre-screen's score ranked this search's candidates.

    The rank correlation (:func:`mixersnn.accounting.zero_cost.rank_correlation`) of the score
    with the accuracy the search ranks on (:attr:`TrialRow.acc`) over the trials that trained and have both (:attr:`TrialRow.scored`:
    finished, or stopped by successive halving or the time budget with the accuracy they
    reached). Baselines are never scored. A singular kernel's score is recorded as the lowest
    float (MLflow stores no infinities) and so ranks last.

    Returns:
        None when no trial has a score (no ``prescreen:``), else ``{"kendall_tau",
        "spearman_rho", "kendall_p", "spearman_p"`` (None where undefined: fewer than 3 trained
        trials with a score, or all scores or accuracies equal), ``"n"`` (trials correlated),
        ``"scored"`` (candidates scored) and ``"screened"`` (candidates that never trained)}.
    """
    from mixersnn.accounting.zero_cost import rank_correlation

    cands = [r for r in rows if not r.is_baseline and r.zero_cost_score is not None]
    if not cands:
        return None
    trained = [r for r in cands if r.scored]
    corr = rank_correlation([r.zero_cost_score for r in trained], [r.acc for r in trained])
    out: dict[str, Any] = {k: (float(corr[k]) if math.isfinite(corr[k]) else None)
                           for k in ("kendall_tau", "spearman_rho", "kendall_p", "spearman_p")}
    out.update(n=int(corr["n"]), scored=len(cands),
               screened=sum(r.status == "screened" for r in rows if not r.is_baseline))
    return out


def format_prescreen(summary: Optional[dict[str, Any]]) -> str:
    """The pre-screen's line for the search's summary and ``mixersnn report`` ("" without a
    pre-screen): the score's rank correlation with trained accuracy, and what it screened out."""
    if summary is None:
        return ""

    def plural(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    out = f"{plural(summary['screened'], 'candidate')} screened out"
    if summary["kendall_tau"] is None:
        return (f"zero-cost pre-screen: no rank correlation yet ({plural(summary['n'], 'trained trial')} with a "
                f"score; it needs 3 with differing scores and accuracies); {out}")
    return (f"zero-cost pre-screen: Kendall tau {summary['kendall_tau']:.2f} (Spearman "
            f"{summary['spearman_rho']:.2f}) over {plural(summary['n'], 'trained trial')}; {out}")


def format_table(rows: Sequence[TrialRow], *, title: str = "", mark: Optional[set[str]] = None) -> str:
    """A fixed-width table: trial, status, accuracy (held-out shards' beside the test split's
    when the trials had them), energy, parameters, epochs, architecture. The first column marks
    rows in ``mark`` with ``*`` and baselines with ``B``."""
    mark = mark or set()
    val = held_out(rows)
    w = max([14, *(len(r.name) for r in rows)])  # baseline names run longer than trial ids
    head = (f"{'':1} {'trial':<{w}} {'status':<10} " + (f"{'val_acc':>8} " if val else "")
            + f"{'test_acc':>8} {'uJ/img':>8} {'params':>9} {'ep':>3}  architecture / reason")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in rows:
        acc = (f"{r.val_acc:>8.4f} " if r.val_acc is not None else f"{'-':>8} ") if val else ""
        acc += f"{r.test_acc:>8.4f}" if r.test_acc is not None else f"{'-':>8}"
        en = f"{r.energy_uj:.3f}" if r.energy_uj is not None else "-"
        n = f"{r.num_params:,}" if r.num_params is not None else "-"
        tail = r.arch() + (f"  [{r.reason}]" if r.reason else "")
        flag = "*" if r.run_id in mark else ("B" if r.is_baseline else " ")
        lines.append(f"{flag:1} {r.name:<{w}} {r.status:<10} {acc} {en:>8} {n:>9} {r.epochs:>3}  {tail}")
    return "\n".join(lines)


def rows_to_csv(rows: Sequence[TrialRow]) -> str:
    buf = io.StringIO()
    keys = ["trial_id", "run_id", "kind", "label", "status", "test_acc", "energy_uj", "num_params", "epochs", "reason",
            "over_energy", "zero_cost_score", "val_acc"]
    pkeys = sorted({k for r in rows for k in r.params})
    w = csv.writer(buf)
    w.writerow(keys + pkeys)
    for r in rows:
        d = asdict(r)
        w.writerow([d[k] for k in keys] + [r.params.get(k, "") for k in pkeys])
    return buf.getvalue()


def pareto_figure(rows: Sequence[TrialRow], front: Sequence[TrialRow], *, title: str,
                  baselines: Optional[Sequence[dict[str, Any]]] = None) -> Any:
    """Accuracy against energy per image (log scale): every scored trial, the front as a
    staircase, and the baselines among ``rows`` (or the given reference points,
    ``{"label", "test_acc", "energy_uj"}``) as labelled crosses."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    if baselines is None:
        baselines = [{"label": r.label, "test_acc": r.test_acc, "energy_uj": r.energy_uj}
                     for r in rows if r.is_baseline and r.scored]
    scored = [r for r in rows if r.scored and r not in front and not r.is_baseline]
    if scored:
        ax.scatter([r.energy_uj for r in scored], [r.test_acc for r in scored], c="0.65", s=22, label="trials")
    if front:
        xs, ys = [r.energy_uj for r in front], [r.test_acc for r in front]
        ax.step(xs, ys, where="post", c="C0", lw=1.2)
        chosen = " (chosen on held-out shards)" if held_out(front) else ""
        ax.scatter(xs, ys, c="C0", s=36, zorder=3, label="Pareto front" + chosen)
        for r in front:
            ax.annotate(r.trial_id.split("_")[-1], (r.energy_uj, r.test_acc), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    for i, b in enumerate(baselines):
        ax.scatter([b["energy_uj"]], [b["test_acc"]], marker="x", c="C3", s=50, zorder=4,
                   label="baselines" if i == 0 else None)
        ax.annotate(b["label"], (b["energy_uj"], b["test_acc"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if scored or front or baselines:
        ax.set_xscale("log")
    ax.set_xlabel("energy per image (uJ, measured, 45 nm)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.12)  # room for the labels of the outermost points
    if ax.get_legend_handles_labels()[0]:  # nothing scored yet (a search still running): no legend
        ax.legend(fontsize=8, loc="best")  # not over a point (a weak baseline sits bottom right)
    fig.tight_layout()
    return fig


def _optuna_study(rows: Sequence[TrialRow], directions: list[str]) -> Any:
    """An in-memory Optuna study rebuilt from the trials (for Optuna's plots)."""
    import optuna

    study = optuna.create_study(directions=directions)
    for r in rows:
        if not r.scored or r.is_baseline:
            continue
        params, dists = {}, {}
        for name, dist_json in json.loads(r.params.get("distributions", "{}")).items():
            raw = r.params.get(f"optuna.{name}")
            if raw is None:
                continue
            params[name] = json.loads(raw)  # the trial logs each sampled value as JSON
            dists[name] = optuna.distributions.json_to_distribution(dist_json)
        values = [r.acc, r.energy_uj][: len(directions)]
        if len(directions) == 3:
            values.append(float(r.num_params or 0))
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=values))
    return study


def optuna_figures(rows: Sequence[TrialRow], directions: list[str]) -> dict[str, Any]:
    """Optuna's optimisation history and parameter importances (on accuracy), as matplotlib
    figures; plots that cannot be drawn yet (e.g. fewer than 2 scored trials) are skipped."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _optuna_study(rows, directions)
    acc_name = "val_acc" if held_out(rows) else "test_acc"
    figs: dict[str, Any] = {}
    multi = len(directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        if len(study.trials) >= 1:
            try:
                figs["optuna_history.png"] = ovm.plot_optimization_history(study, target=target, target_name=acc_name).figure
            except Exception:
                pass
        if len(study.trials) >= 2:
            try:
                figs["optuna_param_importances.png"] = ovm.plot_param_importances(
                    study, target=target, target_name=acc_name).figure
            except Exception:
                pass
            if multi:
                try:
                    ax = ovm.plot_pareto_front(study, target_names=[acc_name, "energy_uj"] + (["params"] if len(directions) == 3 else []))
                    figs["optuna_pareto.png"] = ax.figure
                except Exception:
                    pass
    return figs


def select_best(rows: Sequence[TrialRow], criterion: str, max_energy_uj: Optional[float]) -> Optional[TrialRow]:
    """The trial to register: ``max_acc`` (subject to the measured-energy cap) or ``knee``
    (the front point nearest the ideal corner, accuracy and log-energy scaled to [0, 1]); on
    :attr:`TrialRow.acc`, so with held-out shards the test split plays no part in the choice."""
    ok = [r for r in rows if r.status == "ok" and r.scored and not r.over_energy and not r.is_baseline]
    if max_energy_uj is not None:
        ok = [r for r in ok if r.energy_uj <= max_energy_uj]
    if not ok:
        return None
    if criterion == "max_acc":
        return max(ok, key=lambda r: (r.acc, -r.energy_uj))
    front = pareto_front(ok)
    accs = [r.acc for r in front]
    logs = [math.log(max(r.energy_uj, 1e-12)) for r in front]
    a0, a1, e0, e1 = min(accs), max(accs), min(logs), max(logs)

    def dist(r: TrialRow) -> float:
        a = (r.acc - a0) / (a1 - a0) if a1 > a0 else 1.0
        e = (math.log(max(r.energy_uj, 1e-12)) - e0) / (e1 - e0) if e1 > e0 else 0.0
        return math.hypot(1 - a, e)

    return min(front, key=dist)


def register_best(uri: str, row: TrialRow, model_name: str, *, tmp: Optional[str] = None) -> str:
    """Register the trial's final model as ``model_name``: an MLflow 3 logged model with a
    signature, an input example, its spec, energy report and MFI check as metadata, and
    requirements that install (:func:`trainers.mlflow_model.log_registered_model`).

    Returns:
        The registered version (a string, e.g. "1").
    """
    from trainers.mlflow_model import log_registered_model

    tags = {"mixersnn.trial_id": row.trial_id}
    if row.test_acc is not None:
        tags["mixersnn.test_acc"] = f"{row.test_acc:.4f}"
    if row.val_acc is not None:
        tags["mixersnn.val_acc"] = f"{row.val_acc:.4f}"
    if row.energy_uj is not None:
        tags["mixersnn.energy_per_image_uj"] = f"{row.energy_uj:.4f}"
    return log_registered_model(uri, row.run_id, model_name, tags=tags, tmp=tmp)


#: The leaderboard on the parent run: an MLflow table (``log_table``), which the UI shows as
#: a table in the run's artefacts and can compare across runs.
LEADERBOARD_FILE = "search/leaderboard.json"


def leaderboard(rows: Sequence[TrialRow], front: Sequence[TrialRow]) -> dict[str, list[Any]]:
    """Every trial and baseline, best first (:attr:`TrialRow.acc`), as table columns: rank, trial,
    status, whether it is on the Pareto front, accuracy (the held-out shards' too, where the
    trials had them), energy, parameters, epochs, the
    architecture, the reason of a stop or failure, and the child run's id; with a zero-cost
    pre-screen, each row's score too (``zero_cost_score``, None where not scored)."""
    on_front = {r.run_id for r in front}
    ranked = sorted(rows, key=best_first)
    cols: dict[str, list[Any]] = {k: [] for k in ("rank", "trial", "status", "pareto", "test_acc",
                                                   "energy_per_image_uj", "num_params", "epochs", "architecture",
                                                   "reason", "run_id")}
    for i, r in enumerate(ranked, 1):
        for k, v in (("rank", i), ("trial", r.name), ("status", r.status), ("pareto", r.run_id in on_front),
                     ("test_acc", r.test_acc), ("energy_per_image_uj", r.energy_uj), ("num_params", r.num_params),
                     ("epochs", r.epochs), ("architecture", r.arch()), ("reason", r.reason), ("run_id", r.run_id)):
            cols[k].append(v)
    if held_out(rows):
        cols["val_acc"] = [r.val_acc for r in ranked]
    if any(r.zero_cost_score is not None for r in rows):
        cols["zero_cost_score"] = [r.zero_cost_score for r in ranked]
    return cols


def log_summary(uri: str, parent_run_id: str, rows: Sequence[TrialRow], front: Sequence[TrialRow], *,
                title: str, directions: list[str]) -> dict[str, Any]:
    """Log the trial table, the Pareto front (CSV + JSON + PNG) and Optuna's plots on the
    parent run; returns the summary metrics also logged there: trial counts by status, the
    front's size, the best accuracy and energy and, with a zero-cost pre-screen,
    ``prescreen_n``, ``prescreen_kendall_tau`` and ``prescreen_spearman_rho``
    (:func:`prescreen_summary`; the coefficients only where defined)."""
    import matplotlib.pyplot as plt

    from trainers.tracking import MLflowTracker

    tr = MLflowTracker(uri, parent_run_id)
    with tempfile.TemporaryDirectory() as d:
        for fname, rs in (("trials.csv", rows), ("pareto_front.csv", front)):
            p = Path(d) / fname
            p.write_text(rows_to_csv(rs))
            tr.log_artifact(str(p), "search")
    tr.log_dict([asdict(r) for r in front], "search/pareto_front.json")
    board = leaderboard(rows, front)
    if LEADERBOARD_FILE not in [f.path for f in tr.client.list_artifacts(parent_run_id, "search")]:
        import warnings

        with warnings.catch_warnings():
            # MLflow 3.17 looks for image columns with select_dtypes("object"), which pandas 3
            # warns about for string columns; harmless here (no images).
            warnings.filterwarnings("ignore", message=".*select_dtypes.*")
            tr.client.log_table(parent_run_id, board, LEADERBOARD_FILE)
    else:  # summarised again (a finished search resumed): replace it; log_table would append the rows
        import pandas as pd

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(LEADERBOARD_FILE).name
            pd.DataFrame(board).to_json(p, orient="split", index=False)  # log_table's own format
            tr.log_artifact(str(p), str(Path(LEADERBOARD_FILE).parent))
    fig = pareto_figure(rows, front, title=title)
    tr.log_figure(fig, "search/pareto_front.png")
    plt.close(fig)
    for fname, f in optuna_figures(rows, directions).items():
        tr.log_figure(f, f"search/{fname}")
        plt.close(f)
    comps = compare_baselines(rows, front, with_params=len(directions) == 3)
    if comps:
        tr.log_dict(comps, "search/baselines.json")
    trials = [r for r in rows if not r.is_baseline]
    counts: dict[str, float] = {}
    for r in trials:
        counts[f"trials_{r.status}"] = counts.get(f"trials_{r.status}", 0) + 1
    summary = {"trials_total": float(len(trials)), **counts, "pareto_size": float(len(front))}
    if comps:
        summary["baselines_total"] = float(len(comps))
        summary["baselines_dominated"] = float(sum(c["by"] is not None for c in comps))
    scored = [r for r in trials if r.scored]
    if scored:
        # The test figure of the trial ranked best, not the best test figure: with held-out
        # shards the test split never chose it.
        top = max(scored, key=lambda r: (r.acc, -r.energy_uj))
        if top.test_acc is not None:
            summary["best_test_acc"] = top.test_acc
        if top.val_acc is not None:
            summary["best_val_acc"] = top.val_acc
        summary["min_energy_per_image_uj"] = min(r.energy_uj for r in scored)
    pre = prescreen_summary(rows)
    if pre is not None:
        summary["prescreen_n"] = float(pre["n"])
        for k in ("kendall_tau", "spearman_rho"):
            if pre[k] is not None:
                summary[f"prescreen_{k}"] = pre[k]
    tr.log_metrics(summary, step=0)
    return summary
