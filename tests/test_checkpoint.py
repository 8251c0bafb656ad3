"""Checkpoint contract: round trip is exact, foreign files are refused clearly, and loading
never runs pickled code (weights_only)."""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from mixersnn.models import create_model, load_checkpoint, load_model, save_checkpoint
from mixersnn.models.checkpoint import CHECKPOINT_FORMAT

SMALL = dict(img_size=32, num_classes=10, embed_dim=12, depths=(1, 1, 1, 1), T=2, backend="torch")


def trained_like(name: str = "mlp_spe_t", **over):
    """A small model whose weights and BN statistics differ from a fresh build."""
    m = create_model(name, **SMALL, **over)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = None  # running stats = the statistics of the batch below
            mod.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 32, 32))
    return m.eval()


@pytest.mark.parametrize("name", ["mlp_spe_t", "mlp_s"])
def test_round_trip_identical_outputs(tmp_path, name):
    m = trained_like(name)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, m, model_name=name, epoch=7)
    loaded = load_model(path).eval()
    assert loaded.config == m.config
    img = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, out_loaded = m(img), loaded(img)
        fresh = create_model(name, **SMALL).eval()(img)
    assert torch.equal(out, out_loaded)
    assert not torch.equal(out, fresh)  # the round trip carried real information
    sd, sd2 = m.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)  # BN buffers included
    obj = load_checkpoint(path)
    assert obj["format"] == CHECKPOINT_FORMAT
    assert obj["model_name"] == name and obj["epoch"] == 7


@pytest.mark.parametrize("name, dims", [("mlp_spe_t", (12, 30, 42, 96)), ("mlp_s", (8, 20, 20, 40))])
def test_round_trip_with_stage_dims(tmp_path, name, dims):
    m = trained_like(name, stage_dims=dims)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, m, model_name=name)
    assert load_checkpoint(path)["config"]["stage_dims"] == list(dims)
    loaded = load_model(path).eval()
    assert loaded.config == m.config and loaded.config.widths == dims
    img = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(img), loaded(img))


def test_load_model_applies_neuron_overrides(tmp_path):
    m = trained_like()
    save_checkpoint(tmp_path / "c.pt", m)
    loaded = load_model(tmp_path / "c.pt", backend="auto")
    assert loaded.config.neuron.backend == "auto"
    assert loaded.config.replace(backend="torch") == m.config


def test_save_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path / "sub" / "c.pt", trained_like())
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.pt"]


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "obj",
    [
        {"model": {"w": torch.zeros(2)}},  # a plain state-dict-like file
        {"format": "something-else/1", "config": {}},  # another tool's format
        torch.zeros(3),  # not a dict at all
        [1, 2, 3],
    ],
    ids=["state_dict", "other_format", "tensor", "list"],
)
def test_torch_file_that_is_not_a_checkpoint_is_refused(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=r"other\.pt is not a mixersnn checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="not a mixersnn checkpoint"):
        load_model(path)


@pytest.mark.parametrize(
    "content", [b"hello, not a checkpoint\n", b"\x00\x01\x02garbage" * 10], ids=["text", "binary"]
)
def test_non_torch_file_is_refused_clearly(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"notes\.pt.*not a mixersnn checkpoint"):
        load_checkpoint(path)


class _Payload:
    """An arbitrary object whose unpickling runs code (here: creates a marker file)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_loading_uses_weights_only(tmp_path):
    marker = tmp_path / "code_ran"
    m = trained_like()
    path = tmp_path / "evil.pt"
    save_checkpoint(path, m, payload=_Payload(marker))  # torch.save pickles anything
    assert not marker.exists()
    with pytest.raises(Exception) as info:
        load_checkpoint(path)
    assert not marker.exists(), "unpickling ran arbitrary code: weights_only is not in force"
    assert "weights_only" in str(info.value) or "Unsupported global" in str(info.value)
    with pytest.raises(Exception):
        load_model(path)
    assert not marker.exists()
    # Control: a full unpickle does run the payload, so the test above can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()
