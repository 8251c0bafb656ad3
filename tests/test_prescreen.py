"""The zero-cost pre-screen of the trial mode (``prescreen:``): the screening decision, the
``screened`` status through the record (MLflow, a real local store), and the rank correlation
of the score with trained accuracy in the search's summary and ``mixersnn report``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from search.trial import score_quantile, screen_decision
from search.tracking import STATUS_TAG, TrialRow


def _row(trial_id: str, status: str = "ok", acc=0.5, energy=1.0, score=None, kind="trial", reason=""):  # type: ignore[no-untyped-def]
    return TrialRow(run_id=f"run-{trial_id}", trial_id=trial_id, status=status, test_acc=acc, energy_uj=energy,
                    num_params=1000, epochs=1, reason=reason, kind=kind, label="ref" if kind == "baseline" else "",
                    zero_cost_score=score)


# ---------------------------------------------------------------------------- the decision
def test_below_warmup_never_screens() -> None:
    earlier = [10.0, 20.0, 30.0]
    assert not screen_decision(-1e9, earlier, 0.3, warmup=4)  # 3 earlier < warmup 4
    assert screen_decision(-1e9, [*earlier, 40.0], 0.3, warmup=4)  # 4 earlier: screening starts
    assert not screen_decision(-1e9, [], 0.3, warmup=0)  # nothing to compare with
    assert screen_decision(-1e9, [5.0], 0.3, warmup=0)


def test_exact_quantile_boundary_is_strict() -> None:
    earlier = [5.0, 1.0, 4.0, 2.0, 3.0]  # any order
    # 0.25 quantile of 1..5 is exactly 2 (position 1 of 0..4): 2 itself trains.
    assert score_quantile(earlier, 0.25) == 2.0
    assert screen_decision(1.999, earlier, 0.25, warmup=5)
    assert not screen_decision(2.0, earlier, 0.25, warmup=5)
    # 0.3: position 1.2, linear between 2 and 3.
    assert score_quantile(earlier, 0.3) == pytest.approx(2.2)
    assert screen_decision(2.19, earlier, 0.3, warmup=5)
    assert not screen_decision(2.2000001, earlier, 0.3, warmup=5)


def test_quantile_matches_numpy() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 30):
        v = rng.normal(size=n).tolist()
        for q in (0.0, 0.1, 0.3, 0.5, 0.99):
            assert score_quantile(v, q) == pytest.approx(float(np.quantile(v, q)))


def test_drop_fraction_zero_never_screens() -> None:
    earlier = [1.0, 2.0, 3.0, 4.0]
    assert not screen_decision(-math.inf, earlier, 0.0, warmup=0)
    assert not screen_decision(0.5, earlier, 0.0, warmup=4)


def test_singular_scores() -> None:
    """A singular kernel scores -inf in process and the lowest float on record: either is
    below any finite quantile, and interpolating from a recorded one stays finite."""
    low = -sys.float_info.max
    assert screen_decision(-math.inf, [1.0, 2.0, 3.0], 0.3, warmup=3)
    assert screen_decision(low, [1.0, 2.0, 3.0], 0.3, warmup=3)
    # Quantile between -inf and a finite value: -inf, which nothing is below.
    assert not screen_decision(-1e300, [-math.inf, -math.inf, 1.0, 2.0], 0.5, warmup=0)
    cut = score_quantile([low, 1.0, 2.0, 3.0], 0.3)
    assert math.isfinite(cut) and cut < -1e307


def test_bad_arguments_name_the_value_and_the_range() -> None:
    with pytest.raises(ValueError, match=r"drop_fraction=1\.0 must be in \[0, 1\)"):
        screen_decision(0.0, [1.0], 1.0, 0)
    with pytest.raises(ValueError, match="warmup=-1 must be an integer >= 0"):
        screen_decision(0.0, [1.0], 0.3, -1)
    with pytest.raises(ValueError, match="NaN"):
        screen_decision(math.nan, [1.0], 0.3, 0)
    with pytest.raises(ValueError, match="at least one score"):
        score_quantile([], 0.3)


# ---------------------------------------------------------------------------- the status
def test_screened_rows_are_never_scored_on_the_front_or_selected() -> None:
    from search.tracking import RUN_STATUS, format_table, leaderboard, pareto_front, select_best

    rows = [_row("a_00001", acc=0.6, energy=2.0, score=3.0),
            # Even with an accuracy on record, a screened trial is no candidate.
            _row("a_00002", status="screened", acc=0.9, energy=0.1, score=-5.0,
                 reason="screened out before training: zero-cost score -5 < 1"),
            _row("a_00003", status="screened", acc=None, energy=0.5, score=-6.0)]
    assert RUN_STATUS["screened"] == "KILLED"
    assert [r.scored for r in rows] == [True, False, False]
    assert [r.trial_id for r in pareto_front(rows)] == ["a_00001"]
    assert select_best(rows, "max_acc", None).trial_id == "a_00001"
    assert select_best(rows, "knee", None).trial_id == "a_00001"
    text = format_table(rows, title="t", mark={r.run_id for r in pareto_front(rows)})
    line = next(ln for ln in text.splitlines() if "a_00002" in ln)
    assert "screened" in line and "[screened out before training: zero-cost score -5 < 1]" in line
    assert not line.startswith("*")
    board = leaderboard(rows, pareto_front(rows))
    assert board["zero_cost_score"][board["trial"].index("a_00003")] == -6.0
    assert "zero_cost_score" not in leaderboard([_row("b_00001")], [])  # no pre-screen: columns as before


def test_prescreen_summary_and_its_line() -> None:
    from search.tracking import format_prescreen, prescreen_summary

    assert prescreen_summary([_row("a_00001"), _row("a_00002")]) is None  # nobody scored: no pre-screen
    assert format_prescreen(None) == ""
    rows = [_row("a_00001", acc=0.1, score=1.0), _row("a_00002", acc=0.2, score=2.0),
            _row("a_00003", acc=0.4, score=3.0), _row("a_00004", status="stopped", acc=0.3, score=4.0),
            _row("a_00005", status="screened", acc=None, score=-9.0),
            _row("a_00006", status="failed", acc=0.9, score=9.0),  # failed: not trained, not correlated
            _row("b_00001", kind="baseline", acc=0.95, score=None)]
    s = prescreen_summary(rows)
    # Concordant pairs 5, discordant 1 of 6: tau (5 - 1) / 6; Spearman 1 - 6 * 2 / (4 * 15).
    assert s["kendall_tau"] == pytest.approx(4 / 6) and s["spearman_rho"] == pytest.approx(0.8)
    assert (s["n"], s["scored"], s["screened"]) == (4, 6, 1)
    assert format_prescreen(s) == ("zero-cost pre-screen: Kendall tau 0.67 (Spearman 0.80) over 4 trained trials; "
                                   "1 candidate screened out")
    few = prescreen_summary(rows[:2] + rows[4:5])
    assert few["kendall_tau"] is None and few["n"] == 2
    assert format_prescreen(few).startswith("zero-cost pre-screen: no rank correlation yet (2 trained trials")
    json.dumps(few, allow_nan=False)  # None, not NaN: strict JSON


# ---------------------------------------------------------------------------- the record
def _search(tmp_path: Path, experiment: str = "exp-pre"):  # type: ignore[no-untyped-def]
    from search.config import load_search_config
    from trainers.tracking import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_search_config(None, name="pre", experiment=experiment, tracking_uri=uri,
                             storage_path=str(tmp_path / "runs"))
    parent = start_run(uri, cfg.experiment, cfg.name, tags={"mixersnn.kind": "search", "mixersnn.search": cfg.name})
    return cfg, uri, parent


def _child(uri: str, cfg, parent: str, trial_id: str, *, score=None, acc=None, status="ok", kind="trial"):  # type: ignore[no-untyped-def]
    from search.tracking import SCORE_METRIC, settle_run
    from trainers.tracking import MLflowTracker, start_run

    tags = {"mixersnn.kind": kind, "mixersnn.trial_id": trial_id, STATUS_TAG: "running"}
    if kind == "baseline":
        tags["mixersnn.baseline"] = "ref"
    rid = start_run(uri, cfg.experiment, f"trial-{trial_id}", parent_run_id=parent, tags=tags)
    tr = MLflowTracker(uri, rid)
    tr.log_metrics({"num_params": 1000, "search.energy_uj_est": 1.0}, step=0)
    if score is not None:
        tr.log_metrics({SCORE_METRIC: score}, step=0)
    if acc is not None:
        tr.log_metrics({"test_acc": acc, "energy_per_image_uj": 1.0 - acc}, step=0)
    if status != "running":
        reason = "screened out before training: test" if status == "screened" else None
        settle_run(uri, rid, status, reason, epochs=1 if acc is not None else None)
    return rid


def test_screened_status_through_mlflow_finalize_and_report(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A screened run is closed KILLED with its tag and reason, read back as screened without
    an accuracy; the summary logs the correlation on the parent run and prints its line, and
    ``mixersnn report`` prints it and gives it in --json."""
    from mlflow.tracking import MlflowClient

    from mixersnn.cli import main
    from search.driver import finalize
    from search.trial import earlier_scores

    cfg, uri, parent = _search(tmp_path)
    for i, (score, acc) in enumerate([(1.0, 0.1), (2.0, 0.2), (3.0, 0.4), (4.0, 0.3)], 1):
        _child(uri, cfg, parent, f"p_{i:05d}", score=score, acc=acc)
    scr = _child(uri, cfg, parent, "p_00005", score=-sys.float_info.max, status="screened")
    _child(uri, cfg, parent, "p_00006", score=100.0, acc=0.5, kind="baseline")  # never counted
    me = _child(uri, cfg, parent, "p_00007", score=0.5, status="running")

    assert sorted(earlier_scores(uri, parent, exclude_run_id=me)) == [-sys.float_info.max, 1.0, 2.0, 3.0, 4.0]
    run = MlflowClient(uri).get_run(scr)
    assert run.info.status == "KILLED" and run.data.tags[STATUS_TAG] == "screened"
    assert run.data.tags["mixersnn.reason"].startswith("screened out before training")
    from search.trial import record_failure

    record_failure(uri, me, RuntimeError("boom"))  # p_00007 failed later: scored, never trained

    lines: list[str] = []
    res = finalize(cfg, uri, parent, register=False, log=lines.append)
    rows = {r.trial_id: r for r in res.rows}
    assert rows["p_00005"].status == "screened" and rows["p_00005"].test_acc is None
    assert rows["p_00005"].zero_cost_score == -sys.float_info.max and rows["p_00001"].zero_cost_score == 1.0
    assert "p_00005" not in {r.trial_id for r in res.front}
    text = "\n".join(lines)
    assert ("zero-cost pre-screen: Kendall tau 0.67 (Spearman 0.80) over 4 trained trials; "
            "1 candidate screened out") in text
    assert any("p_00005" in ln and "screened" in ln for ln in text.splitlines())
    m = MlflowClient(uri).get_run(parent).data.metrics
    assert m["prescreen_kendall_tau"] == pytest.approx(4 / 6) and m["prescreen_spearman_rho"] == pytest.approx(0.8)
    assert m["prescreen_n"] == 4 and m["trials_screened"] == 1
    from search.cli import _result_json

    doc = json.loads(json.dumps(_result_json(res, cfg), default=str))  # what `search --json` prints
    assert doc["prescreen"]["n"] == 4 and doc["prescreen"]["screened"] == 1 and doc["oneshot"] is None

    capsys.readouterr()
    assert main(["report", cfg.experiment, "--tracking-uri", uri, "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "1 screened" in out.splitlines()[0]
    assert "zero-cost pre-screen: Kendall tau 0.67 (Spearman 0.80) over 4 trained trials" in out
    assert main(["report", cfg.experiment, "--tracking-uri", uri, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prescreen"]["kendall_tau"] == pytest.approx(4 / 6) and doc["prescreen"]["n"] == 4
    assert doc["prescreen"]["screened"] == 1
    trial = next(t for t in doc["trials"] if t["trial_id"] == "p_00005")
    assert trial["status"] == "screened" and trial["zero_cost_score"] == -sys.float_info.max and not trial["pareto"]


def test_report_without_prescreen_says_nothing_of_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from mixersnn.cli import main

    cfg, uri, parent = _search(tmp_path, "exp-plain")
    _child(uri, cfg, parent, "q_00001", acc=0.5)
    assert main(["report", cfg.experiment, "--tracking-uri", uri, "--out", str(tmp_path / "p.png")]) == 0
    assert "zero-cost" not in capsys.readouterr().out
    assert main(["report", cfg.experiment, "--tracking-uri", uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prescreen"] is None


def test_settle_run_names_the_allowed_statuses(tmp_path: Path) -> None:
    from search.tracking import settle_run

    cfg, uri, parent = _search(tmp_path, "exp-bad")
    rid = _child(uri, cfg, parent, "r_00001", status="running")
    with pytest.raises(ValueError, match=r"status='skipped' is not a final trial status; use one of .*'screened'"):
        settle_run(uri, rid, "skipped")


# ---------------------------------------------------------------------------- scoring a candidate
def test_prescreen_trial_scores_on_a_fixed_batch_and_decides(fmnist_shards: Path, tmp_path: Path) -> None:
    """The candidate is built as training builds it (the data's size, then its overrides),
    scored on the first training images (one batch, cached per process), the score logged
    at step 0; it is screened out only below the quantile of its siblings' scores."""
    from mlflow.tracking import MlflowClient

    from search.config import Prescreen
    from search.tracking import SCORE_METRIC
    from search.trial import candidate_model_config, prescreen_trial, scoring_batch
    from trainers.config import TrainConfig
    from trainers.tracking import MLflowTracker

    cfg, uri, parent = _search(tmp_path, "exp-score")
    tc = TrainConfig.from_dict({"model": "mlp_spe_t", "data": str(fmnist_shards),
                                "model_overrides": {"embed_dim": 6, "depths": [1, 1], "T": 2}})
    mc = candidate_model_config(tc)
    assert (mc.img_size, mc.in_chans, mc.num_classes, mc.embed_dim, tuple(mc.depths)) == (28, 1, 10, 6, (1, 1))
    batch = scoring_batch(str(fmnist_shards), img_size=28, batch_size=8)
    assert tuple(batch.shape) == (8, 1, 28, 28)
    assert scoring_batch(str(fmnist_shards), img_size=28, batch_size=8) is batch  # read once per process

    pre = Prescreen(enabled=True, drop_fraction=0.5, warmup=2, batch_size=8)
    # Warm-up: one sibling scored, warmup 2: trains whatever its score.
    _child(uri, cfg, parent, "s_00001", score=1e9, status="running")
    first = _child(uri, cfg, parent, "s_00002", status="running")
    assert prescreen_trial(MLflowTracker(uri, first), tc, pre, parent) is None
    score = MlflowClient(uri).get_run(first).data.metrics[SCORE_METRIC]
    assert math.isfinite(score)
    # Now 2 siblings (1e9 and the first's own score); far above it: screened, and why says so.
    _child(uri, cfg, parent, "s_00003", score=2e9, status="running")
    second = _child(uri, cfg, parent, "s_00004", status="running")
    why = prescreen_trial(MLflowTracker(uri, second), tc, pre, parent)
    assert why is not None and "zero-cost score" in why and "0.5 quantile of the 3 candidates" in why
    assert MlflowClient(uri).get_run(second).data.metrics[SCORE_METRIC] == pytest.approx(score)  # same batch, seeds


# ---------------------------------------------------------------------------- a whole search
PRESCREEN_SPACE = {"spe": False, "num_stages": 2, "blocks_per_stage": 1, "embed_dim": {"low": 6, "high": 24, "step": 6},
                   "mlp_ratio": [2, 3], "T": [1, 2], "patch_size": 7, "batch_size": 32, "lr": 0.005,
                   "weight_decay": 0.0, "label_smoothing": 0.0}
PRESCREEN_TRAIN = {"epochs": 1, "max_steps_per_epoch": 2, "max_eval_batches": 1, "eval_batch_size": 64,
                   "warmup_epochs": 0.0}


def _replay(cfg, n: int) -> list[bool]:  # type: ignore[no-untyped-def]
    """Which of the first ``n`` proposals of this config the pre-screen drops, replayed here:
    the sampler is seeded, its first ``startup_trials`` are random and Tune asks in trial
    order; one trial at a time, each candidate's earlier scores are those before it."""
    import optuna

    from mixersnn.accounting.zero_cost import score_config
    from search.space import Sampler, TrialSpec
    from search.trial import SCORE_REPEATS, SCORE_SEED, candidate_model_config, scoring_batch
    from trainers.config import TrainConfig

    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=n))
    scores, out = [], []
    for _ in range(n):
        spec = TrialSpec.from_dict(Sampler(cfg)(study.ask())["resolved"])
        assert not spec.infeasible, spec.infeasible  # no constraints: every proposal may train
        tc = TrainConfig.from_dict({**cfg.train, **spec.train, "model": spec.model or cfg.base_model, "data": cfg.data,
                                    "model_overrides": dict(spec.arch)})
        mc = candidate_model_config(tc)
        s = score_config(mc, scoring_batch(cfg.data, img_size=mc.img_size, batch_size=cfg.prescreen.batch_size),
                         seed=SCORE_SEED, repeats=SCORE_REPEATS)
        s = max(s, -sys.float_info.max)
        drop = screen_decision(s, scores, cfg.prescreen.drop_fraction, cfg.prescreen.warmup)
        scores.append(s)
        out.append(drop)
    return out


@pytest.mark.slow
def test_search_screens_low_scoring_candidates_end_to_end(fmnist_shards: Path, tmp_path: Path) -> None:
    """A search with ``prescreen:`` and one trial at a time: every candidate is scored, the
    ones below the quantile of those before them never train (closed KILLED, ``screened``,
    no epoch), the baseline is neither scored nor screened, and the summary gives the
    correlation on the parent run and in its printed line."""
    pytest.importorskip("ray")
    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from _helpers import start_local_ray
    from search.config import load_search_config
    from search.driver import run_search
    from search.tracking import SCORE_METRIC

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = 5
    for seed in range(50):
        d = {"name": "pre", "experiment": "exp-pre-e2e", "data": str(fmnist_shards), "tracking_uri": uri,
             "storage_path": str(tmp_path / "runs"), "seed": seed, "space": dict(PRESCREEN_SPACE),
             "train": dict(PRESCREEN_TRAIN), "scale": {"num_workers": 1, "cpus_per_worker": 0.9},
             "objective": {"mode": "multi", "sampler": "tpe", "startup_trials": n},
             "budget": {"num_trials": n, "max_concurrent_trials": 1},
             "baselines": [{"model": "mlp_spe_t", "label": "tiny-ref",
                            "model_overrides": {"embed_dim": 3, "depths": [1], "T": 1, "patch_size": 14,
                                                "mlp_ratio": 2, "spe": False}}],
             "prescreen": {"enabled": True, "drop_fraction": 0.5, "warmup": 2, "batch_size": 16}}
        (tmp_path / "search.yaml").write_text(yaml.safe_dump(d))
        cfg = load_search_config(tmp_path / "search.yaml")
        expected = _replay(cfg, n)
        if 1 <= sum(expected) <= 2:
            break
    else:
        pytest.fail("no seed screens one or two of five candidates")

    start_local_ray()
    try:
        lines: list[str] = []
        res = run_search(cfg, quiet=True, register=False, log=lines.append)
    finally:
        ray.shutdown()

    client = MlflowClient(uri)
    trials = [r for r in res.rows if not r.is_baseline]
    (base,) = [r for r in res.rows if r.is_baseline]
    assert base.zero_cost_score is None and base.status == "ok"
    assert len(trials) == n and all(r.zero_cost_score is not None for r in trials)
    # In trial order (one at a time; Tune's trial ids are not ordered): the replay's decisions.
    order = sorted(trials, key=lambda r: client.get_run(r.run_id).info.start_time)
    assert [r.status == "screened" for r in order] == expected
    for r in trials:
        run = client.get_run(r.run_id)
        if r.status == "screened":
            assert run.info.status == "KILLED" and r.test_acc is None and "test_acc" not in run.data.metrics
            assert r.reason.startswith("screened out before training: zero-cost score")
        else:
            assert r.status == "ok" and run.info.status == "FINISHED" and r.test_acc is not None
        assert len(client.get_metric_history(r.run_id, SCORE_METRIC)) == 1  # scored once
    assert all(r.status != "screened" for r in res.front)
    m = client.get_run(res.parent_run_id).data.metrics
    assert m["prescreen_n"] == n - sum(expected) and m["trials_screened"] == sum(expected)
    assert any(ln.startswith("zero-cost pre-screen: ") and f"{sum(expected)} candidate" in ln for ln in lines)


# ---------------------------------------------------------------------------- run_trial's entries
def _tune_stub(monkeypatch: pytest.MonkeyPatch, trial_id: str) -> list[dict]:
    """Tune's side of a trial function, outside Tune: its trial id, and the reports it gets."""
    pytest.importorskip("ray")
    import ray.tune

    reports: list[dict] = []

    class Context:
        def get_trial_id(self) -> str:
            return trial_id

    monkeypatch.setattr(ray.tune, "get_context", lambda: Context())
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **kw: reports.append(dict(metrics)))
    return reports


def _ctx(cfg, uri: str, parent: str, data: Path, **prescreen):  # type: ignore[no-untyped-def]
    from search.config import Prescreen
    from search.trial import SearchContext

    return SearchContext(tracking_uri=uri, experiment=cfg.experiment, parent_run_id=parent, search=cfg.name,
                         base_model="mlp_spe_t", data=str(data), train={"epochs": 1}, scale={"num_workers": 1},
                         train_storage=str(cfg.search_dir() / "train"),
                         prescreen=Prescreen(enabled=True, **{"drop_fraction": 0.5, "warmup": 1, "batch_size": 8,
                                                              **prescreen}))


TINY_ARCH = {"embed_dim": 6, "depths": [1, 1], "T": 1, "patch_size": 7, "mlp_ratio": 2, "spe": False}


def test_run_trial_screens_once_and_never_rescreens_a_reentered_run(fmnist_shards: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """First entry: scored, below its siblings, screened (reported infeasible and screened,
    never trained). The same run entered again (a resumed search): the same end, not scored
    again. A paused or promoted trial (its run has its proposal recorded) trains without being
    scored or screened, whatever its siblings scored since."""
    import search.trial as trial_mod
    from mlflow.tracking import MlflowClient

    from search.space import TrialSpec
    from search.tracking import SCORE_METRIC

    cfg, uri, parent = _search(tmp_path, "exp-entry")
    for i in (1, 2):
        _child(uri, cfg, parent, f"hi_{i:05d}", score=1e12, acc=0.5)
    ctx = _ctx(cfg, uri, parent, fmnist_shards)
    spec = TrialSpec(arch=dict(TINY_ARCH), train={"batch_size": 32}, num_params=1000, energy_uj_dense=2.0,
                     energy_uj_est=1.5)
    trained: list[str] = []
    monkeypatch.setattr(trial_mod, "_train_here", lambda c, tr, threads: trained.append(tr.run_id) or
                        {"test_acc": 0.6, "energy_per_image_uj": 1.0, "epoch": 0})

    reports = _tune_stub(monkeypatch, "low_00003")
    trial_mod.run_trial({"resolved": spec.to_dict()}, ctx)
    client = MlflowClient(uri)
    (rid,) = [r.info.run_id for r in client.search_runs([client.get_run(parent).info.experiment_id],
                                                        filter_string="attributes.run_name = 'trial-low_00003'")]
    run = client.get_run(rid)
    assert run.data.tags[STATUS_TAG] == "screened" and run.info.status == "KILLED" and not trained
    # The sentinel accuracy 0 under both names: whichever the search ranks on.
    assert reports == [{"test_acc": 0.0, "energy_per_image_uj": 1.5, "num_params": 1000.0, "infeasible": 1,
                        "search_final": 1, "screened": 1, "val_acc": 0.0}]
    # Entered again: the same report, no second score.
    trial_mod.run_trial({"resolved": spec.to_dict()}, ctx)
    assert reports[-1] == reports[0] and not trained
    assert len(client.get_metric_history(rid, SCORE_METRIC)) == 1

    # A trial paused at a rung (proposal recorded, no score: say, scored before this search had
    # a pre-screen) comes back: it trains, unscored, though every sibling outscores anything.
    reports = _tune_stub(monkeypatch, "paused_00004")
    paused = _child(uri, cfg, parent, "paused_00004", status="running")
    trial_mod.run_trial({"resolved": spec.to_dict()}, ctx)
    assert trained == [paused] and SCORE_METRIC not in client.get_run(paused).data.metrics
    assert client.get_run(paused).data.tags[STATUS_TAG] == "ok" and reports[-1]["test_acc"] == 0.6

    # A baseline is never scored nor screened.
    reports = _tune_stub(monkeypatch, "base_00000")
    base = TrialSpec(arch=dict(TINY_ARCH), train={"batch_size": 32}, num_params=1000, energy_uj_dense=2.0,
                     energy_uj_est=1.5, kind="baseline", label="ref", model="mlp_spe_t", run_name="pre-baseline-ref")
    trial_mod.run_trial({"resolved": base.to_dict()}, ctx)
    (brun,) = client.search_runs([client.get_run(parent).info.experiment_id],
                                 filter_string="attributes.run_name = 'pre-baseline-ref'")
    assert brun.data.tags[STATUS_TAG] == "ok" and SCORE_METRIC not in brun.data.metrics and len(trained) == 2


def test_a_screened_candidate_is_marked_in_the_optuna_study(tmp_path: Path) -> None:
    """Optuna's record (what optuna-dashboard shows) says a screened candidate never trained:
    the real OptunaSearch behind the search's searcher, on a study database."""
    import optuna

    from search.config import load_search_config
    from search.driver import SCREENED_NOTE, _searcher
    from search.space import TrialSpec
    from search.trial import screened_report

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = load_search_config(None, name="mark", storage_path=str(tmp_path / "runs"))
    searcher = _searcher(cfg, [], None, optuna.storages.RDBStorage(storage))
    first, second = searcher.suggest("t1"), searcher.suggest("t2")
    assert first is not None and second is not None
    searcher.on_trial_complete("t1", result=screened_report(TrialSpec.from_dict(first["resolved"])))
    searcher.on_trial_complete("t2", result={"test_acc": 0.8, "energy_per_image_uj": 0.5, "num_params": 1e5,
                                             "infeasible": 0, "search_final": 1})
    trials = {t.user_attrs["tune_trial_id"]: t for t in optuna.load_study(study_name="mark", storage=storage).trials}
    assert trials["t1"].user_attrs["screened"] == SCREENED_NOTE
    assert "screened" not in trials["t2"].user_attrs


def test_retraining_a_screened_candidate_says_it_never_trained(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from mixersnn.cli import main

    cfg, uri, parent = _search(tmp_path, "exp-retrain")
    rid = _child(uri, cfg, parent, "s_00001", score=0.1, status="screened")
    assert main(["train", "--from-run", rid, "--tracking-uri", uri, "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "cannot be retrained: it never trained (screened: screened out before training: test)" in err
