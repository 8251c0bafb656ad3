"""Configuration contract: bad values raise ConfigError naming the value and the fix; None
overrides never clobber a variant; the config survives dict/JSON round trips unchanged."""

from __future__ import annotations

import json
import re

import pytest

from mixersnn.models import (
    ConfigError,
    MixerSNNConfig,
    NeuronConfig,
    create_model,
    list_models,
    model_config,
)

# Small but valid, so every error below is caused by the one field the test changes.
BASE = dict(img_size=32, num_classes=10, embed_dim=12, depths=(1, 1, 1, 1), T=2)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("embed_dim,nearest", [(80, (78, 81)), (100, (99, 102)), (97, (96, 99))])
def test_spe_width_not_multiple_of_3(embed_dim, nearest):
    with pytest.raises(ConfigError) as info:
        MixerSNNConfig(**{**BASE, "embed_dim": embed_dim, "spe": True})
    msg = str(info.value)
    assert f"embed_dim={embed_dim}" in msg
    for w in nearest:
        assert re.search(rf"\b{w}\b", msg), f"nearest valid width {w} missing from: {msg}"
    assert "spe=False" in msg  # the other fix
    # The same width is fine without SPE (MLP-S uses conv downsampling).
    MixerSNNConfig(**{**BASE, "embed_dim": embed_dim, "spe": False})


def test_spe_width_80_via_registry():
    with pytest.raises(ConfigError, match=r"embed_dim=80.*78.*81"):
        model_config("mlp_spe_t", embed_dim=80)
    assert model_config("mlp_s", embed_dim=80).embed_dim == 80


@pytest.mark.parametrize("T", [0, -1, 65, 2.0, True])
def test_bad_T(T):
    with pytest.raises(ConfigError, match=re.escape(f"T={T!r} is out of range")):
        MixerSNNConfig(**{**BASE, "T": T})


@pytest.mark.parametrize("T", [1, 64])
def test_T_bounds_accepted(T):
    assert MixerSNNConfig(**{**BASE, "T": T}).T == T


@pytest.mark.parametrize("img_size,patch_size", [(30, 4), (32, 3), (224, 5)])
def test_img_size_not_divisible_by_patch(img_size, patch_size):
    with pytest.raises(ConfigError) as info:
        MixerSNNConfig(**{**BASE, "img_size": img_size, "patch_size": patch_size})
    msg = str(info.value)
    assert f"img_size={img_size}" in msg and f"patch_size={patch_size}" in msg
    # The suggested image sizes really are multiples of the patch size.
    lo = img_size - img_size % patch_size
    assert str(lo) in msg and str(lo + patch_size) in msg


@pytest.mark.parametrize("depths,pattern", [((), r"depths=\(\) is empty"), ((1, 0, 1), r"depths\[1\]=0"), ((2, -1), r"depths\[1\]=-1")])
def test_bad_depths(depths, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MixerSNNConfig(**{**BASE, "depths": depths})


@pytest.mark.parametrize(
    "mlp_ratio,pattern",
    [(0, r"mlp_ratio=0\b"), (-3.0, r"mlp_ratio=-3\.0"), (0.1, r"mlp_ratio=0\.1.*non-integer hidden width 1\.2")],
)
def test_bad_mlp_ratio(mlp_ratio, pattern):
    # 0.1 * 12 = 1.2 hidden units in stage 1: not a whole width.
    with pytest.raises(ConfigError, match=pattern):
        MixerSNNConfig(**{**BASE, "mlp_ratio": mlp_ratio})


def test_fractional_mlp_ratio_with_whole_hidden_widths_is_accepted():
    # 2.5 * 12 = 30, and every later width (24, 48, 96) times 2.5 is whole too.
    cfg = MixerSNNConfig(**{**BASE, "mlp_ratio": 2.5})
    assert cfg.hidden_dim(12) == 30


@pytest.mark.parametrize(
    "field,value", [("img_size", 0), ("in_chans", 0), ("num_classes", 0), ("patch_size", 0), ("embed_dim", -3)]
)
def test_non_positive_sizes(field, value):
    with pytest.raises(ConfigError, match=rf"{field}={value}\b"):
        MixerSNNConfig(**{**BASE, field: value})


def test_bad_neuron_option_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"tau=0\.5"):
        model_config("mlp_spe_t", tau=0.5)
    with pytest.raises(ConfigError, match=r"'relu'"):
        model_config("mlp_spe_t", neuron={"surrogate": "relu"})


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"'foo'.*embed_dim.*tau"):
        model_config("mlp_spe_t", foo=1)
    with pytest.raises(ConfigError, match=r"'bogus'"):
        model_config("mlp_spe_t", neuron={"bogus": 1})
    with pytest.raises(ConfigError, match=r"'foo'"):
        MixerSNNConfig(**BASE).replace(foo=1)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        model_config("mlp_spe_xl")
    msg = str(info.value)
    assert "'mlp_spe_xl'" in msg
    for name in list_models():
        assert name in msg
    with pytest.raises(ValueError, match="mlp_spe_xl"):
        create_model("mlp_spe_xl")


