"""A search, declared once in a YAML file: the schema, its defaults and its checks.

A search file has these sections (every one optional; see ``configs/search_fashion_mnist.yaml``)::

    name, experiment, data, tracking_uri, storage_path, base_model, seed
    objective:   mode (multi | single), include_params, sampler (nsga2 | tpe), storage
                 (the Optuna study's database URL)
    budget:      num_trials, time_budget_s, max_concurrent_trials (an int or "auto"),
                 autoscale_wait_s
    asha:        enabled, grace_period, reduction_factor   (successive halving over epochs:
                 ASHA in single mode, MO-ASHA in multi mode)
    constraints: max_params, max_energy_uj, assumed_firing_rate
    space:       spe, num_stages, blocks_per_stage, embed_dim, mlp_ratio, T, patch_size,
                 lr, weight_decay, batch_size, label_smoothing
    train:       fixed TrainConfig fields for every trial (epochs, samples_per_epoch, ...)
    scale:       num_workers, cpus_per_worker, use_gpu, gpus_per_worker per trial, and
                 in_process (auto | true | false: where one-worker trials train)
    select:      which finished trial is registered (criterion, max_energy_uj, registered_model)
    baselines:   fixed reference models, compared with the Pareto front (list of {model,
                 label, model_overrides, train, estimate_only}): trained as the experiment's
                 first trials with the trials' schedule, or (estimate_only) never trained
    mode:        trials (each candidate trained, the default) or oneshot (a weight-sharing
                 supernet trained once, subnets scored on it, finalists retrained)
    oneshot:     the one-shot mode's supernet space, training, scoring and finalists
    prescreen:   zero-cost pre-screen of trial candidates (SNASNet's Hamming-kernel score)

Each ``space`` entry is a constant, a list of choices, or ``{low, high[, step][, log]}``.
Keys left out take defaults that fit the data set's image size (:func:`default_space`).
:func:`load_search_config` reads a file into :class:`SearchConfig` and checks every value
before anything starts; the sampler over the space is :mod:`search.space`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mixersnn.models.config import ConfigError, from_known_keys

__all__ = [
    "ParamSpec",
    "SearchSpace",
    "Objective",
    "Budget",
    "Asha",
    "Constraints",
    "Select",
    "Baseline",
    "OneShot",
    "Prescreen",
    "SearchConfig",
    "DataShape",
    "default_space",
    "data_shape",
    "load_search_config",
    "ARCH_KEYS",
    "TRAIN_KEYS",
]

# Parameters of the space and whether they must be integers.
ARCH_KEYS = ("spe", "num_stages", "blocks_per_stage", "embed_dim", "mlp_ratio", "T", "patch_size")
TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "label_smoothing")
_INT_KEYS = {"num_stages", "blocks_per_stage", "embed_dim", "T", "patch_size", "batch_size"}
# TrainConfig fields the search itself owns; the ``train:`` section may not set them.
_SEARCH_OWNED = set(TRAIN_KEYS) | {"model", "model_overrides", "data", "tracking_uri", "experiment",
                                    "run_name", "parent_run_id"}


def _num(v: Any, where: str) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: accept numeric strings, name anything else."""
    if isinstance(v, bool) or isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            raise ConfigError(f"{where}={v!r} is not a number; write e.g. 0.001 or 1.0e-3") from None
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    raise ConfigError(f"{where}={v!r} must be a number")


