"""The one-shot search: scoring subnets on a supernet, picking finalists, the whole search
through local Ray and a real MLflow store, and a supernet trained by DDP through Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixersnn.models import ConfigError, MixerSNNSupernet, SubnetSpec, SupernetSpace, model_config
from search.oneshot import Score, pick_finalists, score_fronts, score_subnets

SPACE = {"embed_dims": [6, 12], "depths": [[1], [1, 2]], "mlp_ratios": [2, 3], "Ts": [1, 2]}


def _score(acc: float, energy: float) -> Score:
    """A score whose subnet is unique to (acc, energy)."""
    return Score(spec={"embed_dim": 6, "depths": [1, 1], "mlp_ratio": acc, "T": energy}, acc=acc, energy_uj=energy,
                 num_params=1, firing_rate=0.1, seconds=1.0)


def test_nondominated_layers_sort_accuracy_up_and_energy_down() -> None:
    pts = [(0.9, 1.0), (0.8, 0.5), (0.85, 2.0), (0.7, 0.6), (0.95, 3.0)]
    layers = score_fronts([_score(acc, energy) for acc, energy in pts])
    assert sorted(layers[0]) == [0, 1, 4]
    assert sorted(layers[1]) == [2, 3]


def test_finalists_spread_along_the_front_and_fill_from_the_next_layer() -> None:
    front = [_score(0.70 + 0.02 * i, 0.1 * (i + 1)) for i in range(7)]  # all non-dominated
    picked = pick_finalists(front, 3)
    assert [round(s.energy_uj, 2) for s in picked] == [0.1, 0.4, 0.7]  # both ends and the middle
    dominated = [_score(0.5, 5.0 + i) for i in range(3)]
    picked = pick_finalists(front[:2] + dominated, 3)
    assert len(picked) == 3 and picked[2].acc == 0.5 and picked[2].energy_uj == 5.0
    assert len(pick_finalists(front[:1] * 4, 3)) == 1  # the same subnet counts once


def test_scores_are_held_out_accuracy_and_measured_energy(fmnist_shards: Path) -> None:
    base = model_config("mlp_spe_t", img_size=28, in_chans=1, num_classes=10)
    torch.manual_seed(0)
    net = MixerSNNSupernet(base, SupernetSpace.from_dict(SPACE))
    state = {"key": "test", "config": net.config.to_dict(), "space": SPACE, "model": net.state_dict()}
    specs = [SubnetSpec(6, (1, 1), 2.0, 1).to_dict(), SubnetSpec(12, (1, 2), 3.0, 2).to_dict()]
    kw = dict(data=str(fmnist_shards), holdout_shards=2, calib_images=128, eval_images=200)
    small, big = score_subnets(state, specs, **kw)
    for s in (small, big):
        assert 0.0 <= s.acc <= 1.0 and s.energy_uj > 0 and 0 < s.firing_rate < 1
    assert big.num_params > small.num_params and big.energy_uj > small.energy_uj
    # The score is what the extracted, recalibrated subnet does on the held-out shards.
    again = score_subnets(state, specs[:1], **kw)[0]
    assert again.acc == small.acc and again.energy_uj == pytest.approx(small.energy_uj)


# Per-stage widths (SupernetSpace.widths) in place of embed_dims; SPE: multiples of 3 after stage 1.
WSPACE = {"widths": [[6, 12], [12, 18, 24]], "depths": [[1], [1, 2]], "mlp_ratios": [2, 3], "Ts": [1, 2]}


@pytest.mark.parametrize("space", [SPACE, WSPACE], ids=["embed_dims", "widths"])
def test_optuna_proposals_round_trip_the_space(space: dict) -> None:
    import optuna

    from search.oneshot import _arch, _distributions, _spec_of, spec_overrides

    sp = SupernetSpace.from_dict(space)
    dists = _distributions(space)
    if "widths" in space:
        assert set(dists) == {"width0", "width1", "mlp_ratio", "T", "depth0", "depth1"}
        assert list(dists["width1"].choices) == [12, 18, 24]
    else:
        assert list(dists) == ["embed_dim", "mlp_ratio", "T", "depth0", "depth1"]  # as before widths existed
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        spec = _spec_of(study.ask(dists).params, sp.num_stages)
        sub = SubnetSpec.from_dict(spec)
        assert sp.contains(sub)
        # the proposal's dict is the scored spec's dict, so proposals deduplicate against scores
        assert json.dumps(sub.to_dict(), sort_keys=True) == json.dumps(spec, sort_keys=True)
        seen.add(sub)
        base = model_config("mlp_spe_t", img_size=28, in_chans=1, num_classes=10)
        assert model_config("mlp_spe_t", img_size=28, in_chans=1, num_classes=10, **spec_overrides(spec)) == \
            SupernetSpace._config(base, sub)  # finalists retrain exactly the scored subnet
    assert len(seen) > 10
    if "widths" in space:
        assert ("widths" in spec) and _arch(spec).startswith(f"w={spec['widths'][0]}-{spec['widths'][1]} ")
    else:
        assert "widths" not in spec and _arch(spec).startswith(f"C={spec['embed_dim']} ")


def test_scores_csv_round_trips_widths_and_keeps_its_old_columns() -> None:
    import csv
    import io

    from search.oneshot import _write_scores_csv, spec_of_row

    old = [Score(spec=SubnetSpec(6, (1, 2), 2.0, 1).to_dict(), acc=0.5, energy_uj=1.0, num_params=10,
                 firing_rate=0.1, seconds=1.0, number=0)]
    new = [Score(spec=SubnetSpec(6, (1, 2), 2.0, 1, widths=(6, 18)).to_dict(), acc=0.5, energy_uj=1.0,
                 num_params=10, firing_rate=0.1, seconds=1.0, number=0)]
    for scores, header in ((old, "number,embed_dim,depths,"), (new, "number,embed_dim,widths,depths,")):
        buf = io.StringIO()
        _write_scores_csv(buf, scores)
        assert buf.getvalue().startswith(header)
        rows = list(csv.DictReader(buf.getvalue().splitlines()))
        assert [spec_of_row(r) for r in rows] == [s.spec for s in scores]


def test_widths_space_scores_and_is_a_valid_oneshot_space(fmnist_shards: Path) -> None:
    from search.config import load_search_config

    base = model_config("mlp_spe_t", img_size=28, in_chans=1, num_classes=10)
    torch.manual_seed(0)
    net = MixerSNNSupernet(base, SupernetSpace.from_dict(WSPACE))
    state = {"key": "test-widths", "config": net.config.to_dict(), "space": WSPACE, "model": net.state_dict()}
    spec = SubnetSpec(12, (1, 2), 3.0, 1, widths=(12, 18))
    kw = dict(data=str(fmnist_shards), holdout_shards=2, calib_images=64, eval_images=100)
    s = score_subnets(state, [spec.to_dict()], **kw)[0]
    assert s.spec == spec.to_dict() and 0.0 <= s.acc <= 1.0 and s.energy_uj > 0
    assert s.num_params == net.subnet_config(spec).closed_form_num_params()
    cfg = load_search_config(None, mode="oneshot", oneshot={"space": WSPACE})
    assert SupernetSpace.from_dict(cfg.oneshot.space).size() == 2 * 3 * 2 * 2 * 2
    with pytest.raises(ConfigError, match=r"oneshot.space: widths\[1\] choice 20 .*multiple"):
        load_search_config(None, mode="oneshot", oneshot={"space": {**WSPACE, "widths": [[6], [20]]}})
    with pytest.raises(ConfigError, match=r"oneshot.space: .*both embed_dims"):
        load_search_config(None, mode="oneshot", oneshot={"space": {**WSPACE, "embed_dims": [6]}})
    # The demo file's commented per-stage example is a valid space in place of embed_dims.
    import yaml

    path = Path(__file__).parents[1] / "configs/search_oneshot_fashion_mnist.yaml"
    line = next(ln for ln in path.read_text().splitlines() if ln.strip().startswith("# widths:"))
    demo = load_search_config(path)
    space = {k: v for k, v in demo.oneshot.space.items() if k != "embed_dims"}
    space["widths"] = yaml.safe_load(line.strip()[1:])["widths"]
    assert load_search_config(path, oneshot={"space": space}).oneshot.space["widths"][1] == [24, 30, 36, 48]


def test_oneshot_config_errors_name_the_value_and_the_fix() -> None:
    from search.config import load_search_config

    with pytest.raises(ConfigError, match="mode='both'"):
        load_search_config(None, mode="both")
    with pytest.raises(ConfigError, match=r"oneshot.space: .*multiple of 3"):
        load_search_config(None, mode="oneshot", oneshot={"space": {**SPACE, "embed_dims": [8]}})
    with pytest.raises(ConfigError, match=r"oneshot.finalists=0 must be an integer >= 1"):
        load_search_config(None, mode="oneshot", oneshot={"space": SPACE, "finalists": 0})
    with pytest.raises(ConfigError, match=r"oneshot.train: \['supernet'\] are set by the search"):
        load_search_config(None, mode="oneshot", oneshot={"space": SPACE, "train": {"supernet": SPACE}})
    with pytest.raises(ConfigError, match=r"oneshot.train: .*epochs"):
        load_search_config(None, mode="oneshot", oneshot={"space": SPACE, "train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="unknown keys"):
        load_search_config(None, mode="oneshot", oneshot={"space": SPACE, "evals": 3})
    with pytest.raises(ConfigError, match=r"prescreen.enabled=true with mode: oneshot"):
        load_search_config(None, mode="oneshot", prescreen={"enabled": True})
    with pytest.raises(ConfigError, match=r"'space:' is the trial mode's"):
        load_search_config(None, mode="oneshot", space={"T": 2})
    # The one-shot mode samples no hyperparameters: the file fixes them under train:.
    assert load_search_config(None, mode="oneshot", train={"lr": 0.004}).train["lr"] == 0.004
    with pytest.raises(ConfigError, match=r"train: \['lr'\] are set by the search"):
        load_search_config(None, train={"lr": 0.004})
    # The shipped one-shot demo is valid.
    cfg = load_search_config(Path(__file__).parents[1] / "configs/search_oneshot_fashion_mnist.yaml")
    assert cfg.mode == "oneshot" and SupernetSpace.from_dict(cfg.oneshot.space).size() == 288


@pytest.mark.slow
def test_oneshot_search_end_to_end(fmnist_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Supernet, scoring as Ray tasks, finalists retrained through Ray Train, the summary and
    the registry; then --resume of the finished search trains nothing again."""
    import ray

    from _helpers import start_local_ray
    from search.config import load_search_config
    from search.oneshot import run_oneshot
    from search.tracking import collect_trials
    from trainers.tracking import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = {"epochs": 2, "max_steps_per_epoch": 6, "max_eval_batches": 1, "eval_batch_size": 128,
             "warmup_epochs": 0.0, "batch_size": 32, "lr": 5e-3}
    cfg = load_search_config(
        None, name="os", experiment="exp-os", data=str(fmnist_shards), tracking_uri=uri,
        storage_path=str(tmp_path / "runs"), mode="oneshot", scale={"num_workers": 1, "cpus_per_worker": 0.9},
        objective={"sampler": "nsga2", "population_size": 4},
        oneshot={"space": SPACE, "train": {}, "holdout_shards": 2, "calib_images": 64, "eval_images": 128,
                 "num_evals": 6, "parallel": 2, "cpus_per_eval": 0.5, "finalists": 2,
                 "finalist_train": {"epochs": 1}},
        train=train)
    start_local_ray()
    try:
        logs: list[str] = []
        res = run_oneshot(cfg, log=logs.append)
        client = mlflow_client(uri)
        parent = client.get_run(res.parent_run_id)
        m = parent.data.metrics
        assert m["oneshot_evals"] == 6 and m["oneshot_finalists"] == 2 and m["oneshot_eval_s_mean"] > 0
        rows = collect_trials(uri, res.parent_run_id)
        assert sorted(r.trial_id for r in rows) == ["finalist-0", "finalist-1"]  # the supernet run is not a trial
        assert all(r.status == "ok" and r.test_acc is not None and r.energy_uj > 0 for r in rows)
        # Finalists train without the shards the supernet never saw, and are chosen on them.
        assert all(r.val_acc is not None for r in rows)
        assert res.best is not None and res.registered_version == "1"
        assert res.best.val_acc == max(r.val_acc for r in rows)
        for r in rows:
            run = client.get_run(r.run_id)
            assert "search.predicted_acc" in run.data.metrics and run.data.tags["mixersnn.oneshot_finalist"] == "true"
            assert run.data.params["train.holdout_shards"] == "2"
        arts = {a.path for a in client.list_artifacts(res.parent_run_id, "search")}
        assert {"search/oneshot_scores.csv", "search/oneshot_front.png", "search/oneshot_finalists.json"} <= arts
        scores = client.download_artifacts(res.parent_run_id, "search/oneshot_scores.csv", str(tmp_path))
        assert len(Path(scores).read_text().strip().splitlines()) == 7
        state = json.loads((cfg.search_dir() / "oneshot.json").read_text())
        assert state["finalists_done"] == ["finalist-0", "finalist-1"]
        assert any("predicted vs real accuracy over 2 finalists" in line for line in logs)
        # mixersnn report shows predicted against real accuracy, as text and as JSON.
        from mixersnn.cli import build_parser
        from search.report import run as report

        capsys.readouterr()
        args = build_parser().parse_args(["report", "exp-os", "--search", "os", "--tracking-uri", uri,
                                          "--out", str(tmp_path / "front.png")])
        assert report(args) == 0
        assert "predicted vs real accuracy over 2 finalists" in capsys.readouterr().out
        args = build_parser().parse_args(["report", "exp-os", "--search", "os", "--tracking-uri", uri, "--json"])
        assert report(args) == 0
        got = json.loads(capsys.readouterr().out)["oneshot"]
        assert [p["trial_id"] for p in got["finalists"]] == ["finalist-0", "finalist-1"]
        assert all(0 <= p["predicted_acc"] <= 1 and 0 <= p["real_test_acc"] <= 1 for p in got["finalists"])
        # A finished search resumed: no phase runs again.
        logs.clear()
        res2 = run_oneshot(cfg, resume=True, log=logs.append)
        assert not any("training the supernet" in line or "stand-alone" in line for line in logs)
        assert sorted(r.trial_id for r in res2.rows) == ["finalist-0", "finalist-1"]
        from search.driver import SearchExistsError

        with pytest.raises(SearchExistsError, match="--resume"):
            run_oneshot(cfg)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_supernet_trains_with_ddp_through_ray_train(fmnist_shards: Path, tmp_path: Path) -> None:
    """Two Ray Train workers (gloo): the ranks stay identical (gradients averaged by the
    sandwich step itself, weights broadcast from rank 0 at the start)."""
    import ray

    from _helpers import start_local_ray, tiny_train_config
    from mixersnn.models import load_supernet
    from trainers.config import ScaleConfig
    from trainers.ray_train import fit

    cfg = tiny_train_config(fmnist_shards, model_overrides={"embed_dim": 12, "depths": (1, 2), "T": 2},
                            supernet=SPACE, epochs=1, max_steps_per_epoch=4, max_eval_batches=1,
                            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_model=False)
    start_local_ray()
    try:
        res = fit(cfg, ScaleConfig(num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path / "ray")))
    finally:
        ray.shutdown()
    assert res.metrics["replica_divergence"] == 0.0
    assert res.metrics["test_acc"] > 0
    net = load_supernet(res.checkpoint_path)
    assert net.space == SupernetSpace.from_dict(SPACE)