def test_none_overrides_are_dropped():
    cli_defaults = dict(
        img_size=None, in_chans=None, num_classes=None, embed_dim=None, depths=None, T=None,
        spe=None, mlp_ratio=None, patch_size=None, tau=None, backend=None, surrogate=None,
        v_reset=None, alpha=None, neuron=None,
    )
    for name in list_models():
        assert model_config(name, **cli_defaults) == model_config(name)
    # A real value next to the Nones is still applied.
    cfg = model_config("mlp_spe_t", img_size=32, T=None, embed_dim=None)
    assert cfg.img_size == 32 and cfg.T == model_config("mlp_spe_t").T
    assert cfg.embed_dim == 78


def test_none_overrides_dropped_in_create_model():
    m = create_model("mlp_spe_t", **BASE, spe=None, tau=None, backend="torch")
    assert m.config.spe is True and m.config.neuron.tau == 2.0


def test_flat_and_nested_neuron_overrides():
    cfg = model_config("mlp_spe_t", tau=3.0, backend="torch")
    assert cfg.neuron.tau == 3.0 and cfg.neuron.backend == "torch"
    # Soft reset needs an explicit None, so it goes through the nested form.
    soft = model_config("mlp_spe_t", neuron={"v_reset": None})
    assert soft.neuron.v_reset is None
    assert model_config("mlp_spe_t", v_reset=None).neuron.v_reset == 0.0  # flat None is dropped
    # Nested overrides only touch the named fields.
    assert soft.neuron.tau == 2.0 and soft.neuron.detach_reset is True


def test_paper_neuron_defaults():
    n = NeuronConfig()
    assert (n.tau, n.v_threshold, n.v_reset, n.decay_input, n.detach_reset, n.surrogate) == (
        2.0, 1.0, 0.0, True, True, "sigmoid",
    )


def _nondefault_config() -> MixerSNNConfig:
    return model_config(
        "mlp_spe_t",
        img_size=28, in_chans=1, num_classes=10, depths=(1, 2, 3, 1), T=6, mlp_ratio=2.0,
        neuron={"v_reset": None, "surrogate": "atan", "alpha": 1.5, "tau": 3.0, "backend": "torch"},
    )


def test_to_dict_from_dict_round_trip():
    cfg = _nondefault_config()
    d = cfg.to_dict()
    assert isinstance(d["neuron"], dict) and d["neuron"]["v_reset"] is None
    back = MixerSNNConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.neuron, NeuronConfig) and isinstance(back.depths, tuple)


@pytest.mark.parametrize("name", list_models())
def test_round_trip_through_json(name):
    for cfg in (model_config(name), _nondefault_config()):
        text = json.dumps(cfg.to_dict())
        back = MixerSNNConfig.from_dict(json.loads(text))
        assert back == cfg
        assert back.closed_form_num_params() == cfg.closed_form_num_params()
        assert json.dumps(back.to_dict()) == text


def test_from_dict_rejects_unknown_keys():
    d = MixerSNNConfig(**BASE).to_dict()
    d["foo"] = 1
    with pytest.raises(ConfigError, match=r"'foo'"):
        MixerSNNConfig.from_dict(d)


def test_from_dict_rejects_unknown_neuron_keys():
    d = MixerSNNConfig(**BASE).to_dict()
    d["neuron"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"'bogus'"):
        MixerSNNConfig.from_dict(d)


def test_from_dict_validates():
    d = MixerSNNConfig(**BASE).to_dict()
    d["embed_dim"] = 80
    with pytest.raises(ConfigError, match=r"embed_dim=80"):
        MixerSNNConfig.from_dict(d)


