"""Supernet training through the ordinary loop: the sandwich step, held-out shards, checkpoints
and resume (one process; the Ray Train path is in tests/test_oneshot.py)."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixersnn.data import build_loader, read_manifest
from mixersnn.data.memory import decoded_split
from mixersnn.models import ConfigError, MixerSNNSupernet, SupernetSpace, load_model, load_supernet, model_config
from trainers import loop
from trainers.loop import CHECKPOINT_FILE, WorkerContext, run_training

from _helpers import tiny_train_config
from _synthetic import row_hashes
from test_trainer import Recorder

SPACE = {"embed_dims": [6, 12], "depths": [[1], [1, 2]], "mlp_ratios": [2, 3], "Ts": [1, 2]}


def _cfg(data: Path, **kw):
    kw.setdefault("supernet", SPACE)
    kw.setdefault("log_model", False)
    over = {"embed_dim": 12, "depths": (1, 2), "T": 2}
    return tiny_train_config(data, model_overrides=over, **kw)


def test_sandwich_step_accumulates_the_largest_smallest_and_random_subnets(fmnist_shards: Path) -> None:
    """The step's gradient is the sum of the largest subnet's label loss and the distillation
    losses of the smallest and the random subnets against the largest's predictions."""
    cfg = _cfg(fmnist_shards, sandwich_random=2, grad_clip=None, label_smoothing=0.0)
    run = loop._setup(cfg, WorkerContext(log=lambda s: None))
    x, y = next(iter(run.train_loader))
    twin = copy.deepcopy(run.model)
    for group in run.opt.param_groups:  # keep the weights: compare gradients
        group["lr"] = 0.0
    loop._sandwich_step(run, cfg, x, y, epoch=3, step=5)

    space = twin.space
    rng = random.Random(f"{cfg.seed}:3:5")
    specs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(2)]
    assert len(set(specs)) >= 3, "the step must train distinct subnets"
    logits = twin(x, specs[0]).mean(0)
    total = F.cross_entropy(logits, y)
    teacher = F.softmax(logits.detach(), 1)
    for spec in specs[1:]:
        total = total + torch.sum(-teacher * F.log_softmax(twin(x, spec, update_bn_stats=False).mean(0), 1), 1).mean()
    total.backward()
    for (name, p), q in zip(run.model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    # Only the largest subnet moves the BatchNorm statistics.
    for (name, b), c in zip(run.model.named_buffers(), twin.named_buffers()):
        if "running" in name:
            assert torch.allclose(b, c[1], atol=1e-6), name


def test_supernet_trains_every_subnet_and_checkpoints_the_space(fmnist_shards: Path, tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    cfg = _cfg(fmnist_shards, epochs=3, holdout_shards=2)
    final = run_training(cfg, WorkerContext(report=rec, log=lambda s: None))
    assert [m["epoch"] for m in rec.metrics] == [0, 1, 2]
    assert final["test_acc"] > 0.3, final  # the largest subnet learns (chance is 0.1)
    assert "energy_per_image_uj" not in final  # measured per subnet by the search, not here
    supernet = load_supernet(tmp_path / "epoch_2" / CHECKPOINT_FILE)
    assert isinstance(supernet, MixerSNNSupernet) and supernet.space == SupernetSpace.from_dict(SPACE)
    with pytest.raises(ValueError, match="load_supernet"):
        load_model(tmp_path / "epoch_2" / CHECKPOINT_FILE)
    # The smallest subnet learned too, through distillation: after BN recalibration it beats chance.
    run = loop._setup(_cfg(fmnist_shards, epochs=2, holdout_shards=2), WorkerContext(log=lambda s: None))
    small = supernet.extract_calibrated(supernet.space.smallest(), run.train_loader, max_batches=4)
    xs, ys = next(iter(run.eval_loader))
    untrained = MixerSNNSupernet(supernet.base, supernet.space)
    fresh = untrained.extract_calibrated(supernet.space.smallest(), run.train_loader, max_batches=4)
    with torch.no_grad():
        acc = float((small(xs).mean(0).argmax(1) == ys).float().mean())
        chance = float((fresh(xs).mean(0).argmax(1) == ys).float().mean())
    assert acc > chance + 0.05 and acc > 0.2, (acc, chance)


def test_held_out_shards_never_reach_training(fmnist_shards: Path) -> None:
    run = loop._setup(_cfg(fmnist_shards, holdout_shards=3), WorkerContext(log=lambda s: None))
    shards = read_manifest(fmnist_shards / "train").shard_urls()
    held = loop.holdout_source(run.spec, 3)
    assert held.shard_urls() == shards[-3:] and held.num_samples == 3 * 128 and held.split == "train-holdout"
    # What the loop trains on (decoded in memory here) holds the other 5 shards' images, and
    # none of the held-out ones.
    train_images = run.train_loader.images
    assert train_images.shape[0] == 5 * 128
    held_images = decoded_split(build_loader(held, batch_size=128, train=False))[0]
    assert held_images.shape[0] == 3 * 128
    overlap = set(row_hashes(train_images.numpy())) & set(row_hashes(held_images.numpy()))
    assert not overlap
    with pytest.raises(Exception, match=r"allowed 1 to 7"):
        loop._setup(_cfg(fmnist_shards, holdout_shards=8), WorkerContext(log=lambda s: None))


def test_supernet_resume_continues_the_same_run(fmnist_shards: Path, tmp_path: Path) -> None:
    first = Recorder(tmp_path / "first", crash=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(_cfg(fmnist_shards, epochs=2), WorkerContext(report=first, log=lambda s: None))
    saved = torch.load(tmp_path / "first" / "epoch_0" / CHECKPOINT_FILE, weights_only=True)
    resumed = Recorder(tmp_path / "resumed")
    logs: list[str] = []
    run_training(_cfg(fmnist_shards, epochs=2),
                 WorkerContext(report=resumed, resume_dir=tmp_path / "first" / "epoch_0", log=logs.append))
    assert [m["epoch"] for m in resumed.metrics] == [1]
    assert any("resumed from epoch 0" in line for line in logs)
    end = torch.load(tmp_path / "resumed" / "epoch_1" / CHECKPOINT_FILE, weights_only=True)
    assert end["supernet"] == SPACE and [h["epoch"] for h in end["history"]] == [0, 1]
    # Training went on from the saved weights and optimiser state, not from a new init.
    assert int(end["scheduler"]["last_epoch"]) == 2 * int(saved["scheduler"]["last_epoch"])
    key = "net.head.fc.weight"
    assert not torch.equal(end["model"][key], saved["model"][key])


def test_bad_supernet_configs_name_the_value_and_the_fix(fmnist_shards: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of 3"):
        _cfg(fmnist_shards, supernet={**SPACE, "embed_dims": [8, 12]})
    with pytest.raises(ConfigError, match="compile"):
        _cfg(fmnist_shards, compile=True)
    with pytest.raises(ConfigError, match="sandwich_random"):
        _cfg(fmnist_shards, sandwich_random=-1)
    with pytest.raises(ConfigError, match="supernet space keys"):
        _cfg(fmnist_shards, supernet={"embed_dims": [6]})
    # A supernet's base: image size etc. come from the data, widths from the space.
    assert model_config("mlp_spe_t", img_size=28, in_chans=1, num_classes=10).patch_size == 4


def test_train_command_trains_a_supernet_from_yaml(fmnist_shards: Path, tmp_path: Path, monkeypatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """`mixersnn train --no-ray --config` with a train.supernet section: a supernet checkpoint
    and an MLflow run; --register refuses (the registry holds single models)."""
    import yaml

    from mixersnn.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = {"train": {"model": "mlp_spe_t", "data": str(fmnist_shards), "epochs": 1, "max_steps_per_epoch": 3,
                     "max_eval_batches": 1, "batch_size": 32, "warmup_epochs": 0.0,
                     "model_overrides": {"embed_dim": 12, "depths": [1, 2], "T": 2}, "supernet": SPACE,
                     "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "run_name": "sn"}}
    path = tmp_path / "supernet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--no-ray", "--config", str(path)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    net = load_supernet(tmp_path / "runs" / "local" / "sn" / CHECKPOINT_FILE)
    assert net.space == SupernetSpace.from_dict(SPACE)
    assert main(["train", "--no-ray", "--config", str(path), "--run-name", "sn2", "--register", "x"]) == 2
    assert "with a supernet" in capsys.readouterr().err
