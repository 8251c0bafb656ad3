"""The search's Optuna study in a database (``objective.storage``): checked URLs, the study
recorded as trials are proposed and told, a resumed searcher that loads it (and closes the
trials a killed driver asked but Tune never saved), ``optuna-dashboard`` reading it live, and
a real search writing it. Real Optuna, sqlite files in tmp_path, real Ray for the search.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from mixersnn.models.config import ConfigError  # noqa: E402


def _cfg(tmp_path: Path, **objective):  # type: ignore[no-untyped-def]
    """A search over the default space (nothing trains here), its state in tmp_path."""
    from search.config import load_search_config

    return load_search_config(None, name="study", storage_path=str(tmp_path / "runs"),
                              objective={"mode": "multi", "sampler": "tpe", "startup_trials": 2, **objective})


@pytest.mark.parametrize("url, says", [
    ("not a url", "is not a database URL"),
    ("nosuchdb://host/x", "SQLAlchemy has no database 'nosuchdb'"),
    ("sqlite://", "in-memory database"),
    ("sqlite:///:memory:", "in-memory database"),
    ("sqlite:////no/such/folder/optuna.db", "folder /no/such/folder does not exist"),
    ("", "must be a database URL"),
])
def test_a_bad_storage_url_is_one_line_naming_it_and_the_fix(tmp_path: Path, url: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, storage=url)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"objective.storage={url!r}" in msg and says in msg
    assert "leave objective.storage out" in msg or "install" in msg


def test_the_default_study_database_sits_beside_the_tune_state_and_relative_sqlite_is_pinned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    assert cfg.objective.storage is None
    assert cfg.optuna_storage() == f"sqlite:///{(tmp_path / 'runs' / 'study' / 'optuna.db').resolve()}"
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, storage="sqlite:///studies.db")
    assert cfg.optuna_storage() == f"sqlite:///{(tmp_path / 'studies.db').resolve()}"
    assert cfg.to_dict()["objective"]["storage"] == "sqlite:///studies.db"


def _result(acc: float, energy: float) -> dict:
    return {"test_acc": acc, "energy_per_image_uj": energy, "epoch": 0}


def test_the_study_is_recorded_as_it_runs_and_a_resumed_searcher_loads_it(tmp_path: Path) -> None:
    """Trials asked and told land in the database at once (the dashboard reads them there);
    a searcher restored from Tune's snapshot continues the database's study: trials asked
    after the snapshot (a driver killed before Tune saved them) are closed as failed, and the
    next proposal continues the numbering."""
    from optuna.trial import TrialState

    from search.driver import _searcher, _study_storage

    cfg = _cfg(tmp_path)
    url = cfg.optuna_storage()
    searcher = _searcher(cfg, [], None, _study_storage(cfg))
    for i, tid in enumerate(["t0", "t1", "t2"]):
        assert searcher.suggest(tid) is not None
        searcher.on_trial_complete(tid, result=_result(0.5 + 0.1 * i, 1.0 + i))

    # Another process (the dashboard) sees them now, with Tune's trial ids.
    study = optuna.load_study(study_name="study", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert [t.values for t in study.trials] == [[0.5, 1.0], [0.6, 2.0], [pytest.approx(0.7), 3.0]]
    assert [t.user_attrs["tune_trial_id"] for t in study.trials] == ["t0", "t1", "t2"]

    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))
    searcher.suggest("t3")  # asked after Tune's last snapshot; then the driver dies
    assert optuna.load_study(study_name="study", storage=url).trials[3].state == TrialState.RUNNING
    del searcher

    fresh = _searcher(cfg, [], None, None)  # what Tune builds before restoring the snapshot
    fresh.restore(str(snapshot))
    trials = optuna.load_study(study_name="study", storage=url).trials
    assert trials[3].state == TrialState.FAIL
    study = optuna.load_study(study_name="study", storage=url)
    assert study.user_attrs["lost_trials"] == [3] and "never run" in study.user_attrs["lost_trials_reason"]
    assert fresh.suggest("t4") is not None
    fresh.on_trial_complete("t4", result=_result(0.8, 0.5))
    trials = optuna.load_study(study_name="study", storage=url).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert trials[4].state == TrialState.COMPLETE and trials[4].user_attrs["tune_trial_id"] == "t4"
    # The restored sampler models the whole history: the database's, not only the snapshot's.
    assert len(fresh.inner._ot_study.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_a_new_search_refuses_a_study_of_its_name_with_trials_and_drops_an_empty_one(tmp_path: Path) -> None:
    from search.driver import SearchExistsError, _searcher, _study_storage

    shared = tmp_path / "shared.db"
    cfg = _cfg(tmp_path, storage=f"sqlite:///{shared}")
    optuna.create_study(study_name="study", storage=f"sqlite:///{shared}")  # a start that died at once
    _searcher(cfg, [], None, _study_storage(cfg)).suggest("t0")
    with pytest.raises(SearchExistsError) as err:
        _study_storage(cfg)
    msg = str(err.value)
    assert "already holds an Optuna study named 'study' with 1 trial(s)" in msg
    assert f"optuna delete-study --study-name study --storage sqlite:///{shared}" in msg


@pytest.mark.slow
def test_optuna_dashboard_shows_the_study(tmp_path: Path) -> None:
    """The README's command: ``optuna-dashboard URL`` serves the study from the database."""
    from _helpers import free_port, stop_process
    from search.driver import _searcher, _study_storage

    exe = Path(sys.executable).with_name("optuna-dashboard")
    if not exe.exists():
        pytest.skip("optuna-dashboard is not installed (it is in the dev extra: pip install -e '.[dev]')")
    cfg = _cfg(tmp_path)
    searcher = _searcher(cfg, [], None, _study_storage(cfg))
    for i, tid in enumerate(["t0", "t1"]):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, result=_result(0.5 + 0.1 * i, 1.0 + i))
    port = free_port()
    proc = subprocess.Popen([str(exe), cfg.optuna_storage(), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.loads(r.read())["study_summaries"]
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("optuna-dashboard did not answer")
                time.sleep(0.3)
        (study,) = [s for s in studies if s["study_name"] == "study"]
        assert study["directions"] == ["maximize", "minimize"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=5) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == 2
    finally:
        stop_process(proc)
