"""Typed training configuration: one dataclass, flowing dataclass -> dict -> Ray -> loop.

The defaults live here and nowhere else; the CLI only overrides fields the user set, and YAML
files are read into the same dataclass (unknown keys are an error, not silently ignored).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["TrainConfig", "ScaleConfig", "load_yaml_config", "ConfigError"]

from mixersnn.models.config import ConfigError, from_known_keys


@dataclass
class TrainConfig:
    """Everything the training loop needs; logged whole to MLflow as params.

    Attributes:
        model: registry name (``mixersnn.models.list_models()``).
        model_overrides: config overrides for the model (``img_size``, ``embed_dim``,
            ``depths``, ``T``, ``backend``, ...); image size, channels and classes are filled
            from the data manifest when not given.
        data: "fashion-mnist" (the embedded default: real Fashion-MNIST shards built on
            demand) or a folder with ``train/`` and ``test/`` shard splits (each with a
            manifest.json, see ``mixersnn data make-shards``).
        epochs: training epochs.
        batch_size: per-worker batch size.
        eval_batch_size: per-worker evaluation batch size.
        optimizer: "sgd" or "adamw".
        lr: peak learning rate (after warm-up); scaled by nothing implicitly.
        momentum: SGD momentum (AdamW: beta1).
        weight_decay: decoupled for AdamW, L2 for SGD; not applied to BN and biases.
        warmup_epochs: linear warm-up length (fractional epochs allowed).
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        label_smoothing: soft-target smoothing in [0, 1).
        mixup: mixup alpha (0 = off).
        cutmix: cutmix alpha (0 = off); with both on, each batch picks one at random.
        amp: "auto" (bf16 on CUDA, off on CPU), "off", "bf16" or "fp16" (CUDA only).
        grad_clip: max global gradient norm, or None.
        augment: training augmentation: "crop" (pad-and-crop for images up to 64 px, else
            random-resized-crop), "crop-flip" (plus a horizontal flip), "none" (the eval
            transform), or "auto": "crop-flip" when the training split's manifest says flips
            keep the labels (``flip_safe``: Fashion-MNIST, CIFAR), else "crop" (digits would
            be mislabelled by mirroring). The booleans of older configs still read: true is
            "auto", false "none".
        seed: global seed (each rank adds its rank).
        data_workers: DataLoader worker processes per training worker.
        max_steps_per_epoch: cap train batches per epoch (smoke runs), or None.
        samples_per_epoch: train images per epoch over all ranks (rounded down to whole
            batches), or None for the whole split: an epoch becomes a fixed budget of images
            whatever the batch size (the search's unit of training for successive halving).
        max_eval_batches: cap eval batches (smoke runs), or None.
        full_final_eval: evaluate the whole eval split after the last epoch (or when the time
            budget ends training), whatever ``max_eval_batches``.
        cache_data: keep the decoded splits in memory and batch from there ("auto": a split
            of fixed-size images, both within 2 GiB, that this process holds already or that
            the run reads at least once over; true; false: stream the shards every epoch).
            The shards stay the source of truth.
        time_budget_s: stop after the epoch in which this much training time has passed
            (the learning-rate schedule is still laid over ``epochs``).
        tracking_uri: MLflow tracking URI; None means ``$MLFLOW_TRACKING_URI`` if set, else
            ``sqlite:///<cwd>/mlflow.db``.
        experiment: MLflow experiment name (``mixersnn train``: ``$MLFLOW_EXPERIMENT_NAME`` when
            set and neither the YAML nor ``--experiment`` names one).
        run_name: MLflow run name / Ray Train run name; None derives one from the config.
        parent_run_id: MLflow parent run (the search sets it for nested trial runs).
        log_model: log the final checkpoint and MFI report to MLflow as artefacts.
        measure_energy: collect firing rates during evaluation and log SOPs and energy.
        compile: ``torch.compile`` the training step's model (the fused LIF is a custom op
            inside the graph): false (eager), true ("default" mode) or a mode name
            ("reduce-overhead": CUDA graphs, for CUDA runs). Evaluation stays eager. Needs a
            C++ compiler on CPU, Triton on CUDA: where these are missing the run stops at once
            with the reason. Costs a compile of minutes on a small CPU; docs/benchmarks.md.
        supernet: train a weight-sharing supernet instead of one model: the choices of a
            :class:`mixersnn.models.SupernetSpace` (``embed_dims``, or ``widths`` per stage,
            ``depths`` per stage, ``mlp_ratios``, ``Ts``) around ``model`` (which fixes patch size, SPE and neuron).
            Each step follows the sandwich rule: the largest subnet learns from the labels,
            the smallest and ``sandwich_random`` random subnets from the largest's
            predictions (in-place distillation). None: an ordinary run.
        sandwich_random: random subnets per supernet step (besides largest and smallest).
        holdout_shards: hold out the last N shards of the training split: the run never trains
            on them and reports its accuracy there every epoch (``val_acc``, ``val_loss``); a
            search ranks and selects on them, not on the test split.
    """

    model: str = "mlp_spe_t"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str = "fashion-mnist"
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 250
    optimizer: str = "adamw"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    amp: str = "auto"
    grad_clip: Optional[float] = 5.0
    augment: Union[str, bool] = "auto"
    seed: int = 0
    data_workers: int = 0
    max_steps_per_epoch: Optional[int] = None
    samples_per_epoch: Optional[int] = None
    max_eval_batches: Optional[int] = None
    full_final_eval: bool = False
    cache_data: Union[bool, str] = "auto"
    time_budget_s: Optional[float] = None
    tracking_uri: Optional[str] = None
    experiment: str = "mixersnn"
    run_name: Optional[str] = None
    parent_run_id: Optional[str] = None
    log_model: bool = True
    measure_energy: bool = True
    compile: Union[bool, str] = False
    supernet: Optional[dict[str, Any]] = None
    sandwich_random: int = 2
    holdout_shards: int = 0

    def __post_init__(self) -> None:
        # YAML booleans stay valid: true is "auto" (crops, flips where the data allows), false "none".
        if self.augment is True:
            self.augment = "auto"
        elif self.augment is False:
            self.augment = "none"
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad value, the allowed range and the fix."""

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs={self.epochs!r} must be an integer >= 1")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size={self.batch_size!r} must be an integer >= 1")
        check(isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size!r} must be an integer >= 1")
        check(self.optimizer in ("sgd", "adamw"), f"optimizer={self.optimizer!r} must be 'sgd' or 'adamw'")
        check(self.lr > 0, f"lr={self.lr} must be > 0 (try 0.1 for SGD, 2e-3 for AdamW)")
        check(0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(0 <= self.warmup_epochs < self.epochs, f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs})")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        check(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        check(self.mixup >= 0 and self.cutmix >= 0, f"mixup={self.mixup}, cutmix={self.cutmix} must be >= 0 (0 turns them off)")
        check(self.amp in ("auto", "off", "bf16", "fp16"), f"amp={self.amp!r} must be one of 'auto', 'off', 'bf16', 'fp16'")
        check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip={self.grad_clip} must be > 0 or None (off)")
        from mixersnn.data.transforms import AUGMENT_MODES

        check(isinstance(self.augment, str) and self.augment in AUGMENT_MODES,
              f"augment={self.augment!r} must be one of {', '.join(repr(m) for m in AUGMENT_MODES)} (or true = "
              f"'auto', false = 'none'); e.g. augment: crop in the YAML or --augment crop for data that mirroring "
              f"mislabels, such as digits")  # fmt: skip
        check(self.data_workers >= 0, f"data_workers={self.data_workers} must be >= 0")
        check(self.cache_data in (True, False, "auto"), f"cache_data={self.cache_data!r} must be true, false or 'auto'")
        from mixersnn.models.mixer_snn import COMPILE_MODES

        check(isinstance(self.compile, bool) or self.compile in COMPILE_MODES,
              f"compile={self.compile!r} must be true, false or a torch.compile mode: {', '.join(COMPILE_MODES)}")  # fmt: skip
        for name in ("max_steps_per_epoch", "samples_per_epoch", "max_eval_batches"):
            v = getattr(self, name)
            check(v is None or (isinstance(v, int) and v >= 1), f"{name}={v!r} must be an integer >= 1 or None")
        check(self.time_budget_s is None or self.time_budget_s > 0, f"time_budget_s={self.time_budget_s} must be > 0 or None")
        check(isinstance(self.model_overrides, dict), f"model_overrides={self.model_overrides!r} must be a mapping")
        check(isinstance(self.sandwich_random, int) and self.sandwich_random >= 0,
              f"sandwich_random={self.sandwich_random!r} must be an integer >= 0 (random subnets per supernet step)")
        check(isinstance(self.holdout_shards, int) and self.holdout_shards >= 0,
              f"holdout_shards={self.holdout_shards!r} must be an integer >= 0 (0: train on every shard)")
        if self.supernet is not None:
            check(not self.compile, f"compile={self.compile!r} with a supernet: subnets change shape every step, "
                                    f"which torch.compile would recompile each time; set compile: false")
            from mixersnn.models import model_config
            from mixersnn.models.supernet import SupernetSpace

            check(isinstance(self.supernet, dict), f"supernet={self.supernet!r} must be a mapping of the space's "
                                                   f"choices (embed_dims or widths, depths, mlp_ratios, Ts)")
            SupernetSpace.from_dict(self.supernet).validate(model_config(self.model, **self._model_overrides_for_check()))
        # The model config validates itself (widths, grids, T, neuron), with the same messages
        # the model library gives; catch a bad architecture here, before any worker starts.
        from mixersnn.models import model_config

        model_config(self.model, **self._model_overrides_for_check())

    def _model_overrides_for_check(self) -> dict[str, Any]:
        # The data set fixes size, channels and classes; for the embedded default we know
        # them without reading anything, for other data the loop fills them from the manifest.
        base = {"img_size": 28, "in_chans": 1, "num_classes": 10} if self.data == "fashion-mnist" else {}
        return {**base, **self.model_overrides}

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return from_known_keys(cls, d, "training config")


