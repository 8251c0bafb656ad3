"""MFI check on every variant, bit-exact BatchNorm folding on real Fashion-MNIST, MFI files
and the ``export`` CLI."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from mixersnn.accounting import (
    CLASSIFIER,
    FIRST_CONV,
    MFIMixerSNN,
    check_mfi,
    compare_spikes,
    fold_mfi,
    load_mfi,
    save_mfi,
)
from mixersnn.models import create_model, list_models, save_checkpoint

from _helpers import fmnist, train_briefly

SMALL = dict(img_size=28, in_chans=1, num_classes=10, embed_dim=12, depths=(1, 2, 1, 1), T=2)


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Arbitrary BN statistics and affine parameters, some gammas negative: every fold path
    is exercised with factors far from 1 and the network fires in every layer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.05)
            sign = torch.where(torch.rand(n, generator=g) < 0.15, -1.0, 1.0)
            m.weight.data.copy_(sign * (torch.rand(n, generator=g) * 1.5 + 0.5))
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.8)
    return model.eval()


# ---------------------------------------------------------------------------- MFI check
@pytest.mark.parametrize("name", list_models())
def test_mfi_report_every_variant_is_first_conv_and_classifier(name):
    torch.manual_seed(0)
    # Non-trivial BN: with default BN an untrained net's last stage can be silent, and then the
    # classifier really does see only zeros (binary) on that batch.
    model = randomise_bn(create_model(name, **SMALL), seed=0).train()
    report = check_mfi(model, fmnist(0, 16)[0])
    assert report.non_binary_names == [FIRST_CONV, CLASSIFIER]
    assert report.runtime_ops == ()
    assert report.ok and report.violations == []
    assert model.training  # mode restored


def test_mfi_report_flags_real_input_and_runtime_norms():
    torch.manual_seed(0)
    model = create_model("mlp_spe_t", **SMALL)
    # Remove the hidden LIF of one channel MLP: fc2 now receives real-valued currents.
    model.stages[1].blocks[0].channel.lif = nn.Identity()
    model.stages[0].blocks[0].token.bn = nn.LayerNorm([12, 7, 7])
    report = check_mfi(model, fmnist(0, 8)[0])
    assert not report.ok
    bad = [v.name for v in report.violations]
    assert "stages.1.blocks.0.channel.fc2" in bad
    assert "stages.0.blocks.0.token.bn" in bad
    assert FIRST_CONV not in bad and CLASSIFIER not in bad


# ---------------------------------------------------------------------------- folding
#: Independent stage widths (``stage_dims``) of each variant (SPE: multiples of 3 after stage 1).
STAGE_DIMS = {"mlp_spe_t": (12, 30, 42, 96), "mlp_s": (8, 20, 20, 40)}


def _make(name: str, state: str, stage_dims: bool = False) -> nn.Module:
    torch.manual_seed({"mlp_spe_t": 1, "mlp_s": 2}[name])
    model = create_model(name, **SMALL, **({"stage_dims": STAGE_DIMS[name]} if stage_dims else {}))
    if state == "trained":
        train_briefly(model)
    elif state == "random_bn":
        randomise_bn(model, seed=3)
    return model.eval()


@pytest.mark.parametrize("state, stage_dims", [("untrained", False), ("trained", False), ("random_bn", False),
                                               ("untrained", True), ("random_bn", True)])
@pytest.mark.parametrize("name", ["mlp_spe_t", "mlp_s"])
def test_fold_spikes_bit_exact_on_fashion_mnist(name, state, stage_dims):
    model = _make(name, state, stage_dims)
    if stage_dims:
        assert model.config.widths == STAGE_DIMS[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mfi = fold_mfi(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mfi.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # source untouched

    x = fmnist(100, 32)[0]
    reference = copy.deepcopy(model).double()  # eval-mode model at the MFI model's precision
    r = compare_spikes(reference, mfi, x)
    assert r["layers"] == sum(1 for m in model.modules() if type(m).__name__ == "LIF")
    assert sum(r["fired"].values()) > 0
    assert r["mismatched"] == 0, {k: v for k, v in r["per_layer"].items() if v}
    assert r["logits_max_abs_diff"] < 1e-9
    if state == "random_bn":
        # the comparison is meaningful in every layer, not just the first stages
        silent = [k for k, v in r["fired"].items() if v == 0]
        assert len(silent) <= len(r["fired"]) // 4, silent
    # The float32 eval model against the folded model stored in float32: same logits to
    # float tolerance; spikes may flip only where a membrane sits within rounding of threshold.
    r32 = compare_spikes(model, fold_mfi(model, dtype=torch.float32), x)
    assert r32["mismatched"] <= 1e-4 * r32["spikes"]
    if r32["mismatched"] == 0:
        torch.testing.assert_close(r32["logits_b"], r32["logits_a"], rtol=1e-4, atol=1e-4)
    # and the folded model is itself multiplication-free apart from the pixel conv
    rep = check_mfi(mfi, x)
    assert rep.ok and FIRST_CONV in rep.non_binary_names


def test_fold_folds_head_mean_and_bn_into_classifier():
    model = _make("mlp_spe_t", "random_bn")
    mfi = fold_mfi(model)
    P = model.config.grids[-1] ** 2
    a = model.head.bn.weight.double() / torch.sqrt(model.head.bn.running_var.double() + model.head.bn.eps)
    torch.testing.assert_close(mfi.head.fc.weight, model.head.fc.weight.double() * a / P)


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("stage_dims", [False, True])
def test_save_load_roundtrip_and_no_overwrite(tmp_path, stage_dims):
    model = _make("mlp_s", "random_bn", stage_dims)
    mfi = fold_mfi(model)
    path = tmp_path / "m.mfi.safetensors"
    save_mfi(path, mfi)
    loaded = load_mfi(path)
    assert isinstance(loaded, MFIMixerSNN) and loaded.config == mfi.config
    x = fmnist(0, 8)[0].double()
    with torch.no_grad():
        assert torch.equal(loaded(x), mfi(x))
    first = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_mfi(path, fold_mfi(_make("mlp_s", "untrained")))
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mfi.safetensors"]  # no temp files left
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a mixersnn MFI export"):
        load_mfi(bad)


# ---------------------------------------------------------------------------- CLI
def _cli(mod, argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    return mod.run(p.parse_args(argv))


def test_export_cli_writes_folded_model_and_refuses_overwrite(tmp_path, capsys):
    from mixersnn.commands import export

    model = _make("mlp_spe_t", "random_bn")
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, model, model_name="mlp_spe_t")
    out = tmp_path / "out.safetensors"
    assert _cli(export, ["--mfi", str(ckpt), str(out)]) == 0
    assert "no BatchNorm" in capsys.readouterr().out
    x = fmnist(200, 16)[0]
    r = compare_spikes(copy.deepcopy(model).double(), load_mfi(out), x)
    assert r["mismatched"] == 0 and r["logits_max_abs_diff"] < 1e-9

    first = out.read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        _cli(export, ["--mfi", str(ckpt), str(out)])
    assert out.read_bytes() == first
    assert _cli(export, ["--mfi", str(ckpt), str(out), "--force", "--dtype", "float32"]) == 0
    assert load_mfi(out).head.fc.weight.dtype == torch.float32
    with pytest.raises(SystemExit, match="--mfi"):
        _cli(export, [str(ckpt), str(tmp_path / "other.safetensors")])
