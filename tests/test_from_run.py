"""Retrain and scale a trained model from MLflow: every training run records one typed spec
(``spec.json``), ``mixersnn train --from-run / --from-model`` rebuild the run from it, registered
models are MLflow 3 logged models, and ``energy`` / ``export`` take ``runs:/`` and ``models:/``.

A real MLflow sqlite store in a temporary folder (no mocks); the fast tests train with
``--no-ray``; the ones that start Ray or a search are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from mixersnn.cli import main

TINY = ["--embed-dim", "12", "--depths", "1,1", "--T", "1", "--max-steps-per-epoch", "2", "--max-eval-batches", "1",
        "--lr", "0.004", "--label-smoothing", "0.05"]


class Store:
    """A sqlite tracking store with one trained, registered run (``models:/tiny/1``)."""

    def __init__(self, root: Path, shards: Path) -> None:
        self.root, self.shards = root, shards
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.run_id = ""

    def train(self, *args: str) -> dict[str, Any]:
        """``mixersnn train --no-ray ... --json`` in the store's folder: the printed result."""
        import contextlib
        import io

        out = io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            with contextlib.redirect_stdout(out):
                rc = main(["train", "--no-ray", "--tracking-uri", self.uri, "--json", *args])
        finally:
            os.chdir(cwd)
        assert rc == 0, out.getvalue()
        return json.loads(out.getvalue().strip().splitlines()[-1])

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, fmnist_shards: Path) -> Iterator[Store]:
    s = Store(tmp_path_factory.mktemp("from-run"), fmnist_shards)
    res = s.train("--data", str(fmnist_shards), "--epochs", "1", *TINY, "--register", "tiny")
    assert res["registered_model"] == "models:/tiny/1"
    s.run_id = res["run_id"]
    yield s


def _err(capsys: Any) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_training_run_records_its_spec_as_an_artefact_and_a_tag(store: Store) -> None:
    from trainers.spec import SPEC_FILE, SPEC_TAG, RunSpec, read_run_spec

    client = store.client()
    run = client.get_run(store.run_id)
    assert run.data.tags["mixersnn.kind"] == "train"
    on_disk = json.loads(Path(client.download_artifacts(store.run_id, SPEC_FILE, str(store.root))).read_text())
    assert on_disk == json.loads(run.data.tags[SPEC_TAG])
    spec = read_run_spec(store.uri, store.run_id)
    assert isinstance(spec, RunSpec) and spec.to_dict() == on_disk
    mc = spec.model_config
    assert (mc.embed_dim, mc.depths, mc.T, mc.img_size, mc.in_chans, mc.num_classes) == (12, (1, 1), 1, 28, 1, 10)
    assert spec.train["lr"] == 0.004 and spec.train["label_smoothing"] == 0.05 and spec.train["epochs"] == 1
    assert Path(spec.train["data"]).is_absolute() and "tracking_uri" not in spec.train


def test_from_run_retrains_the_spec_with_flags_on_top_and_links_the_source(store: Store) -> None:
    from trainers.spec import read_run_spec

    res = store.train("--from-run", store.run_id, "--epochs", "2", "--seed", "3", "--max-eval-batches", "none")
    assert res["epoch"] == 1 and res["run_id"] != store.run_id and res["source"] == {"run_id": store.run_id}
    new = store.client().get_run(res["run_id"])
    assert new.data.tags["mixersnn.source_run"] == store.run_id and "mixersnn.source_model" not in new.data.tags
    old_spec, new_spec = read_run_spec(store.uri, store.run_id), read_run_spec(store.uri, res["run_id"])
    assert new_spec.model_config == old_spec.model_config
    assert {**old_spec.train, "epochs": 2, "seed": 3, "max_eval_batches": None} == new_spec.train
    assert res["test_samples"] == 256  # the whole eval split: the source's cap was lifted
    assert new_spec.source == {"run_id": store.run_id}