@dataclass(frozen=True)
class ParamSpec:
    """One searchable value: a constant, a set of choices, or a numeric range.

    Attributes:
        name: parameter name (also the Optuna parameter name).
        choices: the allowed values (a constant is one choice).
        low: range start (inclusive).
        high: range end (inclusive).
        step: grid step of the range (integers: default 1).
        log: sample the range on a log scale.
    """

    name: str
    choices: Optional[tuple[Any, ...]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False

    @classmethod
    def parse(cls, name: str, raw: Any) -> "ParamSpec":
        """Read a YAML value: ``3``, ``[2, 3]``, ``{choices: [...]}`` or ``{low, high, step, log}``."""
        where = f"space.{name}"
        if isinstance(raw, dict):
            extra = sorted(set(raw) - {"low", "high", "step", "log", "choices"})
            if extra:
                raise ConfigError(f"{where}: unknown keys {extra}; use choices: [...] or low/high[/step][/log]")
            if "choices" in raw:
                return cls.parse(name, list(raw["choices"]))
            if "low" not in raw or "high" not in raw:
                raise ConfigError(f"{where}={raw!r} needs both low and high (or choices: [...])")
            low, high = _num(raw["low"], f"{where}.low"), _num(raw["high"], f"{where}.high")
            step = None if raw.get("step") is None else _num(raw["step"], f"{where}.step")
            log = bool(raw.get("log", False))
            if low > high:
                raise ConfigError(f"{where}: low={low} > high={high}; swap them")
            if log and low <= 0:
                raise ConfigError(f"{where}: log scale needs low > 0, got low={low}; use e.g. 1.0e-5")
            if log and step is not None:
                raise ConfigError(f"{where}: step and log cannot be combined (Optuna forbids it); drop one")
            if step is not None and step <= 0:
                raise ConfigError(f"{where}: step={step} must be > 0")
            if name in _INT_KEYS:
                for k, v in (("low", low), ("high", high), ("step", step)):
                    if v is not None and not float(v).is_integer():
                        raise ConfigError(f"{where}.{k}={v} must be an integer")
                low, high = int(low), int(high)
                step = int(step) if step is not None else (None if log else 1)
            return cls(name, None, low, high, step, log)
        values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        if not values:
            raise ConfigError(f"{where}=[] has no choices; give at least one value")
        if name == "spe":
            if not all(isinstance(v, bool) for v in values):
                raise ConfigError(f"{where}={raw!r} must be true, false or [true, false]")
        else:
            values = [_num(v, where) for v in values]
            if name in _INT_KEYS and not all(float(v).is_integer() for v in values):
                raise ConfigError(f"{where}={raw!r} must hold integers")
            if name in _INT_KEYS:
                values = [int(v) for v in values]
        return cls(name, tuple(dict.fromkeys(values)))

    # ------------------------------------------------------------------ views
    @property
    def is_range(self) -> bool:
        return self.choices is None

    def values(self) -> list[Any]:
        """Every value this spec can produce (ranges of integers enumerated; float ranges: ends)."""
        if self.choices is not None:
            return list(self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int) and not self.log:
            return list(range(self.low, self.high + 1, int(self.step or 1)))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return list(range(self.low, self.high + 1))
        return [self.low, self.high]

    def to_yaml(self) -> Any:
        if self.choices is not None:
            return list(self.choices) if len(self.choices) > 1 else self.choices[0]
        d: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.step is not None:
            d["step"] = self.step
        if self.log:
            d["log"] = True
        return d

    def sample(self, trial: Any, name: Optional[str] = None) -> Any:
        """Ask Optuna for a value (constants are not sampled, so they stay out of the study)."""
        name = name or self.name
        if self.choices is not None:
            if len(self.choices) == 1:
                return self.choices[0]
            return trial.suggest_categorical(name, list(self.choices))
        if self.low == self.high:
            return self.low
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class DataShape:
    """What the search needs to know about the data before any trial starts."""

    img_size: int
    in_chans: int
    num_classes: int


def data_shape(data: str) -> DataShape:
    """Image size, channels and classes of ``data`` ("fashion-mnist" or a shard folder)."""
    if data == "fashion-mnist":
        return DataShape(28, 1, 10)
    from trainers.loop import resolve_data

    spec = resolve_data(data)
    return DataShape(spec.img_size, spec.in_chans, spec.num_classes)


def default_space(img_size: int) -> dict[str, ParamSpec]:
    """Defaults that fit the image size: small images get small, shallow, cheap models.

    Small inputs (<= 64 px, e.g. 28-px Fashion-MNIST, 32-px CIFAR) search widths 12-36,
    2-3 stages of 1-2 blocks and T 1-4, the budget of a laptop; larger inputs search
    around the paper's variants (4 stages, widths 48-96, T 2-6).
    """
    patches = [p for p in (2, 4, 7, 8, 14, 16) if img_size % p == 0 and img_size // p >= 2]
    if img_size <= 64:
        raw: dict[str, Any] = {
            "spe": [True, False],
            "num_stages": [2, 3],
            "blocks_per_stage": {"low": 1, "high": 2},
            "embed_dim": {"low": 12, "high": 36, "step": 6},
            "mlp_ratio": [2, 3],
            "T": {"low": 1, "high": 4},
            "patch_size": [p for p in patches if p >= 4][:2] or patches[:1] or [1],
            "lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "weight_decay": {"low": 1e-4, "high": 5e-2, "log": True},
            "batch_size": [64, 128],
            "label_smoothing": {"low": 0.0, "high": 0.15},
        }
    else:
        raw = {
            "spe": [True, False],
            "num_stages": [4],
            "blocks_per_stage": {"low": 1, "high": 4},
            "embed_dim": {"low": 48, "high": 96, "step": 6},
            "mlp_ratio": [3],
            "T": {"low": 2, "high": 6},
            "patch_size": [4] if img_size % 4 == 0 else patches[:1] or [1],
            "lr": {"low": 5e-4, "high": 5e-3, "log": True},
            "weight_decay": {"low": 1e-3, "high": 1e-1, "log": True},
            "batch_size": [64, 128],
            "label_smoothing": {"low": 0.0, "high": 0.2},
        }
    return {k: ParamSpec.parse(k, v) for k, v in raw.items()}


@dataclass(frozen=True)
class SearchSpace:
    """All searchable parameters (architecture and training), one :class:`ParamSpec` each."""

    params: dict[str, ParamSpec]

    def __getitem__(self, key: str) -> ParamSpec:
        return self.params[key]

    def to_yaml(self) -> dict[str, Any]:
        return {k: v.to_yaml() for k, v in self.params.items()}


@dataclass(frozen=True)
class Objective:
    """What the search optimises.

    Attributes:
        mode: "multi" (Pareto front of accuracy vs energy per image [vs parameters], no
            early stopping: Optuna ignores intermediate values with several objectives) or
            "single" (accuracy only, ASHA stops weak trials between epochs).
        include_params: add the parameter count as a third objective (multi mode).
        sampler: "nsga2" (NSGA-II) or "tpe" (Optuna's TPE; multi-objective TPE in multi mode).
        population_size: NSGA-II generation size.
        storage: the Optuna study's database (an SQLAlchemy URL: ``sqlite:////abs/optuna.db``,
            ``postgresql://user:pass@host/db``, ...), where every trial the sampler proposes
            and learns from is recorded as it happens, so ``optuna-dashboard URL`` shows the
            study live and ``--resume`` after a killed driver loads the sampler's history from
            it; the study is named after the search. None: ``sqlite:///<storage_path>/<name>/optuna.db``,
            beside the search's Tune state (:meth:`SearchConfig.optuna_storage`).
        startup_trials: TPE's random trials before it starts modelling; None: a third of
            the trial budget, between 2 and 8.
    """

    mode: str = "multi"
    include_params: bool = False
    sampler: str = "tpe"
    population_size: int = 8
    startup_trials: Optional[int] = None
    storage: Optional[str] = None

    def metrics(self, acc: str = "test_acc") -> tuple[list[str], list[str]]:
        """Tune metric names and modes; ``acc`` names the accuracy ranked on
        (:attr:`SearchConfig.acc_metric`)."""
        if self.mode == "single":
            return [acc], ["max"]
        names, modes = [acc, "energy_per_image_uj"], ["max", "min"]
        if self.include_params:
            names.append("num_params")
            modes.append("min")
        return names, modes


@dataclass(frozen=True)
class Budget:
    """How much search to run.

    Attributes:
        num_trials: trials to sample in total (Tune's ``num_samples``).
        time_budget_s: wall-clock cap for the whole search (running trials stop), or None.
        max_concurrent_trials: trials at once; "auto" fits as many as the cluster's CPUs
            (and GPUs) hold given the per-trial ``scale``, counted once when the search
            starts. On a cluster that cannot hold one trial yet (autoscaling from zero) it
            asks the autoscaler for one trial's resources and waits for them first.
        autoscale_wait_s: how long "auto" waits for the first trial's resources before it
            gives up with an error (seconds).
    """

    num_trials: int = 12
    time_budget_s: Optional[float] = None
    max_concurrent_trials: Union[int, str] = "auto"
    autoscale_wait_s: float = 600.0


@dataclass(frozen=True)
class Asha:
    """Successive halving over epochs: trials start small and the promising ones go on.

    Rungs sit at ``grace_period * reduction_factor**k`` epochs below ``train.epochs``. In
    single-objective mode Ray's ASHA ranks by accuracy; in multi-objective mode MO-ASHA
    (:mod:`search.scheduler`) ranks by non-dominated sorting of the objectives with an
    epsilon-net tie-break that spreads the promoted trials along the front.

    Attributes:
        enabled: stop the trials that rank in the bottom at a rung (false: every trial runs
            every epoch).
        grace_period: epochs every trial gets before it can be stopped.
        reduction_factor: keep the best 1/reduction_factor at each rung.
    """

    enabled: bool = True
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class Constraints:
    """User limits, enforced before any training.

    Attributes:
        max_params: largest parameter count (closed form, exact), or None.
        max_energy_uj: largest energy per image in microjoules, or None. Before training it
            is checked against an estimate: MACs of the real-input layers plus
            ``assumed_firing_rate`` x the dense synaptic operations. With the default rate 1.0
            the estimate is the dense upper bound (every input spikes), so a model that passes
            is guaranteed to meet the limit; a lower rate (measured rates are typically
            0.1-0.3) admits larger models, and the measured energy after training is checked
            again (a trial over the limit is tagged and never registered).
        assumed_firing_rate: input firing rate of spiking layers for the estimate, in (0, 1].
    """

    max_params: Optional[int] = None
    max_energy_uj: Optional[float] = None
    assumed_firing_rate: float = 1.0


@dataclass(frozen=True)
class Select:
    """Which finished trial is registered in the MLflow model registry.

    Attributes:
        criterion: "max_acc" (the most accurate trial with measured energy <= max_energy_uj
            when that is set) or "knee" (the Pareto point closest to the ideal corner after
            normalising accuracy and log-energy to [0, 1]).
        max_energy_uj: energy cap for "max_acc" (measured energy), or None.
        registered_model: registry name; None: ``<search name>-best``.
        scale_family: sizes to train the selected trial at as the search's last step
            (``search.family``): a list of scales, each ``"width=2,depth=1.5"`` or a mapping
            of ``width``/``depth``/``img_size``; None: none.
    """

    criterion: str = "max_acc"
    max_energy_uj: Optional[float] = None
    registered_model: Optional[str] = None
    scale_family: Optional[list[Any]] = None


@dataclass(frozen=True)
class Baseline:
    """A fixed reference model, trained once with the search's own ``train:`` config, ``scale``
    and per-trial budget, so it is comparable with the trials (e.g. the paper's MLP-SPE-T at
    the data's image size). Constraints are not applied to baselines (a reference may be far
    over any limit); they are never on the Pareto front and never registered.

    Attributes:
        model: registry name (``mlp_spe_t``, ...); the data sets image size, channels, classes.
        label: its name in the tables, the plot and the run name (letters, digits, ``.``,
            ``_``, ``-``); default: the model name.
        model_overrides: model fields changed from the registry variant (e.g. ``embed_dim``,
            ``depths``, ``T``).
        train: values of the hyperparameters the search samples for trials (``lr``,
            ``weight_decay``, ``batch_size``, ``label_smoothing``); each one not given takes
            the space's value when the space holds a constant, else the TrainConfig default.
        estimate_only: do not train it: the report gives its parameter count and dense-bound
            energy (a reference too costly to train in the search's budget, such as the
            paper's 24.5M-parameter MLP-SPE-T).
    """

    model: str
    label: str
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    estimate_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "label": self.label, "model_overrides": dict(self.model_overrides),
                "train": dict(self.train), "estimate_only": self.estimate_only}


@dataclass(frozen=True)
class OneShot:
    """The one-shot mode (``mode: oneshot``, :mod:`search.oneshot`): a weight-sharing supernet
    is trained once (sandwich rule, through Ray Train), its subnets are scored in seconds each
    (BatchNorm recalibrated on training images, accuracy on held-out training shards, energy
    from measured firing rates) by Optuna's samplers with evaluations fanned out as Ray tasks,
    and the front's finalists are retrained stand-alone as the search's trials.

    Attributes:
        space: the supernet's choices (:class:`mixersnn.models.SupernetSpace`): ``embed_dims``
            (stage-1 widths; multiples of 3 with SPE; every stage doubles) or instead
            ``widths`` (per stage, the widths allowed; multiples of 3 after the first stage
            with SPE), ``depths`` (per stage, the block counts allowed), ``mlp_ratios``, ``Ts``.
            Patch size and SPE come from ``base_model``.
        train: TrainConfig fields of the supernet run, over the search's ``train:`` (e.g.
            ``time_budget_s``, ``epochs``, ``lr``, ``sandwich_random``).
        holdout_shards: the last N shards of the training split: the supernet never trains on
            them and subnets are ranked on them (the test split is never used for selection).
        calib_images: training images that re-estimate each subnet's BatchNorm statistics.
        eval_images: held-out images each subnet is scored on; None: every held-out image.
        num_evals: subnets the sampler proposes and scores.
        parallel: evaluations in flight at once, each a Ray task.
        cpus_per_eval: CPUs each evaluation task reserves.
        finalists: subnets of the scored front retrained stand-alone (spread along the front).
        finalist_train: TrainConfig fields of each finalist's retraining, over ``train:``.
    """

    space: dict[str, Any] = field(default_factory=lambda: {
        "embed_dims": [12, 18, 24], "depths": [[1], [1], [1, 2], [1]], "mlp_ratios": [2, 3], "Ts": [1, 2, 3]})
    train: dict[str, Any] = field(default_factory=dict)
    holdout_shards: int = 1
    calib_images: int = 512
    eval_images: Optional[int] = 2000
    num_evals: int = 120
    parallel: int = 2
    cpus_per_eval: float = 1.0
    finalists: int = 3
    finalist_train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prescreen:
    """Zero-cost pre-screen of the trial mode's candidates (:mod:`mixersnn.accounting.zero_cost`).

    Each proposed candidate is scored before it trains by SNASNet's sparsity-aware
    Hamming-kernel score (one batch through the untrained network, no training); a candidate
    scoring in the lowest ``drop_fraction`` of the candidates scored so far never trains
    (its run is recorded as ``screened``). The report gives the score's rank correlation
    with trained accuracy on the search's own trials, so users see whether it helps on their
    data.

    Attributes:
        enabled: score and screen candidates.
        drop_fraction: share of candidates, by score, that never train, in [0, 1).
        warmup: candidates scored (and all trained) before screening starts.
        batch_size: training images in the scoring batch.
    """

    enabled: bool = False
    drop_fraction: float = 0.3
    warmup: int = 4
    batch_size: int = 64


@dataclass(frozen=True)
class SearchConfig:
    """One search, read from YAML (:func:`load_search_config`).

    Attributes:
        name: the search's name: Tune experiment folder and parent MLflow run name; the same
            name resumes (``--resume``).
        experiment: MLflow experiment (``mixersnn search``: ``$MLFLOW_EXPERIMENT_NAME`` when set
            and neither the YAML nor ``--experiment`` names one).
        data: "fashion-mnist" or a shard folder with train/ and test/.
        tracking_uri: MLflow URI; None: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db``.
        storage_path: where Tune and Train keep their state (``<storage>/<name>``).
        base_model: registry variant whose non-searched fields (neuron) every trial starts from.
        seed: sampler seed.
        space: the searchable parameters.
        objective, budget, asha, constraints, select: see their classes.
        train: fixed TrainConfig fields (epochs, max_steps_per_epoch, optimizer, ...).
        scale: per-trial ScaleConfig fields (num_workers, cpus_per_worker, use_gpu, ...).
        shape: image size, channels and classes of the data.
        baselines: reference models, trained as the search's first trials or estimated only
            (see :class:`Baseline`).
        mode: "trials" (every candidate trains; successive halving) or "oneshot" (see
            :class:`OneShot`).
        oneshot: the one-shot mode's settings.
        prescreen: the zero-cost pre-screen (see :class:`Prescreen`).
    """

    name: str = "search"
    experiment: str = "mixersnn-search"
    data: str = "fashion-mnist"
    tracking_uri: Optional[str] = None
    storage_path: str = "runs/search"
    base_model: str = "mlp_spe_t"
    seed: int = 0
    space: SearchSpace = field(default_factory=lambda: SearchSpace(default_space(28)))
    objective: Objective = field(default_factory=Objective)
    budget: Budget = field(default_factory=Budget)
    asha: Asha = field(default_factory=Asha)
    constraints: Constraints = field(default_factory=Constraints)
    select: Select = field(default_factory=Select)
    train: dict[str, Any] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    shape: DataShape = field(default_factory=lambda: DataShape(28, 1, 10))
    baselines: tuple[Baseline, ...] = ()
    mode: str = "trials"
    oneshot: OneShot = field(default_factory=OneShot)
    prescreen: Prescreen = field(default_factory=Prescreen)

    def search_dir(self) -> Path:
        return Path(self.storage_path).resolve() / self.name

    def optuna_storage(self) -> str:
        """The Optuna study's database URL: ``objective.storage`` (a relative sqlite path made
        absolute), or a sqlite file beside the search's Tune state."""
        if self.objective.storage is None:
            return f"sqlite:///{self.search_dir() / OPTUNA_DB}"
        return _absolute_sqlite(self.objective.storage)

    def registered_model_name(self) -> str:
        return self.select.registered_model or f"{self.name}-best"

    @property
    def acc_metric(self) -> str:
        """The accuracy trials are ranked, halved and selected on: ``val_acc`` (the training
        shards every trial holds out, ``train.holdout_shards``) or, without held-out shards,
        ``test_acc`` (the selected trial's test figure is then optimistic: the best of many)."""
        return "val_acc" if int(self.train.get("holdout_shards") or 0) > 0 else "test_acc"

    def to_dict(self) -> dict[str, Any]:
        """A YAML-able dict: what the parent run logs and what ``--resume`` re-reads."""
        return {
            "name": self.name, "experiment": self.experiment, "data": self.data,
            "tracking_uri": self.tracking_uri, "storage_path": self.storage_path,
            "base_model": self.base_model, "seed": self.seed,
            "objective": asdict(self.objective), "budget": asdict(self.budget),
            "asha": asdict(self.asha), "constraints": asdict(self.constraints),
            "select": asdict(self.select), "space": self.space.to_yaml(),
            "train": dict(self.train), "scale": dict(self.scale),
            "baselines": [b.to_dict() for b in self.baselines],
            "mode": self.mode, "oneshot": asdict(self.oneshot), "prescreen": asdict(self.prescreen),
        }

    def replace_budget(self, **kw: Any) -> "SearchConfig":
        """A copy with budget fields changed (the CLI's --num-trials / --time-budget-s)."""
        from dataclasses import replace

        kw = {k: v for k, v in kw.items() if v is not None}
        if not kw:
            return self
        budget = replace(self.budget, **kw)
        _validate_budget(budget)
        return replace(self, budget=budget)


#: The Optuna study's default database, in the search's folder.
OPTUNA_DB = "optuna.db"
_STORAGE_FIX = ("write an SQLAlchemy database URL such as sqlite:////abs/path/optuna.db or "
                "postgresql://user:password@host/db, or leave objective.storage out for a sqlite file beside the "
                "search's Tune state")


def _absolute_sqlite(url: str) -> str:
    """A relative sqlite path means "relative to here": pinned, so a resume from another
    folder finds the same file."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{Path(url[len('sqlite:///'):]).resolve()}"
    return url


def check_storage_url(url: Any) -> None:
    """``objective.storage``: a database URL Optuna's RDB storage can open, whose driver is
    installed, that persists (no in-memory sqlite), in a folder that exists (sqlite).

    Raises:
        ConfigError: naming the value and the fix.
    """
    where = f"objective.storage={url!r}"
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{where} must be a database URL; {_STORAGE_FIX}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        u = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{where} is not a database URL; {_STORAGE_FIX}") from None
    try:
        dialect = u.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"{where}: SQLAlchemy has no database {u.drivername!r}; {_STORAGE_FIX}") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise ConfigError(f"{where}: its driver module {err.name or str(err)!r} is not installed; pip install it "
                          f"(postgresql: psycopg[binary]; mysql: pymysql, with mysql+pymysql://), or use a sqlite "
                          f"file") from None
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if db in ("", ":memory:") or db.startswith("file::memory:") or u.query.get("mode") == "memory":
            raise ConfigError(f"{where} is an in-memory database, gone when the driver ends; give a file: "
                              f"sqlite:////abs/path/optuna.db, or leave objective.storage out")
        folder = Path(db).resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"{where}: folder {folder} does not exist; create it, or leave objective.storage out "
                              f"for a sqlite file beside the search's Tune state")


def _section(raw: dict[str, Any], key: str, cls: type, path: str) -> Any:
    d = raw.get(key) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: '{key}:' must be a mapping, got {d!r}")
    return from_known_keys(cls, d, f"{path}: '{key}:'")


def _check(ok: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``ok``."""
    if not ok:
        raise ConfigError(msg)


def _validate_budget(b: Budget) -> None:
    """The budget's checks: the search file's and the command line's overrides alike."""
    _check(isinstance(b.num_trials, int) and not isinstance(b.num_trials, bool) and b.num_trials >= 1,
           f"budget.num_trials={b.num_trials!r} must be an integer >= 1 (--num-trials)")
    _check(b.time_budget_s is None or float(b.time_budget_s) > 0,
           f"budget.time_budget_s={b.time_budget_s!r} must be a number of seconds > 0, or null for no limit "
           f"(--time-budget-s)")
    _check(b.max_concurrent_trials == "auto" or (isinstance(b.max_concurrent_trials, int)
                                                 and not isinstance(b.max_concurrent_trials, bool)
                                                 and b.max_concurrent_trials >= 1),
           f"budget.max_concurrent_trials={b.max_concurrent_trials!r} must be 'auto' or an integer >= 1 "
           f"(--max-concurrent-trials)")
    _check(not isinstance(b.autoscale_wait_s, bool) and isinstance(b.autoscale_wait_s, (int, float))
           and b.autoscale_wait_s > 0,
           f"budget.autoscale_wait_s={b.autoscale_wait_s!r} must be a number of seconds > 0 (how long "
           f"max_concurrent_trials: auto waits for an autoscaling cluster to hold one trial; default 600)")


def _validate(cfg: SearchConfig) -> None:
    """Static checks of the whole search file, before Ray or MLflow start.

    In order: the top-level names, the objective, the budget, ASHA, the constraints, the
    selection, the fixed training and scale sections, every value of the space, the baselines,
    and that the smallest model of the space meets the constraints. The first failure raises.

    Raises:
        ConfigError: naming the value, the allowed range and the fix.
    """
    from mixersnn.models import list_models

    _check(bool(cfg.name) and "/" not in cfg.name and cfg.name.strip() == cfg.name,
           f"name={cfg.name!r} must be a non-empty folder name without '/' or spaces at the ends")
    _check(cfg.base_model in list_models(),
           f"base_model={cfg.base_model!r} is not registered; choose one of {list_models()}")
    _validate_objective(cfg.objective)
    _validate_budget(cfg.budget)
    _validate_asha(cfg.asha)
    _validate_constraints(cfg.constraints)
    _validate_select(cfg.select)
    _validate_train(cfg)
    _validate_scale(cfg.scale)
    _validate_space(cfg)
    _validate_baselines(cfg)
    _validate_reachable(cfg)
    _validate_prescreen(cfg.prescreen)
    _check(cfg.mode in ("trials", "oneshot"),
           f"mode={cfg.mode!r} must be 'trials' (each candidate trained) or 'oneshot' (a supernet trained once)")
    if cfg.mode == "oneshot":
        _check(not cfg.prescreen.enabled,
               "prescreen.enabled=true with mode: oneshot: the pre-screen spares trials their training, and a one-shot "
               "search trains no candidate (it scores each on the supernet in about a second); set prescreen.enabled: false")
        _validate_oneshot(cfg)


def _validate_prescreen(p: Prescreen) -> None:
    _check(isinstance(p.enabled, bool), f"prescreen.enabled={p.enabled!r} must be true or false")
    _check(not isinstance(p.drop_fraction, bool) and isinstance(p.drop_fraction, (int, float))
           and 0 <= p.drop_fraction < 1,
           f"prescreen.drop_fraction={p.drop_fraction!r} must be in [0, 1) (0.3: the lowest-scoring 30% never train)")
    for name in ("warmup", "batch_size"):
        v = getattr(p, name)
        lo = 0 if name == "warmup" else 2
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
               f"prescreen.{name}={v!r} must be an integer >= {lo}"
               + (" (the score's kernel compares images pairwise)" if name == "batch_size" else ""))