@dataclass
class ScaleConfig:
    """How a training run maps onto Ray resources.

    Attributes:
        num_workers: data-parallel workers (DDP ranks).
        use_gpu: one or more GPUs per worker (nccl); else CPU workers (gloo).
        gpus_per_worker: GPUs per worker when ``use_gpu``: a fraction in (0, 1) shares one GPU
            between runs (0.25: four one-worker search trials per GPU), or a whole number.
            Ray schedules GPUs as units: amounts above 1 must be whole (1.5 is refused), and
            fractions have a precision of 0.0001. A fraction needs ``num_workers`` 1: the
            ranks of one DDP run would share a device, which nccl refuses.
        cpus_per_worker: CPUs per worker (fractions allowed: on a 2-core machine two workers
            of 0.5 CPU leave room for the driver and the data loader).
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        storage_path: where Ray Train keeps checkpoints; a run with the same name and path
            resumes, so names are derived from the config or given explicitly.
        name: the Ray Train run name (None derives one from the training config).
    """

    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    storage_path: str = "runs/ray"
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ConfigError(f"num_workers={self.num_workers!r} must be an integer >= 1")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker} must be > 0 (fractions like 0.5 are fine)")
        if self.use_gpu:
            _check_gpus(self.gpus_per_worker, self.num_workers)
        if self.max_failures < -1:
            raise ConfigError(f"max_failures={self.max_failures} must be >= 0, or -1 for unlimited")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Ray's smallest unit of a fractional resource (``ray._raylet.RESOURCE_UNIT_SCALING`` = 10000).