# --------------------------------------------------------------------------- independent stage widths
STAGE_DIMS_SPE = dict(BASE, stage_dims=(12, 30, 42, 96), spe=True)


def test_stage_dims_set_every_width_and_the_stage_1_width():
    cfg = MixerSNNConfig(**{**STAGE_DIMS_SPE, "stage_dims": [12, 30, 42, 96], "embed_dim": 99})
    assert cfg.stage_dims == (12, 30, 42, 96) and isinstance(cfg.stage_dims, tuple)  # lists from YAML/JSON
    assert cfg.widths == (12, 30, 42, 96) and cfg.embed_dim == 12  # embed_dim follows stage_dims[0]
    assert MixerSNNConfig(**BASE).stage_dims is None and MixerSNNConfig(**BASE).to_dict()["stage_dims"] is None
    # With SPE only the stages after the first must be multiples of 3.
    assert MixerSNNConfig(**{**STAGE_DIMS_SPE, "stage_dims": (8, 30, 42, 96)}).embed_dim == 8
    assert MixerSNNConfig(**{**BASE, "spe": False, "stage_dims": (8, 20, 20, 40)}).widths == (8, 20, 20, 40)


def test_stage_dims_round_trip_through_dict_and_json():
    cfg = MixerSNNConfig(**STAGE_DIMS_SPE)
    d = cfg.to_dict()
    assert d["stage_dims"] == [12, 30, 42, 96]
    back = MixerSNNConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.closed_form_num_params() == cfg.closed_form_num_params()
    assert json.dumps(back.to_dict()) == json.dumps(d)
    # A dict written before stage_dims existed still loads (doubling widths).
    old = MixerSNNConfig(**BASE).to_dict()
    del old["stage_dims"]
    assert MixerSNNConfig.from_dict(old) == MixerSNNConfig(**BASE)