def _validate_oneshot(cfg: SearchConfig) -> None:
    """``oneshot:``: a supernet space that fits the base model and the data, training fields
    TrainConfig accepts, and positive counts."""
    from mixersnn.models import model_config
    from mixersnn.models.supernet import SupernetSpace
    from trainers.config import TrainConfig

    o = cfg.oneshot
    _check(isinstance(o.space, dict), f"oneshot.space={o.space!r} must be a mapping of embed_dims (or per-stage "
                                         f"widths), depths, mlp_ratios, Ts")
    base = model_config(cfg.base_model, img_size=cfg.shape.img_size, in_chans=cfg.shape.in_chans,
                        num_classes=cfg.shape.num_classes)
    try:
        SupernetSpace.from_dict(o.space).validate(base)
    except ConfigError as err:
        raise ConfigError(f"oneshot.space: {err}") from None
    for name in ("train", "finalist_train"):
        d = getattr(o, name)
        _check(isinstance(d, dict), f"oneshot.{name}={d!r} must be a mapping of training fields")
        owned = sorted(set(d) & (_owned(cfg) | {"supernet", "holdout_shards"}))
        _check(not owned, f"oneshot.{name}: {owned} are set by the search; remove them")
        try:
            TrainConfig.from_dict({**cfg.train, **d, "model": cfg.base_model, "data": cfg.data,
                                   "model_overrides": {"img_size": cfg.shape.img_size, "in_chans": cfg.shape.in_chans,
                                                       "num_classes": cfg.shape.num_classes}})
        except ConfigError as err:
            raise ConfigError(f"oneshot.{name}: {err}") from None
    for name, lo in (("holdout_shards", 1), ("calib_images", 1), ("num_evals", 1), ("parallel", 1), ("finalists", 1)):
        v = getattr(o, name)
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"oneshot.{name}={v!r} must be an integer >= {lo}")
    _check(o.eval_images is None or (isinstance(o.eval_images, int) and o.eval_images >= 1),
           f"oneshot.eval_images={o.eval_images!r} must be an integer >= 1, or null for every held-out image")
    _check(not isinstance(o.cpus_per_eval, bool) and isinstance(o.cpus_per_eval, (int, float)) and o.cpus_per_eval > 0,
           f"oneshot.cpus_per_eval={o.cpus_per_eval!r} must be > 0 (fractions like 0.5 are fine)")


