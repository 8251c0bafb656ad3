"""The search space: YAML validation, the define-by-run sampler, constraints, Pareto logic.

No Ray, no MLflow: a real Optuna study drives the sampler.
"""

from __future__ import annotations

from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from mixersnn.models import ConfigError, model_config  # noqa: E402
from search.config import load_search_config  # noqa: E402
from search.space import Sampler, TrialSpec, estimate, suggest  # noqa: E402
from search.tracking import TrialRow, pareto_front, select_best  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "search.yaml"
    p.write_text(text)
    return p


def _sample(cfg, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=n))
    out = []
    for _ in range(n):
        t = study.ask()
        r = Sampler(cfg)(t)["resolved"]
        study.tell(t, [0.5, r["energy_uj_est"]])
        out.append(r)
    return out


@pytest.mark.parametrize("name", ["search_fashion_mnist.yaml", "search_fashion_mnist_60min.yaml"])
def test_shipped_config_loads_and_samples_only_valid_models(name: str) -> None:
    cfg = load_search_config(REPO / "configs" / name)
    assert cfg.shape.img_size == 28 and cfg.budget.num_trials >= 1
    for r in _sample(cfg, 60):
        a = r["arch"]
        assert len(a["depths"]) in cfg.space["num_stages"].values()
        assert 28 % a["patch_size"] == 0
        if a["spe"]:
            assert a["embed_dim"] % 3 == 0, a
        # Every proposal builds, and meets the constraints unless flagged infeasible.
        mc = model_config(cfg.base_model, img_size=28, in_chans=1, num_classes=10, **a)
        assert mc.closed_form_num_params() == r["num_params"]
        if r["infeasible"] is None:
            assert r["num_params"] <= cfg.constraints.max_params
            assert r["energy_uj_est"] <= cfg.constraints.max_energy_uj
            TrainConfig.from_dict({**cfg.train, **r["train"], "model": cfg.base_model, "model_overrides": a})
        # Optuna's own record holds the conditional width parameter matching SPE.
        wnames = {k for k in r["distributions"] if k.startswith("embed_dim")}
        assert wnames <= {"embed_dim_spe" if a["spe"] else "embed_dim_conv"}


def test_width_is_bounded_by_the_constraints(tmp_path: Path) -> None:
    # A parameter cap that only narrow models meet: the sampler lowers the width's upper end
    # instead of proposing models that would be rejected.
    cap = 20000
    cfg = load_search_config(_write(tmp_path, f"""
space: {{spe: [true, false], num_stages: 2, blocks_per_stage: 1, embed_dim: {{low: 6, high: 48, step: 6}}, T: [1, 2], patch_size: 7}}
constraints: {{max_params: {cap}}}
"""))
    rs = _sample(cfg, 25)
    assert all(r["infeasible"] is None and r["num_params"] <= cap for r in rs)
    assert max(r["arch"]["embed_dim"] for r in rs) < 48


def test_unmeetable_constraint_marks_trial_infeasible(tmp_path: Path) -> None:
    # T=2 at the narrowest width breaks the energy cap, T=1 meets it: T=2 proposals are
    # flagged with the reason (they never reach a trainer), T=1 ones are not.
    base = dict(embed_dim=6, depths=[1, 1], patch_size=7, mlp_ratio=3, spe=False)
    probe = load_search_config(None)
    e1 = estimate(probe, {**base, "T": 1})["energy_uj_dense"]
    e2 = estimate(probe, {**base, "T": 2})["energy_uj_dense"]
    cap = (e1 + e2) / 2
    cfg = load_search_config(_write(tmp_path, f"""
space: {{spe: false, num_stages: 2, blocks_per_stage: 1, embed_dim: {{low: 6, high: 12, step: 6}}, mlp_ratio: 3, T: [1, 2], patch_size: 7}}
constraints: {{max_energy_uj: {cap}}}
"""))
    rs = _sample(cfg, 20)
    assert {r["arch"]["T"] for r in rs} == {1, 2}
    for r in rs:
        if r["arch"]["T"] == 2:
            assert r["infeasible"] and "max_energy_uj" in r["infeasible"] and "dense bound" in r["infeasible"]
        else:
            assert r["infeasible"] is None and r["energy_uj_est"] <= cap