@pytest.mark.parametrize("over, pattern", [
    ({"stage_dims": (12, 30, 42)}, r"stage_dims=\[12, 30, 42\] has 3 widths but depths=\[1, 1, 1, 1\] has 4 stages"),
    ({"stage_dims": (12, 0, 42, 96)}, r"stage_dims\[1\]=0 is out of range: .*integer >= 1"),
    ({"stage_dims": (12, 30, 42.5, 96)}, r"stage_dims\[2\]=42.5 is out of range"),
    ({"stage_dims": (12, 31, 42, 96)}, r"stage_dims\[1\]=31 cannot be used with spe=True.*Nearest valid widths: \[30, 33\]"),
    ({"stage_dims": (12, 30, 45, 96), "mlp_ratio": 2.5}, r"mlp_ratio=2.5 gives a non-integer hidden width 112.5 "
                                                          r"for stage width 45 \(stage 2\)"),
    ({"stage_dims": "wide"}, r"stage_dims='wide' must be a list or tuple"),
])
def test_bad_stage_dims(over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        MixerSNNConfig(**{**STAGE_DIMS_SPE, **over})


def test_embed_dim_override_on_stage_dims_names_the_fix():
    cfg = MixerSNNConfig(**STAGE_DIMS_SPE)
    with pytest.raises(ConfigError, match=r"embed_dim=24 cannot be overridden.*override stage_dims instead"):
        cfg.replace(embed_dim=24)
    assert cfg.replace(embed_dim=12) == cfg
    assert cfg.replace(stage_dims=[24, 30, 42, 96]).embed_dim == 24
    assert cfg.replace(depths=(2, 1, 1, 1)).stage_dims == cfg.stage_dims


def test_derived_shapes():
    cfg = MixerSNNConfig(**{**BASE, "img_size": 28})
    assert cfg.widths == (12, 24, 48, 96)
    assert cfg.grids == (7, 4, 2, 1)  # 28/4 = 7, then ceil halves
    assert MixerSNNConfig(**BASE).grids == (8, 4, 2, 1)
    assert model_config("mlp_spe_t").grids == (56, 28, 14, 7)


# --------------------------------------------------------------------------- ScaleConfig (Ray resources)
@pytest.mark.parametrize("gpus", [0.25, 0.5, 0.0001, 1, 1.0, 2, 8])
def test_gpu_amounts_ray_can_schedule_are_accepted(gpus):
    from trainers.config import ScaleConfig

    workers = 1 if gpus < 1 else 4
    ScaleConfig(num_workers=workers, use_gpu=True, gpus_per_worker=gpus)


@pytest.mark.parametrize(
    "gpus, workers, match",
    [
        (0, 1, r"gpus_per_worker=0 must be > 0 .*fraction in \(0, 1\).*use_gpu: false"),
        (-0.5, 1, r"gpus_per_worker=-0.5 must be > 0"),
        (1.5, 1, r"gpus_per_worker=1.5 cannot be scheduled: Ray accepts GPU amounts in \(0, 1\) or whole numbers.*use 1 or 2"),
        (0.00001, 1, r"gpus_per_worker=1e-05 is below Ray's resource precision 0.0001"),
        ("0.25", 1, r"gpus_per_worker='0.25' must be a number"),
        (0.5, 2, r"gpus_per_worker=0.5 with num_workers=2: .*nccl refuses; use whole GPUs"),
    ],
)
def test_gpu_amounts_ray_cannot_schedule_name_the_value_range_and_fix(gpus, workers, match):
    from trainers.config import ScaleConfig

    with pytest.raises(ConfigError, match=match):
        ScaleConfig(num_workers=workers, use_gpu=True, gpus_per_worker=gpus)
    # Without use_gpu the GPU amount is not used, and not checked.
    ScaleConfig(num_workers=workers, use_gpu=False, gpus_per_worker=gpus)


def test_scaling_config_carries_the_fractional_gpu_per_worker():
    pytest.importorskip("ray")
    from trainers.config import ScaleConfig
    from trainers.ray_train import scaling_config, worker_resources

    sc = scaling_config(ScaleConfig(num_workers=1, use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2))
    assert (sc.num_workers, sc.use_gpu, sc.resources_per_worker) == (1, True, {"CPU": 2.0, "GPU": 0.25})
    assert sc.total_resources == {"CPU": 2.0, "GPU": 0.25}
    cpu = scaling_config(ScaleConfig(num_workers=2, cpus_per_worker=0.5, gpus_per_worker=0.25))
    assert (cpu.use_gpu, cpu.resources_per_worker) == (False, {"CPU": 0.5})  # no GPU asked without use_gpu
    assert worker_resources(ScaleConfig(num_workers=4, use_gpu=True, gpus_per_worker=1)) == {"CPU": 1.0, "GPU": 1.0}


# --------------------------------------------------------------------------- TrainConfig.augment
@pytest.mark.parametrize(
    "value, mode",
    [("auto", "auto"), ("none", "none"), ("crop", "crop"), ("crop-flip", "crop-flip"), (True, "auto"), (False, "none")],
)
def test_augment_takes_the_modes_and_the_old_booleans(value, mode):
    from trainers.config import TrainConfig

    cfg = TrainConfig(augment=value)
    assert cfg.augment == mode
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).augment == mode
    assert TrainConfig().augment == "auto"


@pytest.mark.parametrize("value", ["flip", "Crop", "", 1, None])
def test_bad_augment_names_the_value_the_modes_and_the_fix(value):
    from trainers.config import TrainConfig

    with pytest.raises(ConfigError, match=rf"augment={re.escape(repr(value))} must be one of 'auto', 'none', 'crop', "
                                          rf"'crop-flip'.*true.*false.*--augment"):  # fmt: skip
        TrainConfig(augment=value)


def test_augment_from_yaml_booleans_and_modes_and_the_cli_flag(tmp_path):
    import argparse

    from trainers.cli import add_arguments, build_configs

    p = argparse.ArgumentParser()
    add_arguments(p)
    for text, mode in (("false", "none"), ("true", "auto"), ("crop", "crop"), ("crop-flip", "crop-flip")):
        (tmp_path / "c.yaml").write_text(f"train:\n  augment: {text}\n")
        train, _ = build_configs(p.parse_args(["--config", str(tmp_path / "c.yaml")]))
        assert train.augment == mode, text
    # The flag overrides the file; without it the file's value stays.
    train, _ = build_configs(p.parse_args(["--config", str(tmp_path / "c.yaml"), "--augment", "none"]))
    assert train.augment == "none"
    assert build_configs(p.parse_args(["--augment", "crop"]))[0].augment == "crop"
    assert build_configs(p.parse_args([]))[0].augment == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--augment", "flip"])