def _validate_objective(o: Objective) -> None:
    """``objective:``: mode, sampler, population and start-up sizes, and the study's storage."""
    _check(o.mode in ("multi", "single"),
           f"objective.mode={o.mode!r} must be 'multi' (Pareto) or 'single' (accuracy + ASHA)")
    _check(o.sampler in ("nsga2", "tpe"), f"objective.sampler={o.sampler!r} must be 'nsga2' or 'tpe'")
    _check(not (o.mode == "single" and o.include_params),
           "objective.include_params=true needs mode: multi (parameters are a second objective)")
    _check(isinstance(o.population_size, int) and o.population_size >= 2,
           f"objective.population_size={o.population_size!r} must be an integer >= 2")
    _check(o.startup_trials is None or (isinstance(o.startup_trials, int) and o.startup_trials >= 1),
           f"objective.startup_trials={o.startup_trials!r} must be an integer >= 1 or null")
    if o.storage is not None:
        check_storage_url(o.storage)


def _validate_asha(a: Asha) -> None:
    """``asha:``: a switch, a grace period >= 1 epoch and a reduction factor >= 2."""
    _check(isinstance(a.enabled, bool), f"asha.enabled={a.enabled!r} must be true or false")
    _check(isinstance(a.grace_period, int) and a.grace_period >= 1,
           f"asha.grace_period={a.grace_period!r} must be an integer >= 1")
    _check(isinstance(a.reduction_factor, int) and a.reduction_factor >= 2,
           f"asha.reduction_factor={a.reduction_factor!r} must be an integer >= 2")


