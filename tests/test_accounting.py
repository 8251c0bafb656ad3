"""Accounting: dense op counts, firing-rate hooks, SOPs/energy and the ``energy`` CLI."""

from __future__ import annotations

import argparse
import functools
import json

import pytest
import torch
from torch import nn

from mixersnn.accounting import (
    CLASSIFIER,
    FIRST_CONV,
    EnergyConstants,
    FiringRateMonitor,
    dense_ac_total,
    dense_mac_total,
    dense_op_counts,
    energy_report,
    measure_energy,
    model_size,
)
from mixersnn.data import FASHION_MNIST_DIR
from mixersnn.models import create_model, list_models, model_config, save_checkpoint

from _helpers import fmnist, train_briefly

SMALL = dict(img_size=28, in_chans=1, num_classes=10, embed_dim=12, depths=(1, 1, 1, 1), T=2)




@pytest.fixture(scope="module")
def trained_spe() -> nn.Module:
    """One briefly trained small SPE model shared by the rate, energy and CLI tests."""
    torch.manual_seed(0)
    return train_briefly(create_model("mlp_spe_t", **SMALL), batch=24)


# ---------------------------------------------------------------------------- counts
def test_dense_counts_hand_computed_spe():
    # img 16, patch 4, C=6, depths (1, 1), hidden ratio 3, T=2, K=5: grids 4 and 2.
    cfg = model_config("mlp_spe_t", img_size=16, in_chans=1, num_classes=5, embed_dim=6, depths=(1, 1), T=2)
    got = {r.name: (r.dense_ops, r.steps, r.input_kind) for r in dense_op_counts(cfg)}
    expected = {
        # stage 1: C=6, H=4, N=16
        FIRST_CONV: (1 * 4 * 4 * (6 * 16), 1, "real"),  # fan_in 16 x 96 outputs = 1536, once per image
        "stages.0.blocks.0.token.proj_h": (4 * (4 * 6 * 4), 2, "spike"),  # H x (H*C*W) = 384
        "stages.0.blocks.0.token.proj_w": (4 * (4 * 6 * 4), 2, "spike"),  # 384
        "stages.0.blocks.0.token.fuse": (18 * (6 * 16), 2, "spike"),  # 3C x C*N = 1728
        "stages.0.blocks.0.channel.fc1": (6 * (18 * 16), 2, "spike"),  # C x 3C*N = 1728
        "stages.0.blocks.0.channel.fc2": (18 * (6 * 16), 2, "spike"),  # 3C x C*N = 1728
        # stage 2 (SPE): C=12, C_in=6, n=4, H=2, N=4
        "stages.1.embed.down.conv": (6 * 9 * (12 * 4), 2, "spike"),  # 54 x 48 = 2592
        "stages.1.embed.conv12.conv": (4 * 9 * (4 * 4), 2, "spike"),  # 36 x 16 = 576
        "stages.1.embed.conv23.conv": (4 * 9 * (4 * 4), 2, "spike"),  # 576
        "stages.1.blocks.0.token.proj_h": (2 * (2 * 12 * 2), 2, "spike"),  # 96
        "stages.1.blocks.0.token.proj_w": (2 * (2 * 12 * 2), 2, "spike"),  # 96
        "stages.1.blocks.0.token.fuse": (36 * (12 * 4), 2, "spike"),  # 1728
        "stages.1.blocks.0.channel.fc1": (12 * (36 * 4), 2, "spike"),  # 1728
        "stages.1.blocks.0.channel.fc2": (36 * (12 * 4), 2, "spike"),  # 1728
        CLASSIFIER: (12 * 5, 2, "real"),  # 60 per step
    }
    assert got == expected
    # 384+384+1728*3 = 5952 (stage 1); 2592+576*2+96*2+1728*3 = 9120 (stage 2)
    assert dense_ac_total(cfg) == 5952 + 9120
    # first conv once + classifier at each of T=2 steps
    assert dense_mac_total(cfg) == 1536 * 1 + 60 * 2


def test_dense_counts_hand_computed_conv_downsample():
    cfg = model_config("mlp_s", img_size=16, in_chans=1, num_classes=5, embed_dim=6, depths=(1, 1), T=2)
    got = {r.name: r.dense_ops for r in dense_op_counts(cfg)}
    assert "stages.1.embed.down.conv" not in got
    assert got["stages.1.embed.conv"] == (6 * 2 * 2) * (12 * 2 * 2)  # C/2*k*k x C*N = 24 x 48 = 1152
    assert dense_ac_total(cfg) == 5952 + 1152 + 96 * 2 + 1728 * 3