def test_a_retrain_keeps_the_held_out_shards_unless_told(store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    """A run that held out training shards (as search trials do) is retrained holding out
    the same ones, reporting val_acc and saying so; ``--holdout-shards 0`` trains on them."""
    from trainers.spec import read_run_spec

    held = store.train("--data", str(store.shards), "--epochs", "1", *TINY, "--holdout-shards", "2",
                       "--max-eval-batches", "none")
    assert held["val_samples"] == 2 * 128 and 0 <= held["val_acc"] <= 1
    capsys.readouterr()
    again = store.train("--from-run", held["run_id"], "--epochs", "1")
    assert "holding out 2 training shard(s) as the search did" in capsys.readouterr().err
    assert again["val_samples"] == 2 * 128 and read_run_spec(store.uri, again["run_id"]).train["holdout_shards"] == 2
    full = store.train("--from-run", held["run_id"], "--epochs", "1", "--holdout-shards", "0")
    assert not any(k.startswith("val_") for k in full)
    assert read_run_spec(store.uri, full["run_id"]).train["holdout_shards"] == 0


def test_a_recipe_yaml_that_changes_the_source_architecture_is_named(store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    """A recipe's YAML written for another architecture (``model_overrides``) replaces the
    source's values: allowed, but said before training and recorded in the new run's spec;
    a YAML that repeats the source's values, or sets none, says nothing."""
    from trainers.spec import read_run_spec

    recipe = store.root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"lr": 0.002, "model_overrides": {"depths": [2, 1], "embed_dim": 12}}}))
    capsys.readouterr()
    res = store.train("--from-run", store.run_id, "--config", str(recipe), "--epochs", "1")
    err = capsys.readouterr().err
    assert "model_overrides change the source's architecture: depths [1, 1] -> [2, 1];" in err
    assert "embed_dim" not in err.split("architecture:")[1].split(";")[0]  # 12 is the source's width
    spec = read_run_spec(store.uri, res["run_id"])
    assert spec.model_config.depths == (2, 1) and spec.train["lr"] == 0.002
    assert spec.source["config_model_overrides"] == {"depths": {"from": [1, 1], "to": [2, 1]}}
    recipe.write_text(yaml.safe_dump({"train": {"lr": 0.002, "model_overrides": {"depths": [1, 1]}}}))
    res = store.train("--from-run", store.run_id, "--config", str(recipe), "--epochs", "1", "--run-name", "same-arch")
    assert "change the source's architecture" not in capsys.readouterr().err
    assert "config_model_overrides" not in read_run_spec(store.uri, res["run_id"]).source


def test_from_model_with_scale_trains_the_family_member(store: Store) -> None:
    from trainers.spec import read_run_spec

    res = store.train("--from-model", "models:/tiny/1", "--scale", "width=2,depth=2", "--epochs", "1")
    tags = store.client().get_run(res["run_id"]).data.tags
    assert tags["mixersnn.source_run"] == store.run_id and tags["mixersnn.source_model"] == "models:/tiny/1"
    assert tags["mixersnn.scale"] == "width=2,depth=2"
    mc = read_run_spec(store.uri, res["run_id"]).model_config
    assert (mc.embed_dim, mc.depths, mc.T) == (24, (2, 2), 1)
    # runs:/ names the same source.
    res = store.train("--from-model", f"runs:/{store.run_id}", "--epochs", "1", "--run-name", "via-runs-uri")
    assert store.client().get_run(res["run_id"]).data.tags["mixersnn.source_run"] == store.run_id


def test_models_from_run_prints_the_source_and_its_scaled_member(store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["models", "--from-run", store.run_id, "--tracking-uri", store.uri, "--scale",
                 "width=2,img_size=32", "--json"]) == 0
    base, scaled = json.loads(capsys.readouterr().out)
    assert base["embed_dim"] == 12 and scaled["embed_dim"] == 24 and scaled["img_size"] == 32
    assert scaled["params"] > base["params"] and scaled["energy_uj_dense"] > base["energy_uj_dense"]


def test_the_registered_model_is_a_logged_model_that_installs(store: Store, tmp_path: Path) -> None:
    import mlflow

    from trainers.mlflow_model import PIP_REQUIREMENTS

    mv = store.client().get_model_version("tiny", "1")
    assert mv.run_id == store.run_id and mv.tags["mixersnn.source_run"] == store.run_id
    assert mv.tags["mixersnn.mfi_ok"] == "True" and "mixersnn.test_acc" in mv.tags
    mlflow.set_tracking_uri(store.uri)
    info = mlflow.models.get_model_info("models:/tiny/1")
    sig = info.signature.to_dict()
    assert json.loads(sig["inputs"])[0]["tensor-spec"]["shape"] == [-1, 1, 28, 28]
    assert json.loads(sig["outputs"])[0]["tensor-spec"]["shape"] == [1, -1, 10]
    meta = info.metadata
    assert meta["spec"]["model_config"]["embed_dim"] == 12 and meta["mfi_ok"] is True
    assert meta["energy"]["energy_per_image_uj"] > 0 and meta["energy"]["dense_bound_uj_per_image"] > 0
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny/1", dst_path=str(tmp_path)))
    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r).specifier for r in (local / "requirements.txt").read_text().split()}
    assert "mixersnn" not in reqs and {Requirement(r).name for r in PIP_REQUIREMENTS} <= set(reqs)
    assert reqs["torch"].contains("2.13.0") and not reqs["torch"].contains("3.0")
    assert (local / "code" / "mixersnn" / "models" / "mixer_snn.py").is_file()
    assert (local / "input_example.json").is_file()
    assert {p.name for p in (local / "extra_files").iterdir()} == {"model.pt", "spec.json", "energy.json",
                                                                 "mfi_report.json"}