def _validate_constraints(c: Constraints) -> None:
    """``constraints:``: positive limits (or null) and a firing rate in (0, 1]."""
    _check(c.max_params is None or (isinstance(c.max_params, int) and c.max_params >= 1),
           f"constraints.max_params={c.max_params!r} must be an integer >= 1 or null")
    _check(c.max_energy_uj is None or float(c.max_energy_uj) > 0,
           f"constraints.max_energy_uj={c.max_energy_uj!r} must be > 0 (microjoules per image) or null")
    _check(0 < float(c.assumed_firing_rate) <= 1,
           f"constraints.assumed_firing_rate={c.assumed_firing_rate!r} must be in (0, 1]; 1.0 is the dense "
           f"upper bound")


def _validate_select(s: Select) -> None:
    """``select:``: the criterion, an energy limit and each scale-family member parses."""
    from search.family import parse_member

    _check(s.criterion in ("max_acc", "knee"), f"select.criterion={s.criterion!r} must be 'max_acc' or 'knee'")
    _check(s.max_energy_uj is None or float(s.max_energy_uj) > 0,
           f"select.max_energy_uj={s.max_energy_uj!r} must be > 0 or null")
    _check(s.scale_family is None or isinstance(s.scale_family, list),
           f"select.scale_family={s.scale_family!r} must be a list of scales, e.g. ['width=0.5', "
           f"'width=2,depth=1.5']")
    for i, entry in enumerate(s.scale_family or []):
        parse_member(entry, f"select.scale_family[{i}]")  # raises ConfigError naming the entry and the fix


