"""Ray Train end to end: multi-node DDP, and fault tolerance logged to a real MLflow server.

Each test starts its own Ray runtime (or simulated cluster) and gives Ray Train its own
storage path: a run with a reused name and path silently resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mixersnn.models import load_model
from trainers.config import ScaleConfig, TrainConfig

from _helpers import WORKER_ENV, free_port, tiny_train_config

ray = pytest.importorskip("ray")

# Ray runtimes and clusters: the fast subset (-m 'not slow') leaves these out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST slices: 512 train / 256 test images, 4 + 2 shards."""
    from conftest import make_fmnist_shards

    return make_fmnist_shards(tmp_path_factory.mktemp("fmnist-ray"), train=512, test=256, per_shard=128)


def _cfg(data: Path, tmp: Path, **kw) -> TrainConfig:
    return tiny_train_config(data, **{"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test", **kw})


def test_two_workers_on_two_nodes_stay_identical_and_a_killed_one_resumes_logged_to_mlflow_server(
    shards: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """DDP across two nodes, one worker each, and a worker SIGKILLed mid-run: the group
    restarts from the last checkpoint on both nodes, the replicas stay identical after every
    step, and the one run on a real MLflow server holds every epoch once, the parameters and
    the final model. (One test for both: each Ray Train fit costs this 2-core CI about 20 s of
    actor start-up before it trains anything.)"""
    import json

    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from trainers.ray_train import fit

    marker = tmp_path / "killed"
    # The hook reads the environment of the worker process: set it for the job's workers.
    env = {**WORKER_ENV, "MIXERSNN_TEST_KILL_AT_EPOCH": "2", "MIXERSNN_TEST_KILL_MARKER": str(marker)}
    os.environ.update(WORKER_ENV)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                           "dashboard_host": "127.0.0.1",
                                                           "dashboard_port": free_port()})
    cluster.add_node(num_cpus=1)
    cfg = _cfg(shards, tmp_path, epochs=3, tracking_uri=mlflow_server, experiment="faulty-on-server")
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        res = fit(cfg, ScaleConfig(num_workers=2, cpus_per_worker=1, max_failures=1,
                                   storage_path=str(tmp_path / "ray"), name="faulty"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert marker.exists(), "the worker was not killed: the test would prove nothing"
    m = res.metrics
    assert m["epoch"] == 2
    # One worker per node: each node has one CPU and each worker needs one.
    assert m["num_nodes"] == 2 and len(set(m["worker_node_ids"].split(","))) == 2
    # DDP kept the replicas identical after every step, across the restart too.
    assert m["replica_divergence"] == 0.0
    assert m["test_samples"] == 256  # eval covered every sample once

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)  # not the process-wide registry
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "faulty"
    p = run.data.params
    assert p["train.model"] == "mlp_spe_t" and p["model.embed_dim"] == "12" and p["model.T"] == "2"
    assert int(p["model.num_params"]) > 0 and p["scale.world_size"] == "2"
    # Every epoch exactly once: epochs 0 and 1 (before the checkpoint the restart resumed
    # from) were not trained or logged again.
    for key in ("train_loss", "test_acc", "lr", "images_per_s", "energy_per_image_uj", "sops_per_image", "mean_firing_rate"):
        assert [h.step for h in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2], key
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_epoch")
    assert [(h.step, h.value) for h in resumed] == [(2, 1.0)], "one restart, from epoch 1's checkpoint"
    assert run.data.tags["mixersnn.num_nodes"] == "2"
    # The final model and its MFI report, through the server's artefact proxy.
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.pt", "model/mfi_report.json"} <= arts
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "model/mfi_report.json", str(tmp_path / "dl"))).read_text())
    assert report["ok"] is True and run.data.tags["mixersnn.mfi_ok"] == "True"
    model_file = client.download_artifacts(run.info.run_id, "model/model.pt", str(tmp_path / "dl"))
    assert load_model(model_file).config.embed_dim == 12
    assert load_model(res.checkpoint_path).config.embed_dim == 12