@pytest.mark.parametrize("stage_dims", [False, True], ids=["doubling", "stage_dims"])
@pytest.mark.parametrize("name", list_models())
def test_counts_match_shapes_seen_by_hooks(name, stage_dims):
    """Names, fan-in, outputs and steps of the analytic table equal what the layers really do
    (also with independent stage widths)."""
    over = {}
    if stage_dims:
        over["stage_dims"] = (12, 30, 42, 96) if model_config(name).spe else (8, 20, 20, 40)
    model = create_model(name, **SMALL, **over).eval()
    seen: dict[str, tuple[int, int]] = {}
    B = 3

    def hook(mod_name, mod, inp, out):
        fan_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        seen[mod_name] = (fan_in, out.numel())

    handles = [
        m.register_forward_hook(functools.partial(hook, n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(fmnist(0, B)[0])
    for h in handles:
        h.remove()
    rows = dense_op_counts(model.config)
    assert [r.name for r in rows] == list(seen)  # same layers, same forward order
    for r in rows:
        fan_in, numel = seen[r.name]
        assert r.fan_in == fan_in, r.name
        assert r.outputs * r.steps * B == numel, r.name  # steps = how often it ran per image


def test_dense_acs_match_paper_mlp_spe_t():
    # Paper (design doc section 6): ~99 M dense ACs per image per step at 32 px, ~4.97 G at
    # 224 px. Ours: 99,098,688 and 4,971,046,080 (spike-input Conv/Linear only; no BN,
    # biases or additions; first conv and classifier are MACs).
    assert abs(dense_ac_total(model_config("mlp_spe_t", img_size=32)) / 99e6 - 1) < 0.005
    assert abs(dense_ac_total(model_config("mlp_spe_t", img_size=224)) / 4.97e9 - 1) < 0.002


@pytest.mark.parametrize("over", [{}, {"stage_dims": (12, 30, 42, 96)}])
def test_model_size_matches_closed_form(over):
    model = create_model("mlp_spe_t", **SMALL, **over)
    size = model_size(model)
    assert size.num_params == model.config.closed_form_num_params()
    assert size.param_bytes == 4 * size.num_params
    assert size.buffer_bytes > 0  # BN running stats


# ---------------------------------------------------------------------------- rates
def test_monitor_rates_equal_direct_measurement_and_accumulate(trained_spe):
    model = trained_spe
    target = "stages.0.blocks.0.channel.fc1"
    captured: list[torch.Tensor] = []
    h = dict(model.named_modules())[target].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    x1, x2 = fmnist(0, 16)[0], fmnist(16, 48)[0]
    with torch.no_grad(), FiringRateMonitor(model) as mon:
        model(x1)
        model(x2)
    h.remove()
    direct = torch.cat([c.flatten() for c in captured])
    stats = mon.stats()[target]
    assert stats.elements == direct.numel()
    assert stats.nonzero == int((direct != 0).sum())
    assert stats.rate == pytest.approx(float((direct != 0).double().mean()))
    assert 0 < stats.rate < 1
    assert stats.calls == 2 and stats.is_binary
    assert not mon.stats()[FIRST_CONV].is_binary
    # hooks are gone after the context
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------- energy
def test_energy_report_arithmetic():
    cfg = model_config("mlp_spe_t", **SMALL)
    names = [r.name for r in dense_op_counts(cfg) if r.input_kind == "spike"]
    rates = {n: 0.25 for n in names}
    c = EnergyConstants(mac_pj=2.0, ac_pj=0.5)
    rep = energy_report(cfg, rates, constants=c)
    assert rep.sops == pytest.approx(cfg.T * 0.25 * dense_ac_total(cfg))
    assert rep.macs == dense_mac_total(cfg)
    assert rep.energy_pj == pytest.approx(2.0 * rep.macs + 0.5 * rep.sops)
    assert rep.mean_rate == pytest.approx(0.25)
    dense = energy_report(cfg)  # no rates: every input fires
    assert dense.sops == cfg.T * dense_ac_total(cfg) and not dense.rates_measured
    d = json.loads(rep.to_json())
    assert [r["name"] for r in d["layers"]][0] == FIRST_CONV and d["totals"]["sops"] == pytest.approx(rep.sops)
    with pytest.raises(KeyError, match="FiringRateMonitor"):
        energy_report(cfg, {})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        energy_report(cfg, {n: 1.5 for n in names})
    with pytest.raises(ValueError, match="mac_pj"):
        EnergyConstants(mac_pj=-1)


def test_measure_energy_uses_measured_rates(trained_spe):
    model = trained_spe
    batches = [fmnist(0, 32), fmnist(32, 32)]
    rep = measure_energy(model, batches)
    with torch.no_grad(), FiringRateMonitor(model) as mon:
        for x, _ in batches:
            model(x)
    assert rep.images == 64 and rep.rates_measured
    assert rep.sops == pytest.approx(energy_report(model.config, mon.rates()).sops)
    assert 0 < rep.sops < model.config.T * dense_ac_total(model.config)
    assert model.training is False


# ---------------------------------------------------------------------------- CLI
def _cli(mod, argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    return mod.run(p.parse_args(argv))


def test_energy_cli_prints_table_for_trained_checkpoint(tmp_path, capsys, trained_spe):
    from mixersnn.commands import energy

    model = trained_spe
    ckpt = tmp_path / "small.pt"
    save_checkpoint(ckpt, model, model_name="mlp_spe_t")

    assert _cli(energy, ["--model", str(ckpt), "--data", "fashion-mnist", "--batches", "2", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    for r in dense_op_counts(model.config):
        assert r.name in out
    assert "rates measured on 32 images" in out and "SOPs" in out and "energy" in out

    assert _cli(energy, ["--model", str(ckpt), "--data", str(FASHION_MNIST_DIR), "--batches", "1", "--batch-size", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["images"] == 8 and d["rates_measured"] and d["T"] == SMALL["T"]
    expected_sops = sum(r["steps"] * r["rate"] * r["dense_ops"] for r in d["layers"] if r["input_kind"] == "spike")
    assert d["totals"]["sops"] == pytest.approx(expected_sops)
    assert d["totals"]["num_params"] == model.config.closed_form_num_params()

    with pytest.raises(SystemExit, match="--img-size 28 --in-chans 1"):
        _cli(energy, ["--model", "mlp_s", "--data", "fashion-mnist", "--batches", "1", "--batch-size", "2"])