def _owned(cfg: SearchConfig) -> set[str]:
    """TrainConfig fields the search sets itself: in the one-shot mode, which samples no
    hyperparameters, ``lr``, ``batch_size``, ... are the file's to fix."""
    return _SEARCH_OWNED - set(TRAIN_KEYS) if cfg.mode == "oneshot" else _SEARCH_OWNED


def _validate_train(cfg: SearchConfig) -> None:
    """``train:``: fixed fields only (the search owns the sampled and tracking ones), valid for TrainConfig."""
    from trainers.config import TrainConfig

    owned = sorted(set(cfg.train) & _owned(cfg))
    _check(not owned, f"train: {owned} are set by the search (sample them under 'space:' or set them at the top level)")
    try:
        TrainConfig.from_dict({**cfg.train, "model": cfg.base_model, "data": cfg.data,
                               "model_overrides": {"img_size": cfg.shape.img_size, "in_chans": cfg.shape.in_chans,
                                                   "num_classes": cfg.shape.num_classes, "embed_dim": 12,
                                                   "depths": [1], "spe": False}})
    except ConfigError as err:
        raise ConfigError(f"train: {err}") from None


def _validate_scale(scale: dict[str, Any]) -> None:
    """``scale:``: a valid ScalingConfig without the search's own fields, and a possible ``in_process``."""
    from search.resources import scale_config

    try:
        sc = scale_config(scale)
    except (TypeError, ConfigError) as err:
        raise ConfigError(f"scale: {err}") from None
    _check(not ({"storage_path", "name"} & set(scale)), "scale: storage_path and name are set by the search; remove them")
    where = scale.get("in_process", "auto")
    _check(where in ("auto", True, False),
           f"scale.in_process={where!r} must be auto (one CPU worker trains in the Tune trial's process, more "
           f"workers or GPUs through Ray Train), true or false (always Ray Train)")
    _check(not (where is True and (sc.num_workers > 1 or sc.use_gpu)),
           f"scale.in_process=true needs num_workers: 1 and no GPU (got num_workers={sc.num_workers}, "
           f"use_gpu={sc.use_gpu}); several workers or GPUs train through Ray Train: set in_process: auto")


