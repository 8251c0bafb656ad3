"""The sampler over a search's space, and the typed spec of one trial.

:func:`suggest` is Optuna define-by-run. It proposes only valid models by construction: the
width is a multiple of 3 whenever SPE is on (its own parameter, ``embed_dim_spe``, so the
conditional is visible to the sampler), patch sizes divide the image size, and one
``blocks_stage<i>`` parameter exists per sampled stage. The width is sampled last, with its
upper end lowered to the widest model that meets the user's constraints (parameters, energy
per image), so almost every proposal is feasible; a proposal that cannot be made feasible (even
the narrowest width breaks a limit) is marked infeasible with the reason and never trains (the
trial records it and reports a dominated sentinel).

Each proposal, and each baseline, is a :class:`TrialSpec`: what the trial trains and what is
known of it before training. It travels in Tune's config as a plain dict (``to_dict``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from mixersnn.models.config import ConfigError
from search.config import TRAIN_KEYS, Baseline, ParamSpec, SearchConfig

__all__ = ["TrialSpec", "estimate", "suggest", "Sampler", "baseline_spec"]


@dataclass
class TrialSpec:
    """One trial: the model and hyperparameters it trains, and what is known before training.

    Attributes:
        arch: model overrides (embed_dim, depths, T, patch_size, mlp_ratio, spe).
        train: the sampled TrainConfig fields (lr, weight_decay, batch_size, label_smoothing).
        num_params: parameter count (closed form, exact).
        energy_uj_dense: energy per image with every spike-layer input firing (microjoules).
        energy_uj_est: the estimate the constraints were checked against.
        infeasible: the constraint it breaks (it never trains), or None.
        kind: "trial" (proposed by the sampler) or "baseline" (from the file's ``baselines:``).
        label: a baseline's label ("" for trials).
        model: registry variant; None: the search's ``base_model``.
        run_name: the run's name when fixed (baselines: ``<search>-baseline-<label>``); None:
            ``trial-<Tune trial id>``.
        distributions: the Optuna distributions of the sampled values (JSON), so the report
            can rebuild a study from MLflow alone.
        sampler: the Optuna sampler that proposed it, and, for a genetic one, the generation.
        sampler_generation: see ``sampler``.
    """

    arch: dict[str, Any]
    train: dict[str, Any]
    num_params: int
    energy_uj_dense: float
    energy_uj_est: float
    infeasible: Optional[str] = None
    kind: str = "trial"
    label: str = ""
    model: Optional[str] = None
    run_name: Optional[str] = None
    distributions: dict[str, str] = field(default_factory=dict)
    sampler: Optional[str] = None
    sampler_generation: Optional[int] = None

    @property
    def is_baseline(self) -> bool:
        return self.kind == "baseline"

    def name(self, trial_id: str) -> str:
        """The child run's name (also the Train run's): ``trial-<Tune trial id>``, or the name
        the baseline carries (baselines have no random id, so the search name keeps two
        searches in one experiment apart)."""
        return self.run_name or f"trial-{trial_id}"

    def describe(self) -> str:
        """One line for progress output."""
        a = self.arch
        if self.is_baseline:
            return f"{self.model} " + (" ".join(f"{k}={v}" for k, v in a.items()) or "(registry variant)")
        return (f"C={a.get('embed_dim')} d={a.get('depths')} T={a.get('T')} p={a.get('patch_size')} "
                f"spe={a.get('spe')}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialSpec":
        return cls(**d)


def baseline_spec(cfg: SearchConfig, b: Baseline) -> TrialSpec:
    """A baseline as a trial: its model and overrides, and each sampled hyperparameter from
    the baseline's ``train:``, else the space's constant, else the TrainConfig default."""
    from trainers.config import TrainConfig

    sp = cfg.space.params
    defaults = TrainConfig.from_dict({"model": b.model}).to_dict()
    train: dict[str, Any] = {}
    for k in TRAIN_KEYS:
        if k in b.train:
            train[k] = b.train[k]
        elif sp[k].choices is not None and len(sp[k].choices) == 1:
            train[k] = sp[k].choices[0]
        else:
            train[k] = defaults[k]
    est = estimate(cfg, dict(b.model_overrides), model=b.model)
    return TrialSpec(arch=dict(b.model_overrides), train=train, num_params=est["num_params"],
                     energy_uj_dense=est["energy_uj_dense"], energy_uj_est=est["energy_uj_est"], kind="baseline",
                     label=b.label, model=b.model, run_name=f"{cfg.name}-baseline-{b.label}")


# ---------------------------------------------------------------------------- estimates
def estimate(cfg: SearchConfig, arch: dict[str, Any], *, model: Optional[str] = None) -> dict[str, Any]:
    """Parameters and pre-training energy estimate of one architecture, and the constraint
    it breaks (``reason``, None when it meets every limit).

    Args:
        cfg: the search (data shape, base model, constraints).
        arch: model overrides (embed_dim, depths, T, patch_size, mlp_ratio, spe).
        model: registry variant; None: the search's ``base_model``.

    Returns:
        ``{"num_params", "energy_uj_dense", "energy_uj_est", "reason"}``.
    """
    from mixersnn.accounting import energy_report
    from mixersnn.models import model_config

    mc = model_config(model or cfg.base_model, img_size=cfg.shape.img_size, in_chans=cfg.shape.in_chans,
                      num_classes=cfg.shape.num_classes, **arch)
    n_params = mc.closed_form_num_params()
    rep = energy_report(mc)  # dense bound: every spike-layer input fires
    ac = rep.constants.ac_pj
    rate = float(cfg.constraints.assumed_firing_rate)
    dense_uj = rep.energy_pj * 1e-6
    est_uj = (rep.macs * rep.constants.mac_pj + rate * rep.sops * ac) * 1e-6
    c = cfg.constraints
    reason = None
    if c.max_params is not None and n_params > c.max_params:
        reason = f"num_params={n_params} > constraints.max_params={c.max_params}"
    elif c.max_energy_uj is not None and est_uj > c.max_energy_uj:
        how = "dense bound" if rate >= 1 else f"estimate at firing rate {rate:g}"
        reason = f"energy_per_image_uj={est_uj:.4g} ({how}) > constraints.max_energy_uj={c.max_energy_uj:g}"
    return {"num_params": n_params, "energy_uj_dense": dense_uj, "energy_uj_est": est_uj, "reason": reason}


# ---------------------------------------------------------------------------- sampler
def _width_range(spec: ParamSpec, spe: bool) -> list[int]:
    """Candidate stage-1 widths; multiples of 3 only when SPE is on."""
    ws = sorted(set(int(w) for w in spec.values()))
    return [w for w in ws if w % 3 == 0] if spe else ws


def suggest(trial: Any, cfg: SearchConfig) -> TrialSpec:
    """Define-by-run sampler: ask ``trial`` for one configuration of the space.

    Architecture first (SPE, stages, blocks per stage, T, patch size, channel ratio), then the
    width, restricted to the candidates that meet the constraints given the rest, then the
    training hyperparameters.

    Args:
        trial: an ``optuna.Trial`` (or Ray Tune's wrapper of one).
        cfg: the search.

    Returns:
        The proposal; ``infeasible`` holds the constraint it breaks, if any.
    """
    sp = cfg.space.params
    spe = bool(sp["spe"].sample(trial))
    stages = int(sp["num_stages"].sample(trial))
    depths = [int(sp["blocks_per_stage"].sample(trial, f"blocks_stage{i}")) for i in range(stages)]
    T = int(sp["T"].sample(trial))
    patch = int(sp["patch_size"].sample(trial))
    ratio = sp["mlp_ratio"].sample(trial)
    arch: dict[str, Any] = dict(depths=depths, T=T, patch_size=patch, mlp_ratio=ratio, spe=spe)

    # Width last: find the widest candidate within the constraints (cost grows with width),
    # then sample from the candidates up to it. The parameter is conditional on SPE (its own
    # name), because the candidates differ: multiples of 3 with SPE.
    cands = _width_range(sp["embed_dim"], spe)
    feasible = [w for w in cands if estimate(cfg, {**arch, "embed_dim": w})["reason"] is None]
    wname = "embed_dim_spe" if spe else "embed_dim_conv"
    infeasible: Optional[str] = None
    if feasible:
        hi = max(feasible)
        lo = min(cands)
        wspec = sp["embed_dim"]
        if wspec.is_range and not wspec.log:
            step = int(wspec.step or 1)
            step = step * 3 // math.gcd(step, 3) if spe else step
            lo = min(feasible)
            # Optuna's IntDistribution needs (high - low) % step == 0: a dynamic high that
            # stays on the grid; past values outside the range are handled by the sampler.
            width = lo if hi == lo else int(trial.suggest_int(wname, lo, lo + (hi - lo) // step * step, step=step))
        else:
            # Choices: the candidate list per parameter name is fixed (Optuna rejects changing
            # categorical choices), so an over-budget pick is clipped to the widest feasible
            # width below it (the study still sees the pick it made).
            width = int(trial.suggest_categorical(wname, cands)) if len(cands) > 1 else cands[0]
            width = max([w for w in feasible if w <= width] or [min(feasible)])
    else:
        width = min(cands)
        infeasible = estimate(cfg, {**arch, "embed_dim": width})["reason"]
    arch["embed_dim"] = width

    train = {k: sp[k].sample(trial) for k in TRAIN_KEYS}
    train["batch_size"] = int(train["batch_size"])
    est = estimate(cfg, arch)
    if infeasible is None:
        # The last gate before a trainer: the exact TrainConfig must validate.
        from trainers.config import TrainConfig

        try:
            TrainConfig.from_dict({**cfg.train, **train, "model": cfg.base_model, "data": cfg.data,
                                   "model_overrides": {"img_size": cfg.shape.img_size, "in_chans": cfg.shape.in_chans,
                                                       "num_classes": cfg.shape.num_classes, **arch}})
        except ConfigError as err:
            infeasible = f"invalid configuration: {err}"
    return TrialSpec(arch=arch, train=train, num_params=est["num_params"], energy_uj_dense=est["energy_uj_dense"],
                     energy_uj_est=est["energy_uj_est"], infeasible=infeasible)


class Sampler:
    """The define-by-run function handed to ``OptunaSearch(space=...)``.

    A picklable object, not a closure: Tune pickles the searcher (with its space) into the
    experiment checkpoint, and ``--resume`` unpickles it.
    """

    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Tune's config of the trial: ``{"resolved": TrialSpec.to_dict()}``."""
        import optuna

        spec = suggest(trial, self.cfg)
        # The distributions travel with the trial so the report can rebuild an Optuna study
        # from MLflow alone (for Optuna's plots), whichever driver process ran the trial.
        spec.distributions = {k: optuna.distributions.distribution_to_json(d) for k, d in trial.distributions.items()}
        # Which Optuna sampler proposed it (and, for a genetic sampler such as NSGA-II, in
        # which generation): the record shows the sampler in use, not only the one configured.
        study = getattr(trial, "study", None)
        if study is not None:
            sampler = study.sampler
            spec.sampler = type(sampler).__name__
            if hasattr(sampler, "get_trial_generation"):  # NSGA-II and the other genetic samplers
                frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
                spec.sampler_generation = sampler.get_trial_generation(study, frozen)
        return {"resolved": spec.to_dict()}

