"""Model families: scaling an architecture's width, depth and input size (mixersnn.models.scale),
and the ways in: ``--scale``, the train YAML's ``scale:`` block, ``mixersnn models --scale``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixersnn.cli import main
from mixersnn.models import ConfigError, MixerSNN, model_config
from mixersnn.models.scale import ModelScale, parse_scale, scale_config, scale_from_mapping


def _tiny(**kw):  # type: ignore[no-untyped-def]
    return model_config("mlp_spe_t", **{"img_size": 32, "in_chans": 3, "num_classes": 10, "embed_dim": 48,
                                        "depths": (1, 2, 1), "T": 2, **kw})


def test_parse_scale_reads_any_subset_and_the_identity_scales_nothing() -> None:
    assert parse_scale("width=2,depth=1.5,img_size=224") == ModelScale(2.0, 1.5, 224)
    assert parse_scale(" depth = 2 ") == ModelScale(depth=2.0)
    assert parse_scale("width=1").is_identity and scale_config(_tiny(), parse_scale("width=1")) == _tiny()
    assert str(ModelScale(2.0, 1.5, 224)) == "width=2,depth=1.5,img_size=224"
    assert scale_from_mapping({"width": 0.5, "img_size": 64.0}) == ModelScale(width=0.5, img_size=64)


@pytest.mark.parametrize("factor, expected", [(2, 96), (1.1, 54), (0.3, 15), (0.5, 24), (1.03, 48)])
def test_width_with_spe_rounds_to_the_nearest_multiple_of_3(factor: float, expected: int) -> None:
    cfg = scale_config(_tiny(), ModelScale(width=factor))
    assert cfg.embed_dim == expected and cfg.embed_dim % 3 == 0
    assert cfg.depths == (1, 2, 1) and cfg.spe and cfg.T == 2 and cfg.patch_size == 4  # the rest is kept
    MixerSNN(cfg)  # and it builds


def test_width_without_spe_keeps_integer_rounding_and_whole_hidden_widths() -> None:
    assert scale_config(_tiny(spe=False, embed_dim=10), ModelScale(width=1.15)).embed_dim == 12  # 11.5 -> 12
    # mlp_ratio 2.5 needs an even width (hidden = 2.5 C must be whole): 11.5 -> 12, 13.1 -> 12 or 14.
    c = _tiny(spe=False, embed_dim=10, mlp_ratio=2.5)
    for f in (1.15, 1.31, 1.7):
        w = scale_config(c, ModelScale(width=f)).embed_dim
        assert w % 2 == 0 and abs(w - 10 * f) <= 1


def test_depth_multiplies_every_stage_rounds_half_up_and_keeps_at_least_one_block() -> None:
    assert scale_config(_tiny(), ModelScale(depth=1.5)).depths == (2, 3, 2)
    assert scale_config(_tiny(), ModelScale(depth=0.1)).depths == (1, 1, 1)
    paper = model_config("mlp_spe_t")
    assert scale_config(paper, ModelScale(depth=0.5)).depths == (1, 4, 7, 1)
    assert len(scale_config(paper, ModelScale(depth=3)).depths) == 4  # the stage layout is kept


@pytest.mark.parametrize("factor, expected", [(2, (24, 60, 84)), (1.1, (13, 33, 45)), (0.5, (6, 15, 21))])
def test_width_scales_every_stage_of_stage_dims_keeping_each_valid(factor: float, expected: tuple) -> None:
    cfg = scale_config(_tiny(stage_dims=(12, 30, 42)), ModelScale(width=factor))
    assert cfg.stage_dims == expected and cfg.embed_dim == expected[0]
    assert cfg.depths == (1, 2, 1) and cfg.spe  # the rest is kept
    assert cfg.closed_form_num_params() == sum(p.numel() for p in MixerSNN(cfg).parameters())
    # mlp_ratio 2.5 needs even widths; without SPE any whole width is a stage width.
    odd = scale_config(_tiny(spe=False, stage_dims=(8, 20, 20), mlp_ratio=2.5), ModelScale(width=1.3))
    assert odd.stage_dims == (10, 26, 26)
    # depth scaling keeps the stage widths
    assert scale_config(_tiny(stage_dims=(12, 30, 42)), ModelScale(depth=2)).stage_dims == (12, 30, 42)
    with pytest.raises(ConfigError, match=r"stage 1's width 1.35 from 30: below the narrowest width \(3 with SPE\)"):
        scale_config(_tiny(stage_dims=(12, 30, 42)), ModelScale(width=0.045))


def test_img_size_is_absolute_and_the_params_follow_the_closed_form() -> None:
    cfg = scale_config(_tiny(), parse_scale("width=2,depth=1.5,img_size=224"))
    assert (cfg.embed_dim, cfg.depths, cfg.img_size) == (96, (2, 3, 2), 224)
    assert cfg.closed_form_num_params() == sum(p.numel() for p in MixerSNN(cfg).parameters())


@pytest.mark.parametrize("text, needle", [
    ("height=2", "unknown key(s) ['height']"),
    ("width=0", "width='0' is out of range: a factor must be a number > 0"),
    ("depth=-1", "depth='-1' is out of range"),
    ("width=abc", "width='abc' is not a number"),
    ("img_size=30", "img_size=30 is not a multiple of the model's patch_size=4"),
    ("img_size=2.5", "img_size='2.5' is out of range"),
    ("width=0.01", "width=0.01 makes C=0.48 from C=48: below the narrowest width (3 with SPE)"),
    ("width", "'width' is not KEY=VALUE"),
    ("width=2,width=3", "width is given twice"),
    ("", "scales nothing"),
])
def test_a_bad_scale_is_one_line_naming_the_value_and_the_fix(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        scale_config(_tiny(), parse_scale(text))
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and msg.startswith("--scale")
    if "img_size=30" in text:
        assert "use img_size=28 or 32" in msg


def test_models_scale_prints_params_and_dense_energy_before_anything_trains(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["models", "--model", "mlp_spe_t", "--img-size", "32", "--num-classes", "10",
                 "--scale", "width=0.5,depth=0.5", "--json"]) == 0
    base, scaled = json.loads(capsys.readouterr().out)
    assert scaled["embed_dim"] == 39 and scaled["depths"] == [1, 4, 7, 1]
    assert scaled["params"] < base["params"] and 0 < scaled["energy_uj_dense"] < base["energy_uj_dense"]
    assert main(["models", "--scale", "width=2"]) == 0
    out = capsys.readouterr().out
    assert "scaled width=2" in out and "uJ/img" in out and "dense bound" in out


def test_models_with_a_bad_scale_exits_2_with_one_line(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["models", "--scale", "width=2,colour=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --scale") and "colour" in err and len(err.splitlines()) == 1


def test_train_scale_flag_and_yaml_block_give_the_family_member(tmp_path: Path, fmnist_shards: Path) -> None:
    import argparse

    from trainers.cli import add_arguments, build_configs

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--data", str(fmnist_shards), "--embed-dim", "12", "--depths", "1,2"]
    train, _ = build_configs(p.parse_args([*base, "--scale", "width=2,depth=1.5,img_size=32"]))
    assert train.model_overrides["embed_dim"] == 24 and train.model_overrides["depths"] == [2, 3]
    assert train.model_overrides["img_size"] == 32
    # The scale: block holds the model's scale beside Ray's resources; the flag replaces it.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 1\nscale:\n  num_workers: 2\n  width: 0.5\n")
    train, scale = build_configs(p.parse_args([*base, "--config", str(cfg)]))
    assert train.model_overrides["embed_dim"] == 6 and scale.num_workers == 2
    train, _ = build_configs(p.parse_args([*base, "--config", str(cfg), "--scale", "depth=2"]))
    assert train.model_overrides["embed_dim"] == 12 and train.model_overrides["depths"] == [2, 4]
    cfg.write_text("scale:\n  width: 0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: scale: width=0 is out of range"):
        build_configs(p.parse_args([*base, "--config", str(cfg)]))


def test_train_with_a_bad_scale_exits_2_before_ray(fmnist_shards: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import ray

    assert main(["train", "--data", str(fmnist_shards), "--embed-dim", "12", "--depths", "1,1",
                 "--scale", "img_size=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert "img_size=30 is not a multiple of the model's patch_size=4" in err and len(err.splitlines()) == 1
    assert not ray.is_initialized()


def test_a_bad_scale_family_entry_in_a_search_file_is_one_line(tmp_path: Path) -> None:
    from search.config import load_search_config

    path = tmp_path / "s.yaml"
    path.write_text("select:\n  scale_family: ['width=2', {depth: 0}]\n")
    with pytest.raises(ConfigError, match=r"^select.scale_family\[1\]: depth=0 is out of range"):
        load_search_config(path)
    path.write_text("select:\n  scale_family: ['width=0.5', {depth: 2, img_size: 32}]\n")
    assert load_search_config(path).select.scale_family == ["width=0.5", {"depth": 2, "img_size": 32}]