def _validate_space(cfg: SearchConfig) -> None:
    """``space:``: every value must build a model and a training config.

    Checked by MixerSNNConfig's and TrainConfig's own validation, and named by its space entry.
    """
    from mixersnn.models import model_config
    from trainers.config import TrainConfig

    sp = cfg.space.params
    data = {"img_size": cfg.shape.img_size, "in_chans": cfg.shape.in_chans, "num_classes": cfg.shape.num_classes}
    plain = {"embed_dim": 12, "depths": [1], "T": 1, "patch_size": max(sp["patch_size"].values()), "mlp_ratio": 2,
             "spe": False}

    def builds(key: str, value: Any, **arch: Any) -> None:
        try:
            model_config(cfg.base_model, **data, **{**plain, **arch})
        except ConfigError as err:
            raise ConfigError(f"space.{key}={value!r}: {err}") from None

    def trains(key: str, value: Any) -> None:
        try:
            TrainConfig.from_dict({**cfg.train, key: value, "model": cfg.base_model, "data": cfg.data,
                                   "model_overrides": {**data, **plain}})
        except ConfigError as err:
            raise ConfigError(f"space.{key}={value!r}: {err}") from None

    for p in sp["patch_size"].values():
        builds("patch_size", p, patch_size=p)
    for t in sp["T"].values():
        builds("T", t, T=t)
    for n in sp["num_stages"].values():
        builds("num_stages", n, depths=[1] * n)
    for d in sp["blocks_per_stage"].values():
        builds("blocks_per_stage", d, depths=[d])
    widths = sp["embed_dim"].values()
    for w in widths:
        builds("embed_dim", w, embed_dim=w)
    stages = max(sp["num_stages"].values())
    for r in sp["mlp_ratio"].values():
        for w in widths:
            builds("mlp_ratio", r, mlp_ratio=r, embed_dim=w, depths=[1] * stages)
    if True in sp["spe"].values():
        _check(any(w % 3 == 0 for w in widths),
               f"space.embed_dim={sp['embed_dim'].to_yaml()} holds no multiple of 3, but spe can be true: "
               f"spiking patch encoding needs a width that is a multiple of 3 (e.g. 12, 24, 48); widen the range "
               f"or set spe: false")
    for k in TRAIN_KEYS:
        for v in sp[k].values():
            trains(k, v)


def _validate_baselines(cfg: SearchConfig) -> None:
    """``baselines:``: each a registered model that builds at the data's size with a valid TrainConfig."""
    from mixersnn.models import list_models
    from search.space import baseline_spec
    from trainers.config import TrainConfig

    for i, bl in enumerate(cfg.baselines):
        at = f"baselines[{i}] ({bl.label})"
        _check(bl.model in list_models(), f"{at}: model={bl.model!r} is not registered; choose one of {list_models()}")
        owned = sorted(set(bl.model_overrides) & {"img_size", "in_chans", "num_classes"})
        _check(not owned, f"{at}: model_overrides {owned} are set by the data ({cfg.data}); remove them")
        bad = sorted(set(bl.train) - set(TRAIN_KEYS))
        _check(not bad, f"{at}: train keys {bad} cannot be set per baseline; baselines share the search's train: "
                        f"section and may set only {list(TRAIN_KEYS)}")
        try:
            spec = baseline_spec(cfg, bl)
            TrainConfig.from_dict({**cfg.train, **spec.train, "model": bl.model, "data": cfg.data,
                                   "model_overrides": {"img_size": cfg.shape.img_size, "in_chans": cfg.shape.in_chans,
                                                       "num_classes": cfg.shape.num_classes, **bl.model_overrides}})
        except (ConfigError, TypeError, ValueError) as err:
            raise ConfigError(f"{at}: {err}") from None


def _validate_reachable(cfg: SearchConfig) -> None:
    """The smallest model of the space must meet the constraints, or nothing can ever train."""
    from search.space import estimate

    sp = cfg.space.params
    spe = False if False in sp["spe"].values() else True
    w_ok = [w for w in sp["embed_dim"].values() if (not spe) or w % 3 == 0]
    arch = dict(embed_dim=min(w_ok), depths=[min(sp["blocks_per_stage"].values())] * min(sp["num_stages"].values()),
                T=min(sp["T"].values()), patch_size=max(sp["patch_size"].values()),
                mlp_ratio=min(sp["mlp_ratio"].values()), spe=spe)
    est = estimate(cfg, arch)
    _check(est["reason"] is None,
           f"constraints cannot be met by the smallest model in the space ({arch}): {est['reason']}; "
           f"raise the limit or shrink the space")