_RESOURCE_PRECISION = 1e-4


def _check_gpus(g: Any, num_workers: int) -> None:
    """Ray's rule for GPU amounts: a fraction in (0, 1) or a whole number (GPUs are unit
    resources: 1.5 cannot be scheduled), in steps of at least 0.0001."""
    if isinstance(g, bool) or not isinstance(g, (int, float)):
        raise ConfigError(f"gpus_per_worker={g!r} must be a number: a fraction in (0, 1) such as 0.25, or a whole number >= 1")
    if not g > 0:
        raise ConfigError(f"gpus_per_worker={g} must be > 0 when use_gpu is set: a fraction in (0, 1) such as 0.25 "
                          f"(runs share a GPU), or a whole number >= 1; for CPU-only runs set use_gpu: false")
    if g > 1 and not float(g).is_integer():
        raise ConfigError(f"gpus_per_worker={g} cannot be scheduled: Ray accepts GPU amounts in (0, 1) or whole numbers "
                          f"(1, 2, ...), not fractions above 1; use {math.floor(g)} or {math.ceil(g)}, or give each "
                          f"worker a fraction of one GPU (e.g. 0.5)")
    if g < 1 and g < _RESOURCE_PRECISION:
        raise ConfigError(f"gpus_per_worker={g} is below Ray's resource precision {_RESOURCE_PRECISION}; "
                          f"use a fraction in [{_RESOURCE_PRECISION}, 1), e.g. 0.25")
    if g < 1 and num_workers > 1:
        raise ConfigError(f"gpus_per_worker={g} with num_workers={num_workers}: the ranks of one DDP run may land on "
                          f"the same GPU, which nccl refuses; use whole GPUs (gpus_per_worker: 1) for multi-worker runs, "
                          f"or num_workers: 1 to share GPUs between runs (search trials)")


def load_yaml_config(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML file with optional ``train:`` and ``scale:`` sections (or flat train keys).

    Returns:
        ``(train_dict, scale_dict)``, validated later by the dataclasses.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping, got {type(raw).__name__}")
    if "train" in raw or "scale" in raw:
        extra = sorted(set(raw) - {"train", "scale"})
        if extra:
            raise ConfigError(f"{path}: unknown top-level keys {extra}; use 'train:' and 'scale:'")
        return dict(raw.get("train") or {}), dict(raw.get("scale") or {})
    return dict(raw), {}
