"""One name for one thing across the commands: time budgets, workers, data, --json,
--address, MLFLOW_EXPERIMENT_NAME; old spellings still work; `train --help` shows the
defaults; `mixersnn` imports only the command it runs. Parse-level: nothing trains."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mixersnn.cli import COMMANDS, build_parser, main


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser([argv[0]]).parse_args(list(argv))


def _help(command: str) -> str:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[command].format_help().split())


# ------------------------------------------------------------------------- lazy parser
def test_mixersnn_imports_only_the_command_it_parses() -> None:
    code = (
        "import sys\n"
        "from mixersnn.cli import build_parser\n"
        "def loaded(): return sorted({m.split('.')[0] for m in sys.modules} & {'trainers', 'search', 'ray', 'mlflow'})\n"
        "build_parser([]).format_help(); a = loaded()\n"
        "build_parser(['models']).parse_args(['models']); b = loaded()\n"
        "build_parser(['train']).parse_args(['train']); c = loaded()\n"
        "print(a, b, c, 'search.cli' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] [] ['trainers'] False", out


def test_every_command_is_listed_without_loading_it(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_commands_listed_help_is_its_modules(name: str) -> None:
    import importlib

    cmd = COMMANDS[name]
    mod = importlib.import_module("search.report" if name == "report" else cmd.module)
    assert " ".join(mod.HELP.split()) == " ".join(cmd.help.split())


# ------------------------------------------------------------------------- time budgets
def test_one_spelling_for_time_budgets() -> None:
    from trainers.cli import CLEAR, build_configs

    assert _parse("train", "--time-budget-s", "90").time_budget_s == 90.0
    assert _parse("train", "--time-budget-s", "none").time_budget_s is CLEAR
    train, _ = build_configs(_parse("train", "--time-budget-s", "90"))
    assert train.time_budget_s == 90.0
    assert _parse("search", "--time-budget-s", "600").time_budget_s == 600.0
    assert "--time-budget-s" in _help("train") and "--time-budget-s" in _help("search")


def test_the_old_time_budget_flag_still_works_and_says_so(capsys: pytest.CaptureFixture) -> None:
    args = _parse("train", "--time-budget", "none")
    assert "--time-budget-s" in capsys.readouterr().err
    from trainers.cli import CLEAR

    assert args.time_budget_s is CLEAR
    assert "--time-budget " not in _help("train") + " "  # hidden: only the new spelling is shown


def test_data_conversion_processes_are_not_workers(capsys: pytest.CaptureFixture) -> None:
    args = _parse("data", "make-shards", "src", "--out", "dst", "--processes", "3")
    assert args.workers == 3
    old = _parse("data", "make-shards", "src", "--out", "dst", "--workers", "2")
    assert old.workers == 2 and "--processes" in capsys.readouterr().err
    parser = build_parser(["data"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["data"]
    make = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices["make-shards"]
    text = make.format_help()
    assert "--processes" in text and "--workers" not in text
    assert "DDP" in _help("train")  # train's --workers are ranks, and says so


# ------------------------------------------------------------------------- --data, --json, --address
def test_data_says_it_is_a_root_with_train_and_test() -> None:
    for command in ("train", "search"):
        assert "train/ and test/" in _help(command), command


@pytest.mark.parametrize("argv", [["search", "--json"], ["report", "mixersnn-search", "--json"], ["train", "--json"],
                                  ["models", "--json"], ["energy", "--model", "mlp_spe_t", "--data", "x", "--json"]])
def test_json_everywhere(argv: list[str]) -> None:
    assert _parse(*argv).json is True


def test_train_takes_an_address_and_passes_it_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainers.cli as cli
    import trainers.ray_train as ray_train

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_fit(cfg: Any, scale: Any, **kw: Any) -> Any:
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(cli, "preflight", lambda cfg, *, track: None)
    monkeypatch.setattr(cli, "claim_run", lambda *a, **k: None)
    monkeypatch.setattr(ray_train, "fit", fake_fit)
    with pytest.raises(Stop):
        cli.run(_parse("train", "--address", "ray://head:10001", "--no-mlflow"))
    assert seen["ray_init_kwargs"] == {"address": "ray://head:10001"}
    assert _parse("search", "--address", "auto").address == "auto"


def test_address_and_no_ray_contradict(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--address", "auto", "--no-ray", "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "--address" in err and "--no-ray" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------- MLFLOW_EXPERIMENT_NAME
def test_train_honours_mlflow_experiment_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trainers.cli import build_configs

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert build_configs(_parse("train"))[0].experiment == "mixersnn"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert build_configs(_parse("train"))[0].experiment == "from-env"
    assert build_configs(_parse("train", "--experiment", "flag"))[0].experiment == "flag"
    named = tmp_path / "named.yaml"
    named.write_text("train: {experiment: from-yaml}\n")
    assert build_configs(_parse("train", "--config", str(named)))[0].experiment == "from-yaml"
    plain = tmp_path / "plain.yaml"
    plain.write_text("train: {epochs: 2}\n")
    assert build_configs(_parse("train", "--config", str(plain)))[0].experiment == "from-env"


def test_search_honours_mlflow_experiment_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from search.cli import experiment_from_env

    named = tmp_path / "named.yaml"
    named.write_text("experiment: from-yaml\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: s\n")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert experiment_from_env(None, str(plain)) is None
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert experiment_from_env(None, str(plain)) == "from-env"
    assert experiment_from_env(None, None) == "from-env"
    assert experiment_from_env(None, str(named)) is None  # the file's own
    assert experiment_from_env("flag", str(plain)) == "flag"


# ------------------------------------------------------------------------- help shows defaults
def test_train_help_shows_the_effective_defaults() -> None:
    from trainers.config import ScaleConfig, TrainConfig

    text = _help("train")
    for flag, value in (("--epochs", TrainConfig.epochs), ("--lr", TrainConfig.lr), ("--model", TrainConfig.model),
                        ("--batch-size", TrainConfig.batch_size), ("--workers", ScaleConfig.num_workers),
                        ("--cpus-per-worker", ScaleConfig.cpus_per_worker)):
        after = text.split(f"{flag} ", 2)[-1]
        assert f"default: {value}" in after.split(" --")[0], (flag, value)


# ------------------------------------------------------------------------- report --json
def test_report_json_prints_the_front(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import search.tracking as tracking
    import trainers.tracking as ttracking
    from search.report import run as run_report
    from search.tracking import TrialRow

    rows = [TrialRow("r1", "t1", "ok", 0.9, 0.5, 1000, 3, params={"arch.T": "2"}),
            TrialRow("r2", "t2", "ok", 0.8, 0.2, 500, 3),
            TrialRow("r3", "t3", "ok", 0.7, 0.6, 500, 3),
            TrialRow("b", "tb", "ok", 0.85, 0.7, 900, 3, kind="baseline", label="ref")]

    class Info:
        run_id, run_name, status, experiment_id = "parent", "demo", "FINISHED", "1"

    class Parent:
        info = Info()

        class data:
            tags = {"mixersnn.registered_model": "models:/demo-best/1"}
            params = {"budget": json.dumps({"num_trials": 4, "time_budget_s": 300.0})}

    monkeypatch.setattr(ttracking, "check_tracking_server", lambda uri: None)
    monkeypatch.setattr(tracking, "find_search_runs", lambda uri, exp, name: [Parent()])
    monkeypatch.setattr(tracking, "collect_trials", lambda uri, run_id: rows)
    import search.oneshot as oneshot

    monkeypatch.setattr(oneshot, "load_finalists", lambda uri, run_id: None)  # a trial-mode search
    args = _parse("report", "exp", "--search", "demo", "--tracking-uri", "http://127.0.0.1:1", "--json")
    assert run_report(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["search"] == "demo" and out["registered_model"] == "models:/demo-best/1"
    assert out["retrain_command"] == ("mixersnn train --from-model models:/demo-best/1 --epochs 40 --time-budget-s 300 "
                                      "--samples-per-epoch none --max-eval-batches none --tracking-uri "
                                      "http://127.0.0.1:1")
    assert sorted(r["run_id"] for r in out["front"]) == ["r1", "r2"]
    assert {r["run_id"]: r["pareto"] for r in out["trials"]} == {"r1": True, "r2": True, "r3": False, "b": False}
    assert out["baselines"][0]["label"] == "ref" and out["baselines"][0]["dominated_by"] == 1


def test_search_json_result_is_plain_json() -> None:
    from search.cli import _result_json
    from search.config import load_search_config
    from search.driver import SearchResult
    from search.tracking import TrialRow

    row = TrialRow("r1", "t1", "ok", 0.9, 0.5, 1000, 3)
    res = SearchResult(name="s", parent_run_id="p", tracking_uri="sqlite:///x.db", rows=[row], front=[row], best=row,
                       registered_version="1", wall_s=12.0)

    cfg = load_search_config(None, name="s", experiment="e", budget={"time_budget_s": 660},
                             select={"registered_model": "s-best"})
    out = json.loads(json.dumps(_result_json(res, cfg)))
    assert out["best"]["run_id"] == "r1" and out["front"][0]["pareto"] is True and out["registered_version"] == "1"
    assert out["prescreen"] is None and out["oneshot"] is None and out["baselines"] == []
    assert out["retrain_command"] == ("mixersnn train --from-model models:/s-best/1 --epochs 40 --time-budget-s 660 "
                                      "--samples-per-epoch none --max-eval-batches none")


def test_the_retrain_command_names_the_run_when_nothing_was_registered_and_lifts_the_budget_without_one() -> None:
    from search.cli import retrain_command
    from search.config import load_search_config
    from search.driver import SearchResult
    from search.tracking import TrialRow

    row = TrialRow("r1", "t1", "ok", 0.9, 0.5, 1000, 3)
    res = SearchResult(name="s", parent_run_id="p", tracking_uri="sqlite:///x.db", rows=[row], front=[row], best=row,
                       registered_version=None, wall_s=12.0)
    cfg = load_search_config(None, tracking_uri="http://127.0.0.1:5000")
    cmd = retrain_command(cfg, res)
    assert cmd.startswith("mixersnn train --from-run r1 --epochs 30 --time-budget-s none ")
    assert cmd.endswith("--tracking-uri http://127.0.0.1:5000")
    assert retrain_command(cfg, SearchResult("s", "p", "u", [], [], None, None, 0.0)) is None
    # A search on a Ray runtime of its own, trials in process: the retrain runs without Ray too;
    # on a cluster, or with Ray Train workers per trial, through Ray Train.
    assert retrain_command(cfg, res, local=True).endswith(" --no-ray")
    two = load_search_config(None, scale={"num_workers": 2, "cpus_per_worker": 0.5})
    assert "--no-ray" not in retrain_command(two, res, local=True)