def load_search_config(path: Union[str, Path, None] = None, **overrides: Any) -> SearchConfig:
    """Read and validate a search file; ``None`` gives the defaults for Fashion-MNIST.

    Args:
        path: YAML file.
        **overrides: top-level keys replacing the file's (e.g. ``storage_path``, ``tracking_uri``).

    Raises:
        ConfigError: a value is out of range; the message names it, the range and the fix.
        FileNotFoundError: the file does not exist.
    """
    import yaml

    raw: dict[str, Any] = {}
    where = "search config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"search config {p} does not exist (try configs/search_fashion_mnist.yaml)")
        raw = yaml.safe_load(p.read_text()) or {}
        where = str(p)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must hold a mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    top = {"name", "experiment", "data", "tracking_uri", "storage_path", "base_model", "seed", "space",
           "objective", "budget", "asha", "constraints", "select", "train", "scale", "baselines", "mode", "oneshot",
           "prescreen"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {unknown}; valid: {sorted(top)}")
    if raw.get("mode") == "oneshot" and raw.get("space"):
        raise ConfigError(f"{where}: 'space:' is the trial mode's; a one-shot search's choices are 'oneshot: space:' "
                          f"(embed_dims or widths, depths, mlp_ratios, Ts) and its hyperparameters are fixed under 'train:'")
    data = str(raw.get("data", "fashion-mnist"))
    shape = data_shape(data)
    params = _space_params(raw.get("space") or {}, shape, where)
    budget = _section(raw, "budget", Budget, where)
    if budget.time_budget_s is not None:
        from dataclasses import replace

        budget = replace(budget, time_budget_s=float(_num(budget.time_budget_s, "budget.time_budget_s")))
    if isinstance(budget.autoscale_wait_s, str):
        from dataclasses import replace

        budget = replace(budget, autoscale_wait_s=_num(budget.autoscale_wait_s, "budget.autoscale_wait_s"))
    constraints = _section(raw, "constraints", Constraints, where)
    if constraints.max_energy_uj is not None:
        from dataclasses import replace

        constraints = replace(constraints, max_energy_uj=float(_num(constraints.max_energy_uj, "constraints.max_energy_uj")))
    train = dict(raw.get("train") or {})
    scale = dict(raw.get("scale") or {})
    cfg = SearchConfig(
        name=str(raw.get("name", "search")),
        experiment=str(raw.get("experiment", "mixersnn-search")),
        data=data,
        tracking_uri=raw.get("tracking_uri"),
        storage_path=str(raw.get("storage_path", "runs/search")),
        base_model=str(raw.get("base_model", "mlp_spe_t")),
        seed=int(raw.get("seed", 0)),
        space=SearchSpace(params),
        objective=_section(raw, "objective", Objective, where),
        budget=budget,
        asha=_section(raw, "asha", Asha, where),
        constraints=constraints,
        select=_section(raw, "select", Select, where),
        train=train,
        scale=scale,
        shape=shape,
        baselines=_baselines(raw.get("baselines"), where),
        mode=str(raw.get("mode", "trials")),
        oneshot=_section(raw, "oneshot", OneShot, where),
        prescreen=_section(raw, "prescreen", Prescreen, where),
    )
    _validate(cfg)
    return cfg


def _space_params(space_raw: Any, shape: DataShape, where: str) -> dict[str, ParamSpec]:
    """``space:`` over the defaults for the data's image size."""
    if not isinstance(space_raw, dict):
        raise ConfigError(f"{where}: 'space:' must be a mapping of parameter -> value/choices/range")
    bad = sorted(set(space_raw) - set(ARCH_KEYS + TRAIN_KEYS))
    if bad:
        raise ConfigError(f"{where}: unknown space parameters {bad}; searchable: {list(ARCH_KEYS + TRAIN_KEYS)}")
    params = default_space(shape.img_size)
    params.update({k: ParamSpec.parse(k, v) for k, v in space_raw.items()})
    return params


_BASELINE_KEYS = ("model", "label", "model_overrides", "train", "estimate_only")


def _baselines(raw: Any, where: str) -> tuple[Baseline, ...]:
    """Parse ``baselines:`` (a list of mappings); the full checks are in :func:`_validate`."""
    import re

    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: 'baselines:' must be a list of {{model, label, model_overrides, train}} "
                          f"mappings, got {raw!r}")
    out = []
    for i, b in enumerate(raw):
        at = f"baselines[{i}]"
        if isinstance(b, str):
            b = {"model": b}
        if not isinstance(b, dict) or "model" not in b:
            raise ConfigError(f"{at}={b!r} must be a mapping with at least 'model' (a registry name, e.g. mlp_spe_t)")
        extra = sorted(set(b) - set(_BASELINE_KEYS))
        if extra:
            raise ConfigError(f"{at}: unknown keys {extra}; valid: {list(_BASELINE_KEYS)}")
        label = str(b.get("label") or b["model"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", label):
            raise ConfigError(f"{at}.label={label!r} must be 1-60 letters, digits, '.', '_' or '-' "
                              f"(it names the MLflow run), e.g. mlp_spe_t-28px")
        for key in ("model_overrides", "train"):
            if not isinstance(b.get(key) or {}, dict):
                raise ConfigError(f"{at}.{key}={b[key]!r} must be a mapping")
        if not isinstance(b.get("estimate_only", False), bool):
            raise ConfigError(f"{at}.estimate_only={b['estimate_only']!r} must be true or false")
        out.append(Baseline(str(b["model"]), label, dict(b.get("model_overrides") or {}), dict(b.get("train") or {}),
                            bool(b.get("estimate_only", False))))
    labels = [b.label for b in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"baselines: labels {dup} appear more than once; give each baseline its own label")
    return tuple(out)