def test_registering_leaves_the_callers_mlflow_uris_alone(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from trainers.mlflow_model import log_registered_model

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(k, raising=False)
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    before = mlflow.get_tracking_uri()
    log_registered_model(store.uri, store.run_id, "tiny-again")
    assert store.client().get_model_version("tiny-again", "1").run_id == store.run_id
    assert mlflow.get_tracking_uri() == before != store.uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_energy_and_export_take_runs_and_models_uris(store: Store, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = str(store.shards / "test")
    for uri in (f"runs:/{store.run_id}", "models:/tiny/1", "models:/tiny/latest"):
        assert main(["energy", "--model", uri, "--data", data, "--batches", "1", "--json",
                     "--tracking-uri", store.uri]) == 0
        assert json.loads(capsys.readouterr().out)["T"] == 1
    out = tmp_path / "m.safetensors"
    assert main(["export", "--mfi", "models:/tiny/1", str(out), "--tracking-uri", store.uri]) == 0
    assert out.stat().st_size > 0
    assert main(["export", "--mfi", f"runs:/{store.run_id}/model/model.pt", str(out), "--force",
                 "--tracking-uri", store.uri]) == 0


@pytest.mark.parametrize("argv, needles", [
    (["--from-run", "0123456789abcdef0123456789abcdef"], ["does not exist on the tracking server", "--tracking-uri"]),
    (["--from-model", "models:/no-such-model/1"], ["no registered model 'no-such-model'", "registered models there: tiny"]),
    (["--from-model", "models:/tiny/9"], ["has no version 9 (versions: 1)", "use models:/tiny/1"]),
    (["--from-model", "models:/tiny@champion"], ["has no alias 'champion'"]),
    (["--from-model", "models:/tiny"], ["is not of the form models:/NAME/VERSION"]),
    (["--from-run", "RUN", "--scale", "width=2,height=3"], ["unknown key(s) ['height']"]),
])
def test_a_bad_source_is_one_line_and_exit_2_before_ray(store: Store, argv: list[str], needles: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    import ray

    argv = [store.run_id if a == "RUN" else a for a in argv]
    assert main(["train", "--tracking-uri", store.uri, *argv]) == 2
    err = _err(capsys)
    assert all(n in err for n in needles), err
    assert not ray.is_initialized()


def test_a_run_from_another_server_or_without_a_spec_is_refused_with_the_fix(store: Store, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # Another store: the run id is not there.
    other = tmp_path / "other.db"
    assert main(["train", "--tracking-uri", f"sqlite:///{other}", "--from-run", store.run_id]) == 2
    err = _err(capsys)
    assert f"run {store.run_id!r}: there is no MLflow store at {other}" in err and "--tracking-uri" in err
    assert not other.exists()  # nothing created
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{other}").search_experiments()  # an empty store: the run is not there
    capsys.readouterr()
    assert main(["train", "--tracking-uri", f"sqlite:///{other}", "--from-run", store.run_id]) == 2
    err = _err(capsys)
    assert f"run {store.run_id!r} does not exist on the tracking server sqlite:///{other}" in err
    assert "made on another server" in err
    # An older run: params, no spec; the fix names the flags its params suggest.
    client = store.client()
    exp = client.get_experiment_by_name("mixersnn").experiment_id
    old = client.create_run(exp, run_name="old", tags={"mixersnn.kind": "train"}).info.run_id
    for k, v in {"train.model": "mlp_spe_t", "model.embed_dim": "24", "model.depths": "[1, 2]", "model.T": "2"}.items():
        client.log_param(old, k, v)
    assert main(["train", "--tracking-uri", store.uri, "--from-run", old]) == 2
    err = _err(capsys)
    assert "has no spec.json (made before mixersnn recorded run specs" in err
    assert "mixersnn train --model mlp_spe_t --embed-dim 24 --T 2 --depths 1,2" in err
    # A search's parent run, and a run that is not mixersnn's.
    parent = client.create_run(exp, run_name="a-search", tags={"mixersnn.kind": "search"}).info.run_id
    assert main(["train", "--tracking-uri", store.uri, "--from-run", parent]) == 2
    assert "is a search's parent run, not a training run" in _err(capsys)
    other_run = client.create_run(exp, run_name="foreign").info.run_id
    assert main(["train", "--tracking-uri", store.uri, "--from-run", other_run]) == 2
    assert "is not a mixersnn training run or search trial" in _err(capsys)
    # A spec that no longer validates (hand-edited, or another version's).
    bad = client.create_run(exp, run_name="bad", tags={"mixersnn.kind": "train"}).info.run_id
    spec = json.loads(client.get_run(store.run_id).data.tags["mixersnn.spec"])
    spec["model_config"]["embed_dim"] = 13
    client.set_tag(bad, "mixersnn.spec", json.dumps(spec))
    assert main(["train", "--tracking-uri", store.uri, "--from-run", bad]) == 2
    err = _err(capsys)
    assert "the spec of run" in err and "cannot be rebuilt" in err and "embed_dim=13" in err


def test_energy_with_a_missing_model_uri_is_one_line(store: Store, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["energy", "--model", "models:/tiny/4", "--data", "fashion-mnist", "--tracking-uri", store.uri]) == 2
    assert "has no version 4" in _err(capsys)
    assert main(["export", "--mfi", "runs:/nope", "x.safetensors", "--tracking-uri", store.uri]) == 2
    assert "run 'nope' does not exist" in _err(capsys)


def test_register_needs_mlflow(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["train", "--no-mlflow", "--register", "x"]) == 2
    assert "--register x needs MLflow" in _err(capsys)


@pytest.mark.slow
def test_the_registered_model_loads_and_predicts_without_mixersnn_installed(store: Store, tmp_path: Path) -> None:
    """What `mlflow models serve` does: the model's own code (code_paths) and requirements,
    with the installed mixersnn hidden from the interpreter."""
    script = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', '.', {str(Path(__file__).resolve().parents[1])!r})]\n"
        "try:\n    import mixersnn\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('mixersnn importable')\n"
        "import mlflow.pyfunc, numpy as np\n"
        f"m = mlflow.pyfunc.load_model('models:/tiny/1')\n"
        "y = m.predict(np.zeros((3, 1, 28, 28), dtype=np.float32))\n"
        "print(tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_URI": store.uri})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(1, 3, 10)"


@pytest.mark.slow
def test_ray_train_from_run_logs_into_the_run_it_opened(store: Store, tmp_path: Path) -> None:
    """The Ray Train path: the run opened with the spec and source tags before Ray starts is
    the one the workers log into (one run of that name)."""
    import ray

    try:
        cwd = os.getcwd()
        os.chdir(store.root)
        try:
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = main(["train", "--from-run", store.run_id, "--tracking-uri", store.uri, "--epochs", "1",
                           "--workers", "1", "--cpus-per-worker", "1", "--storage-path", str(tmp_path / "ray"),
                           "--run-name", "ray-retrain", "--json"])
        finally:
            os.chdir(cwd)
        assert rc == 0
        res = json.loads(buf.getvalue().strip().splitlines()[-1])
    finally:
        ray.shutdown()
    client = store.client()
    runs = client.search_runs([client.get_experiment_by_name("mixersnn").experiment_id],
                              filter_string="attributes.run_name = 'ray-retrain'")
    assert len(runs) == 1 and runs[0].info.run_id == res["run_id"] and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["mixersnn.source_run"] == store.run_id and "test_acc" in runs[0].data.metrics


@pytest.mark.slow
def test_a_search_trial_records_its_spec_and_its_registered_best_retrains(fmnist_shards: Path, tmp_path: Path) -> None:
    """A two-trial search: each trained trial carries its spec; `train --from-model` on the
    registered best rebuilds exactly the trial's architecture and hyperparameters."""
    import ray
    from _helpers import start_local_ray
    from mlflow.tracking import MlflowClient

    from search.config import load_search_config
    from search.driver import run_search
    from trainers.spec import read_run_spec

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    d = {"name": "fr", "experiment": "exp-fr", "data": str(fmnist_shards), "tracking_uri": uri,
         "storage_path": str(tmp_path / "runs"), "seed": 0,
         "space": {"spe": True, "num_stages": 2, "blocks_per_stage": 1, "embed_dim": [6, 12], "mlp_ratio": 3,
                   "T": 1, "patch_size": 7, "batch_size": 32, "lr": [0.003, 0.005], "weight_decay": 0.01,
                   "label_smoothing": 0.0},
         "train": {"epochs": 1, "max_steps_per_epoch": 2, "max_eval_batches": 1, "eval_batch_size": 64,
                   "warmup_epochs": 0.0},
         "scale": {"num_workers": 1, "cpus_per_worker": 0.9},
         "objective": {"mode": "multi", "sampler": "tpe", "startup_trials": 2},
         "budget": {"num_trials": 2, "max_concurrent_trials": 1},
         # The last step: the selected trial at twice the width, and a size its patch (7) refuses.
         "select": {"criterion": "max_acc", "scale_family": ["width=2", {"img_size": 30}]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    cfg = load_search_config(tmp_path / "s.yaml")
    start_local_ray()
    lines: list[str] = []
    try:
        res = run_search(cfg, quiet=True, log=lines.append)
    finally:
        ray.shutdown()
    best = res.best
    text = "\n".join(lines)
    assert "skipped: select.scale_family[1]: img_size=30 is not a multiple of the model's patch_size=7" in text
    client = MlflowClient(uri)
    (member,) = client.search_runs([client.get_experiment_by_name("exp-fr").experiment_id],
                                   filter_string="tags.`mixersnn.family_of` != ''")
    assert member.info.run_name == "fr-family-width=2" and member.info.status == "FINISHED"
    assert member.data.tags["mixersnn.source_run"] == best.run_id and member.data.tags["mixersnn.scale"] == "width=2"
    assert "test_acc" in member.data.metrics
    family = read_run_spec(uri, member.info.run_id)
    assert family.model_config.embed_dim == 2 * int(best.params["arch.embed_dim"])
    assert len(res.rows) == 2  # not a trial: the search's table is unchanged
    spec = read_run_spec(uri, best.run_id)
    assert spec.kind == "trial" and spec.model_config.patch_size == 7 and spec.model_config.depths == (1, 1)
    assert str(spec.model_config.embed_dim) == best.params["arch.embed_dim"]
    assert spec.train["lr"] == float(best.params["hp.lr"]) and spec.train["max_steps_per_epoch"] == 2
    store = Store(tmp_path, fmnist_shards)
    store.uri = uri
    out = store.train("--from-model", "models:/fr-best/1", "--epochs", "2")
    new = read_run_spec(uri, out["run_id"])
    assert new.model_config == spec.model_config and {**spec.train, "epochs": 2} == new.train
    assert new.source == {"run_id": best.run_id, "model_uri": "models:/fr-best/1"}


@pytest.mark.slow
def test_from_model_energy_and_bad_names_against_a_tracking_server(mlflow_server: str, fmnist_shards: Path,
                                                                  tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The same through `mlflow server` (artefacts proxied): register, measure by models:/ URI,
    retrain from it, and the one-line refusals of a name and a run the server does not have."""
    s = Store(tmp_path, fmnist_shards)
    s.uri = mlflow_server
    exp = ["--experiment", "from-run-server"]
    first = s.train("--data", str(fmnist_shards), "--epochs", "1", *TINY, *exp, "--register", "tiny-server")
    version = first["registered_model"].rsplit("/", 1)[1]
    assert main(["energy", "--model", f"models:/tiny-server/{version}", "--data", str(fmnist_shards / "test"),
                 "--batches", "1", "--json", "--tracking-uri", mlflow_server]) == 0
    assert json.loads(capsys.readouterr().out)["T"] == 1
    res = s.train("--from-model", f"models:/tiny-server/{version}", "--scale", "width=0.5", *exp)
    tags = s.client().get_run(res["run_id"]).data.tags
    assert tags["mixersnn.source_run"] == first["run_id"] and tags["mixersnn.scale"] == "width=0.5"
    capsys.readouterr()
    assert main(["train", "--tracking-uri", mlflow_server, "--from-model", "models:/not-there/1"]) == 2
    assert "no registered model 'not-there' on the tracking server" in _err(capsys)
    assert main(["train", "--tracking-uri", mlflow_server, "--from-run", "ffffffffffffffffffffffffffffffff"]) == 2
    assert f"does not exist on the tracking server {mlflow_server}" in _err(capsys)