def test_assumed_firing_rate_admits_larger_models(tmp_path: Path) -> None:
    text = """
space: {{spe: true, num_stages: 2, blocks_per_stage: 1, embed_dim: 24, T: 4, patch_size: 4}}
constraints: {{max_energy_uj: {cap}, assumed_firing_rate: {rate}}}
"""
    arch = dict(embed_dim=24, depths=[1, 1], T=4, patch_size=4, mlp_ratio=3, spe=True)
    dense = estimate(load_search_config(None), arch)["energy_uj_dense"]
    with pytest.raises(ConfigError, match="smallest model"):
        load_search_config(_write(tmp_path, text.format(cap=dense / 2, rate=1.0)))
    cfg = load_search_config(_write(tmp_path, text.format(cap=dense / 2, rate=0.2)))
    assert estimate(cfg, arch)["reason"] is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("space: {patch_size: [4, 5]}", r"space.patch_size=5: img_size=28 is not divisible by patch_size=5"),
        ("space: {T: [1, 65]}", r"space.T=65: T=65 is out of range: use 1 <= T <= 64"),
        ("space: {num_stages: [0, 2]}", r"space.num_stages=0: depths=\(\) is empty"),
        ("space: {batch_size: [0, 64]}", r"space.batch_size=0: batch_size=0 must be an integer >= 1"),
        ("space: {label_smoothing: {low: 0.0, high: 1.0}}", r"space.label_smoothing=1.0: label_smoothing=1.0 must be in"),
        ("space: {spe: true, embed_dim: {low: 10, high: 11}}", r"multiple of 3"),
        ("space: {lr: {low: 0, high: 0.1, log: true}}", r"log scale needs low > 0"),
        ("space: {lr: {low: 0.1, high: 0.01}}", r"low=0.1 > high=0.01"),
        ("space: {depth: 3}", r"unknown space parameters \['depth'\]"),
        ("space: {T: [1, 2.5]}", r"space.T=.*must hold integers"),
        ("space: {mlp_ratio: 2.5, embed_dim: 13, spe: false}", r"non-integer hidden width"),
        ("train: {lr: 0.1}", r"set by the search"),
        ("train: {epochs: 0}", r"epochs=0 must be an integer >= 1"),
        ("objective: {mode: pareto}", r"objective.mode='pareto'"),
        ("objective: {mode: single, include_params: true}", r"include_params=true needs mode: multi"),
        ("budget: {num_trials: 0}", r"num_trials=0"),
        ("constraints: {max_params: 10}", r"smallest model in the space"),
        ("constraints: {assumed_firing_rate: 0}", r"assumed_firing_rate=0"),
        ("select: {criterion: best}", r"criterion='best'"),
        ("scale: {cpus_per_worker: 0}", r"cpus_per_worker=0"),
        ("scale: {use_gpu: true, gpus_per_worker: 0}", r"scale: gpus_per_worker=0 must be > 0 .*fraction in \(0, 1\)"),
        ("scale: {use_gpu: true, gpus_per_worker: 1.5}", r"scale: gpus_per_worker=1.5 cannot be scheduled.*use 1 or 2"),
        ("scale: {use_gpu: true, gpus_per_worker: 0.5, num_workers: 2}", r"num_workers=2: .*use whole GPUs"),
        ("budget: {autoscale_wait_s: 0}", r"budget.autoscale_wait_s=0 must be a number of seconds > 0"),
        ("budget: {autoscale_wait_s: soon}", r"budget.autoscale_wait_s='soon' is not a number"),
        ("searchspace: {}", r"unknown top-level keys \['searchspace'\]"),
        ("baselines: mlp_spe_t", r"'baselines:' must be a list"),
        ("baselines: [{model: mlp_xl}]", r"model='mlp_xl' is not registered; choose one of"),
        ("baselines: [{model: mlp_spe_t, label: 'a b'}]", r"label='a b' must be 1-60 letters"),
        ("baselines: [{model: mlp_spe_t, train: {epochs: 9}}]", r"train keys \['epochs'\] cannot be set per baseline"),
        ("baselines: [{model: mlp_spe_t, model_overrides: {img_size: 32}}]", r"\['img_size'\] are set by the data"),
        ("baselines: [{model: mlp_spe_t, model_overrides: {embed_dim: 25}}]", r"baselines\[0\].*multiple of 3"),
        ("baselines: [mlp_spe_t, mlp_spe_t]", r"labels \['mlp_spe_t'\] appear more than once"),
    ],
)
def test_validation_errors_name_the_value_and_the_fix(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_search_config(_write(tmp_path, text))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_search_config(tmp_path / "nope.yaml")


def _row(i: int, acc, energy, status="ok", params=1000) -> TrialRow:
    return TrialRow(run_id=f"r{i}", trial_id=f"t{i}", status=status, test_acc=acc, energy_uj=energy,
                    num_params=params, epochs=1)


def test_pareto_front_and_selection() -> None:
    rows = [
        _row(0, 0.80, 1.0), _row(1, 0.85, 2.0), _row(2, 0.84, 3.0),  # 2 dominated by 1
        _row(3, 0.70, 0.5), _row(4, 0.90, 5.0, params=10),
        _row(5, None, 0.1, status="failed"), _row(6, None, 0.01, status="infeasible"),
    ]
    front = pareto_front(rows)
    assert [r.trial_id for r in front] == ["t3", "t0", "t1", "t4"]
    # With parameters as a third objective nothing new is dominated here, 2 still is.
    assert "t2" not in {r.trial_id for r in pareto_front(rows, with_params=True)}
    assert select_best(rows, "max_acc", None).trial_id == "t4"
    assert select_best(rows, "max_acc", 2.5).trial_id == "t1"
    assert select_best(rows, "knee", None).trial_id in {"t0", "t1"}
    assert select_best(rows, "max_acc", 0.01) is None


def test_baselines_are_off_the_front_and_the_registry_but_compared() -> None:
    from search.space import baseline_spec
    from search.tracking import compare_baselines, format_comparison

    rows = [_row(0, 0.80, 1.0), _row(1, 0.85, 2.0), _row(2, 0.70, 0.5)]
    big = TrialRow(run_id="b0", trial_id="x", status="ok", test_acc=0.82, energy_uj=50.0, num_params=10**7, epochs=1,
                   kind="baseline", label="paper")
    cheap = TrialRow(run_id="b1", trial_id="y", status="ok", test_acc=0.99, energy_uj=0.1, num_params=10, epochs=1,
                     kind="baseline", label="oracle")
    rows += [big, cheap]
    front = pareto_front(rows)
    assert {r.trial_id for r in front} == {"t0", "t1", "t2"}  # "oracle" would dominate them all
    assert select_best(rows, "max_acc", None).trial_id == "t1"
    comps = {c["label"]: c for c in compare_baselines(rows, front)}
    assert comps["paper"]["dominated_by"] == 1 and comps["paper"]["by"]["trial_id"] == "t1"
    assert comps["oracle"]["by"] is None
    text = format_comparison(list(comps.values()))
    assert "paper" in text and "dominated by trial t1" in text and "oracle" in text and "not dominated" in text
    # The shipped baselines: the paper's MLP-SPE-T at 28 px and the scaled-down one.
    cfg = load_search_config(REPO / "configs" / "search_fashion_mnist.yaml")
    res = {b.label: baseline_spec(cfg, b) for b in cfg.baselines}
    assert res["mlp_spe_t-28px"].num_params == model_config("mlp_spe_t", img_size=28, in_chans=1,
                                                           num_classes=10).closed_form_num_params()
    assert res["mlp_spe_t-C24"].num_params == 845222 and res["mlp_spe_t-C24"].train["lr"] == 0.003
    assert all(r.is_baseline and r.infeasible is None for r in res.values())  # no constraints
    assert [b.estimate_only for b in cfg.baselines] == [True, False]


def test_suggest_is_a_plain_define_by_run_function() -> None:
    cfg = load_search_config(REPO / "configs" / "search_fashion_mnist.yaml")
    study = optuna.create_study()
    t = study.ask()
    r = suggest(t, cfg)
    assert isinstance(r, TrialSpec) and r.kind == "trial" and r.infeasible is None and r.num_params > 0
    assert set(r.arch) == {"spe", "depths", "T", "patch_size", "mlp_ratio", "embed_dim"}
    assert set(r.train) == {"lr", "weight_decay", "batch_size", "label_smoothing"}
    assert TrialSpec.from_dict(r.to_dict()) == r
    assert set(t.params) >= {"spe", "T", "lr", "weight_decay"}


def test_fractional_gpu_scale_validates_and_sets_the_auto_concurrency() -> None:
    from search.resources import concurrency, trial_bundles

    cfg = load_search_config(None, scale={"use_gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 0.45},
                             budget={"autoscale_wait_s": "30"})
    assert cfg.budget.max_concurrent_trials == "auto" and cfg.budget.autoscale_wait_s == 30
    assert trial_bundles(cfg.scale) == [{"CPU": 0.01}, {"CPU": 0.45, "GPU": 0.25}]
    assert concurrency(cfg.scale, [{"CPU": 16, "GPU": 2}]) == 8        # 2 GPUs / 0.25
    assert concurrency(cfg.scale, [{"CPU": 2, "GPU": 2}]) == 4         # capped by CPUs: 2 / 0.46
    assert concurrency(cfg.scale, [{"CPU": 8}, {"GPU": 1}]) == 0       # no node holds a worker
    assert concurrency(cfg.scale, [{"CPU": 0}]) == 0                   # a cluster scaling from zero
    # Whole GPUs, several workers: workers per node add up, trials need all their workers.
    multi = {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 4}
    assert concurrency(multi, [{"CPU": 96, "GPU": 8}] * 2) == 8


def test_gpu_cluster_config_fits_the_cluster_yaml_gpu_nodes(fmnist_shards: Path) -> None:
    """configs/search_gpu_cluster.yaml as shipped, against the cluster it is for.

    Its data is an s3:// prefix whose manifest load_search_config would read; here the same
    Fashion-MNIST shards come from a local folder (no network; reading shards from S3 is
    tested in test_data_s3.py). Everything else is the file as shipped.
    """
    import yaml

    from search.resources import concurrency, trial_bundles
    from trainers.ray_train import scaling_config

    path = REPO / "configs" / "search_gpu_cluster.yaml"
    raw = yaml.safe_load(path.read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    # Where cluster.yaml puts things: shards in the bucket, state on the EFS mount every node
    # sees, MLflow on the head's port 5000.
    assert raw["data"].startswith("s3://REPLACE_BUCKET/datasets/")
    assert raw["storage_path"].startswith("/mnt/shared/runs")
    assert raw["tracking_uri"] == "http://HEAD_PRIVATE_IP:5000"
    assert "--port 5000" in " ".join(cluster["head_start_ray_commands"])

    cfg = load_search_config(path, data=str(fmnist_shards))
    assert cfg.shape.img_size == 28 and cfg.scale["use_gpu"] is True and cfg.scale["gpus_per_worker"] == 0.25
    from trainers.config import ScaleConfig

    sc = scaling_config(ScaleConfig(**cfg.scale))
    assert sc.resources_per_worker == {"CPU": 1.5, "GPU": 0.25} and sc.num_workers == 1
    assert trial_bundles(cfg.scale) == [{"CPU": 0.01}, {"CPU": 1.5, "GPU": 0.25}]
    # The search runs on the gpu_1x nodes: 4 trials per node, and max_concurrent_trials is
    # what auto would count on the largest cluster cluster.yaml allows.
    node = cluster["available_node_types"]["gpu_1x"]
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    assert concurrency(cfg.scale, [head]) == 0, "no trial on the head"
    assert concurrency(cfg.scale, [head, node["resources"]]) == 4
    largest = [head] + [node["resources"]] * node["max_workers"]
    assert concurrency(cfg.scale, largest) == cfg.budget.max_concurrent_trials == 32
    for a in (r["arch"] for r in _sample(cfg, 20)):
        assert 28 % a["patch_size"] == 0


@pytest.mark.parametrize("flags, match", [
    (["--num-trials", "0"], r"budget.num_trials=0 must be an integer >= 1 \(--num-trials\)"),
    (["--max-concurrent-trials", "0"], r"budget.max_concurrent_trials=0 must be 'auto' or an integer >= 1"),
    (["--time-budget-s", "-5"], r"budget.time_budget_s=-5.0 must be a number of seconds > 0"),
])
def test_bad_command_line_budgets_are_refused_before_ray_starts(flags: list, match: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import re
    import sys

    from mixersnn.cli import main

    assert main(["search", "--storage-path", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "runs").exists()  # nothing created
