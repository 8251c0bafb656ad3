"""``mixersnn train``: train one Mixer-SNN variant with Ray Train (or in this process)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from mixersnn.cli import DeprecatedAlias

HELP = "Train a Mixer-SNN model with Ray Train, logging to MLflow."

# CLI flag -> TrainConfig field. Flags left unset (None) never override the config file or the
# dataclass defaults: one place for each default.
_TRAIN_FLAGS = {
    "model": "model", "data": "data", "epochs": "epochs", "batch_size": "batch_size",
    "eval_batch_size": "eval_batch_size", "optimizer": "optimizer", "lr": "lr",
    "momentum": "momentum", "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs",
    "label_smoothing": "label_smoothing", "mixup": "mixup", "cutmix": "cutmix", "amp": "amp",
    "grad_clip": "grad_clip", "augment": "augment", "seed": "seed", "data_workers": "data_workers",
    "max_steps_per_epoch": "max_steps_per_epoch", "max_eval_batches": "max_eval_batches",
    "time_budget_s": "time_budget_s", "samples_per_epoch": "samples_per_epoch", "tracking_uri": "tracking_uri",
    "experiment": "experiment", "run_name": "run_name", "holdout_shards": "holdout_shards",
}
_MODEL_FLAGS = {
    "img_size": "img_size", "in_chans": "in_chans", "num_classes": "num_classes",
    "embed_dim": "embed_dim", "depths": "depths", "T": "T", "patch_size": "patch_size",
    "mlp_ratio": "mlp_ratio", "backend": "backend",
}
_SCALE_FLAGS = {
    "workers": "num_workers", "gpus_per_worker": "gpus_per_worker",
    "cpus_per_worker": "cpus_per_worker", "max_failures": "max_failures",
    "storage_path": "storage_path",
}


class _Clear:
    """What a limit flag given as ``none`` parses to: clear the limit the YAML or the source
    run set (``--time-budget-s none``). Not the string: ``--augment none`` is a value."""

    def __repr__(self) -> str:
        return "none"


CLEAR = _Clear()


def _or_none(kind: type) -> Any:
    def parse(s: str) -> Any:
        if s.strip().lower() == "none":
            return CLEAR
        try:
            return kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a {kind.__name__} or 'none'") from None

    parse.__name__ = kind.__name__
    return parse


def _depths(s: str) -> list[int]:
    try:
        return [int(v) for v in s.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depths {s!r} must be comma-separated integers, e.g. 1,2,1") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--config", help="YAML file with train: and scale: sections (flags override it; "
                   "docs/configuration.md lists the keys)")
    g.add_argument("--model", help="registry name (see `mixersnn models`)")
    g.add_argument("--data", help="'fashion-mnist' (built on first use) or a shard root holding train/ and test/ "
                   "splits, local or s3:// (mixersnn data make-shards)")
    g.add_argument("--img-size", type=int)
    g.add_argument("--in-chans", type=int)
    g.add_argument("--num-classes", type=int)
    g.add_argument("--embed-dim", type=int, help="stage-1 width C (a multiple of 3 with SPE)")
    g.add_argument("--depths", type=_depths, help="blocks per stage, e.g. 1,2,1")
    g.add_argument("--T", type=int, help="time steps")
    g.add_argument("--patch-size", type=int)
    g.add_argument("--mlp-ratio", type=float)
    g.add_argument("--no-spe", action="store_true", help="conv downsampling instead of SPE")
    g.add_argument("--backend", help="LIF backend: auto, torch, cpu, cupy")
    r = p.add_argument_group("retrain or scale a trained model (the source's spec first, then YAML, then flags)")
    r.add_argument("--from-run", metavar="RUN_ID",
                   help="train the architecture and hyperparameters a training run or search trial recorded "
                   "(its spec.json); training starts from scratch. Other flags apply on top")
    r.add_argument("--from-model", metavar="URI",
                   help="the same from a model: models:/NAME/VERSION (or /latest, @ALIAS) or runs:/RUN_ID")
    r.add_argument("--scale", metavar="K=V,...",
                   help="a family member of the architecture: width=F (stage-1 width x F, a multiple of 3 with "
                   "SPE), depth=F (blocks per stage x F, >= 1), img_size=PX, e.g. width=2,depth=1.5,img_size=224 "
                   "(or width:/depth:/img_size: in the YAML's scale: block); `mixersnn models --from-run ID "
                   "--scale ...` shows its size and energy first")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int)
    o.add_argument("--batch-size", type=int, help="per worker")
    o.add_argument("--eval-batch-size", type=int)
    o.add_argument("--optimizer", choices=["sgd", "adamw"])
    o.add_argument("--lr", type=float)
    o.add_argument("--momentum", type=float)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--warmup-epochs", type=float)
    o.add_argument("--label-smoothing", type=float)
    o.add_argument("--mixup", type=float)
    o.add_argument("--cutmix", type=float)
    o.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], help="mixed precision on CUDA")
    o.add_argument("--grad-clip", type=float)
    o.add_argument("--augment", choices=["auto", "none", "crop", "crop-flip"],
                   help="training augmentation: random crops, plus horizontal flips with crop-flip; auto (default) "
                   "flips only data whose manifest says flips keep the labels (make-shards --flip-safe)")
    o.add_argument("--seed", type=int)
    o.add_argument("--data-workers", type=int)
    o.add_argument("--time-budget-s", type=_or_none(float),
                   help="stop after the epoch in which this many seconds of training have passed ('none': no limit, "
                   "e.g. over a search trial's); YAML train.time_budget_s")
    o.add_argument("--time-budget", dest="time_budget_s", type=_or_none(float), action=DeprecatedAlias,
                   new="--time-budget-s")
    o.add_argument("--samples-per-epoch", type=_or_none(int),
                   help="images per epoch over all workers ('none': the whole split, e.g. over a search trial's)")
    o.add_argument("--max-steps-per-epoch", type=_or_none(int), help="smoke runs ('none': no cap)")
    o.add_argument("--max-eval-batches", type=_or_none(int), help="smoke runs ('none': the whole eval split)")
    o.add_argument("--holdout-shards", type=int,
                   help="never train on the last N shards of the training split; report val_acc on them each epoch "
                   "(a search trial's retrain keeps its held-out shards; 0: train on them too)")
    s = p.add_argument_group("scale")
    s.add_argument("--workers", type=int, help="data-parallel workers: Ray Train DDP ranks (scale.num_workers)")
    s.add_argument("--gpus-per-worker", type=float, help="> 0 turns GPUs on")
    s.add_argument("--cpus-per-worker", type=float)
    s.add_argument("--max-failures", type=int, help="restarts from the last checkpoint")
    s.add_argument("--storage-path", help="Ray Train checkpoints (default runs/ray)")
    s.add_argument("--no-ray", action="store_true",
                   help="run the loop in this process (one worker; on a small machine faster than Ray Train)")
    s.add_argument("--address", help="Ray cluster to run on (default $RAY_ADDRESS, else start a local Ray runtime)")
    _add_tracking_arguments(p.add_argument_group("tracking"))
    _show_defaults(p)


def _add_tracking_arguments(t: Any) -> None:
    t.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    t.add_argument("--experiment", help="MLflow experiment (default $MLFLOW_EXPERIMENT_NAME when neither this flag "
                   "nor the YAML sets one, else mixersnn)")
    t.add_argument("--run-name", help="a run with the same name and config resumes from its last checkpoint "
                   "(default: the model and a hash of the config)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run of this name even though its recorded config differs")
    t.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow (checkpoints and the summary only)")
    t.add_argument("--system-metrics", action="store_true",
                   help="log this machine's CPU, memory, disk, network (and NVIDIA GPU, with nvidia-ml-py) use to "
                   "the run as system/* metrics, every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s (default 10)")
    t.add_argument("--register", metavar="NAME",
                   help="register the trained model in the MLflow model registry as NAME (a logged model with "
                   "signature, input example, spec, energy and MFI metadata)")
    t.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Append each flag's effective default to its help, read from the dataclasses (the one
    place each default lives): the flags themselves default to None so that they never
    override a YAML file."""
    from dataclasses import MISSING, fields

    from trainers.config import ScaleConfig, TrainConfig

    def defaults(cls: type) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    train, scale = defaults(TrainConfig), defaults(ScaleConfig)
    for a in p._actions:
        if a.help is argparse.SUPPRESS or a.default is not None or "default" in (a.help or ""):
            continue
        if a.dest in _TRAIN_FLAGS and _TRAIN_FLAGS[a.dest] in train:
            d = train[_TRAIN_FLAGS[a.dest]]
            shown = "none" if d is None else str(d)
        elif a.dest == "gpus_per_worker":
            shown = "none (CPU workers)"
        elif a.dest in _SCALE_FLAGS:
            shown = str(scale[_SCALE_FLAGS[a.dest]])
        elif a.dest in ("img_size", "in_chans", "num_classes"):
            shown = "the data's"
        elif a.dest in _MODEL_FLAGS:
            shown = "the --model variant's (mixersnn models)"
        else:
            continue
        a.help = f"{a.help}; default: {shown}" if a.help else f"default: {shown}"


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """Merge dataclass defaults <- source spec (``--from-run``/``--from-model``) <- YAML file
    <- flags into (TrainConfig, ScaleConfig), the model scaled last (``--scale``)."""
    train, scale, _ = _build(args)
    return train, scale


def _build(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`build_configs`, and where the run comes from: ``{"run_id", "model_uri",
    "scale"}`` (each only when set) for the run's spec and its links to the source."""
    from mixersnn.models.scale import SCALE_KEYS, parse_scale, scale_from_mapping
    from mixersnn.models.config import from_known_keys
    from trainers.config import ScaleConfig, TrainConfig, load_yaml_config

    train_d: dict[str, Any] = {}
    scale_d: dict[str, Any] = {}
    if args.config:
        train_d, scale_d = load_yaml_config(args.config)
    env_experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if env_experiment and "experiment" not in train_d:  # MLflow's variable: the default a YAML or flag overrides
        train_d["experiment"] = env_experiment
    # The scale: block holds the model's scale (width, depth, img_size) beside Ray's resources.
    model_scale_d = {k: scale_d.pop(k) for k in SCALE_KEYS if k in scale_d}
    origin: dict[str, Any] = {}
    from_run, from_model = getattr(args, "from_run", None), getattr(args, "from_model", None)
    if from_run is not None or from_model is not None:
        from trainers.spec import resolve_source
        from trainers.tracking import check_tracking_server, resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri or train_d.get("tracking_uri"))
        check_tracking_server(uri)
        src = resolve_source(uri, run_id=from_run, model_uri=from_model)
        base = src.spec.train_dict()
        yaml_over = dict(train_d.pop("model_overrides", None) or {})
        train_d = {**base, **train_d, "model_overrides": {**base["model_overrides"], **yaml_over}}
        replaced = _replaced_architecture(src.spec.model_config, yaml_over)
        if replaced:
            origin["config_model_overrides"] = replaced
        scale_d.setdefault("num_workers", src.spec.num_workers)  # the source's global batch, unless told
        origin["run_id"] = src.run_id
        if src.model_uri:
            origin["model_uri"] = src.model_uri
    overrides = dict(train_d.get("model_overrides") or {})
    _copy_given(args, _TRAIN_FLAGS, train_d)
    _copy_given(args, _MODEL_FLAGS, overrides)
    if args.no_spe:
        overrides["spe"] = False
    if "depths" in overrides:
        overrides["depths"] = list(overrides["depths"])
    scale_arg = getattr(args, "scale", None)
    if scale_arg is not None:
        model_scale = parse_scale(scale_arg)  # the flag replaces the YAML's scale, as flags do
    elif model_scale_d:
        model_scale = scale_from_mapping(model_scale_d, where=f"{args.config}: scale")
    else:
        model_scale = None
    if model_scale is not None and not model_scale.is_identity:
        overrides.update(_scaled_overrides(train_d, overrides, model_scale,
                                           "--scale" if scale_arg is not None else f"{args.config}: scale"))
        origin["scale"] = model_scale.to_dict()
    train_d["model_overrides"] = overrides
    _copy_given(args, _SCALE_FLAGS, scale_d)
    if args.gpus_per_worker:
        scale_d["use_gpu"] = True
    return TrainConfig.from_dict(train_d), from_known_keys(ScaleConfig, scale_d, "scale"), origin


def _replaced_architecture(source: Any, yaml_over: dict[str, Any]) -> dict[str, Any]:
    """The YAML's ``model_overrides`` that change the source's architecture (``source``: its
    model config), each as ``{"from": source's value, "to": the YAML's}``. A recipe's YAML
    written for another architecture would otherwise build a hybrid without a word."""
    def plain(x: Any) -> Any:
        return list(x) if isinstance(x, (list, tuple)) else x

    pairs = {k: (plain(getattr(source, k, None)), plain(v)) for k, v in yaml_over.items()}
    return {k: {"from": was, "to": now} for k, (was, now) in pairs.items() if was != now}


def _copy_given(args: argparse.Namespace, flags: dict[str, str], into: dict[str, Any]) -> None:
    """Each flag in ``flags`` that the command line gave, into ``into`` under its config key
    (``none`` given to a flag that can clear a setting becomes None)."""
    for flag, key in flags.items():
        v = getattr(args, flag, None)
        if v is not None:
            into[key] = None if v is CLEAR else v


def _scaled_overrides(train_d: dict[str, Any], overrides: dict[str, Any], model_scale: Any,
                      where: str) -> dict[str, Any]:
    """The model overrides that make the family member: the architecture as it would be built
    (the data's shape, then the overrides), scaled; only the fields the scale changes."""
    from mixersnn.models import model_config
    from mixersnn.models.scale import scale_config
    from trainers.config import TrainConfig
    from trainers.loop import resolve_data

    fields = TrainConfig.__dataclass_fields__
    data = resolve_data(train_d.get("data", fields["data"].default))
    base = model_config(train_d.get("model", fields["model"].default),
                        **{"img_size": data.img_size, "in_chans": data.in_chans, "num_classes": data.num_classes,
                           **overrides})
    scaled = scale_config(base, model_scale, where=where)
    out: dict[str, Any] = {}
    if scaled.stage_dims != base.stage_dims:
        out["stage_dims"] = list(scaled.stage_dims or ())
    elif scaled.embed_dim != base.embed_dim:
        out["embed_dim"] = scaled.embed_dim
    if scaled.depths != base.depths:
        out["depths"] = list(scaled.depths)
    if scaled.img_size != base.img_size or model_scale.img_size is not None:
        out["img_size"] = scaled.img_size
    return out


def preflight(cfg: Any, *, track: bool) -> None:
    """What can be checked before Ray, MLflow or any folder is touched: the data (folders,
    manifests; the embedded Fashion-MNIST is built here if missing) and the tracking server.
    Each problem raises with a one-line message that names it and the fix."""
    from trainers.loop import resolve_data
    from trainers.tracking import check_tracking_server, resolve_tracking_uri

    resolve_data(cfg.data)
    if track:
        check_tracking_server(resolve_tracking_uri(cfg.tracking_uri))


#: Training fields that name or file a run without changing what it trains.
_BOOKKEEPING = ("tracking_uri", "experiment", "run_name", "parent_run_id", "log_model")
#: The record of what a run trains, in its folder: a later start of the same name compares with it.
RUN_RECORD = "mixersnn_run.json"


def _what_trains(cfg: Any, scale: Any) -> dict[str, Any]:
    d = {k: v for k, v in cfg.to_dict().items() if k not in _BOOKKEEPING}
    d["num_workers"] = scale.num_workers  # the global batch
    return d


def claim_run(run_dir: Path, cfg: Any, scale: Any, *, resume: bool) -> None:
    """Make sure a start named like an earlier run trains what that run trained.

    A run resumes from its last checkpoint when started again under its name. That is right
    for the same job, and wrong for another config under the same name: it would report the
    old run's result as the new one's. So a run folder holds a record of what it trains
    (:data:`RUN_RECORD`); a start whose config differs is refused unless ``resume``. Folders
    outside this machine (``s3://``) are not checked.

    Raises:
        UserError: the recorded config differs and ``resume`` is False, naming the run, the
            fields that differ and the two fixes.
    """
    import json as _json

    from mixersnn._atomic import atomic_path
    from mixersnn.errors import UserError

    if "://" in str(run_dir):
        return
    record = run_dir / RUN_RECORD
    new = _what_trains(cfg, scale)
    if record.exists() and not resume:
        old = _json.loads(record.read_text())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            more = f", and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise UserError(f"run {run_dir.name!r} ({run_dir}) trained another config ({shown}{more}): give this "
                            f"one a new name (--run-name NEW), or --resume to continue that run with this config")
    if not record.exists() or resume:
        try:
            with atomic_path(record, suffix=".json") as tmp:
                Path(tmp).write_text(_json.dumps(new, indent=1, sort_keys=True))
        except OSError as err:  # read-only, full, or a file where a folder should be
            raise UserError(f"cannot write the run's folder {run_dir} ({type(err).__name__}: {err}); checkpoints go "
                            f"there: give a writable --storage-path (for --no-ray: run from a writable folder, "
                            f"runs/local/ is created here) or free some space") from None


def run(args: argparse.Namespace) -> int:
    from trainers.ray_train import run_name_for

    from mixersnn.errors import UserError

    if getattr(args, "address", None) and args.no_ray:
        raise UserError(f"--address {args.address} runs on that Ray cluster, --no-ray in this process: drop one")
    if args.register and args.no_mlflow:
        raise UserError(f"--register {args.register} needs MLflow (the registry lives there): drop --no-mlflow, or "
                        f"drop --register")
    if getattr(args, "system_metrics", False):
        if args.no_mlflow:
            raise UserError("--system-metrics logs to the MLflow run: drop --no-mlflow, or drop --system-metrics")
        from trainers.tracking import SYSTEM_METRICS_ENV

        os.environ[SYSTEM_METRICS_ENV] = "true"  # MLflow's switch, read where the run starts
    train_cfg, scale_cfg, origin = _build(args)
    if args.register and train_cfg.supernet is not None:
        raise UserError(f"--register {args.register} with a supernet (train.supernet set): the registry holds single "
                        f"models; register the one-shot search's finalists instead (mixersnn search with mode: "
                        f"oneshot registers its best), or drop --register")
    preflight(train_cfg, track=not args.no_mlflow)
    if origin:
        _say_origin(train_cfg, scale_cfg, origin)
    # A default name is the model and a hash of the config: two configs never share a run.
    name = train_cfg.run_name or run_name_for(train_cfg, scale_cfg)
    if args.no_ray:
        run_dir = Path("runs/local") / name
    else:
        storage = scale_cfg.storage_path
        run_dir = Path(storage if "://" in storage else Path(storage).resolve()) / name
    claim_run(run_dir, train_cfg, scale_cfg, resume=args.resume)
    # The run is opened here, before training, with its spec and links to its source: Ray
    # Train's driver (fit) finds it by name and logs into it.
    run_id = None if args.no_mlflow else _open_run(train_cfg, scale_cfg, name, origin)
    t0 = time.time()
    if args.no_ray:
        from trainers.local import run_local

        metrics, ckpt = run_local(train_cfg, run_dir, run_id=run_id)
    else:
        from trainers.ray_train import fit
        from trainers.tracking import close_run, resolve_tracking_uri

        try:
            res = fit(train_cfg, scale_cfg, track=not args.no_mlflow, name=name,
                      ray_init_kwargs={"address": args.address} if getattr(args, "address", None) else None)
        except BaseException as err:  # fit closes the run it reopened; not if Ray never started
            if run_id is not None:
                close_run(resolve_tracking_uri(train_cfg.tracking_uri), run_id,
                          "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        metrics, ckpt, name = res.metrics, res.checkpoint_path, res.run_name
        run_id = res.mlflow_run_id or run_id
    wall = time.time() - t0
    registered = None
    if args.register and run_id is not None:
        from trainers.mlflow_model import log_registered_model
        from trainers.tracking import MLflowTracker, resolve_tracking_uri

        uri = resolve_tracking_uri(train_cfg.tracking_uri)
        version = log_registered_model(uri, run_id, args.register)
        registered = f"models:/{args.register}/{version}"
        MLflowTracker(uri, run_id).set_tags({"mixersnn.registered_model": registered})
    if args.json:
        print(json.dumps({"run_name": name, "run_id": run_id, "wall_s": wall, "checkpoint": ckpt,
                          **({"registered_model": registered} if registered else {}),
                          **({"source": origin} if origin else {}), **metrics}, default=str))
    else:
        print(_summary(name, metrics, ckpt, wall, train_cfg, run_id=run_id, origin=origin, registered=registered))
    return 0


def _say_origin(cfg: Any, scale: Any, origin: dict[str, Any]) -> None:
    """What a retrain takes from its source, on stderr before training: the architecture and
    the limits a search trial ran under (which a longer retrain usually lifts)."""
    import sys

    from mixersnn.models import model_config
    from trainers.loop import resolve_data

    data = resolve_data(cfg.data)  # as the loop builds the model: the data's shape, then the overrides
    mc = model_config(cfg.model, **{"img_size": data.img_size, "in_chans": data.in_chans,
                                    "num_classes": data.num_classes, **cfg.model_overrides})
    where = origin.get("model_uri") or (f"run {origin['run_id']}" if "run_id" in origin else cfg.model)
    scaled = f", scaled {_scale_text(origin['scale'])}" if "scale" in origin else ""
    limits = {k: getattr(cfg, k) for k in ("time_budget_s", "samples_per_epoch", "max_steps_per_epoch",
                                           "max_eval_batches") if getattr(cfg, k) is not None}
    held = (f", holding out {cfg.holdout_shards} training shard(s) as the search did (--holdout-shards 0 trains "
            "on them too)") if cfg.holdout_shards else ""
    lim = (", limits " + ", ".join(f"{k}={v}" for k, v in limits.items()) + " (flags with 'none' lift them: "
           "--time-budget-s none, --samples-per-epoch none, ...)") if limits else ""
    replaced = origin.get("config_model_overrides")
    if replaced:
        changes = ", ".join(f"{k} {d['from']} -> {d['to']}" for k, d in replaced.items())
        print(f"note: the --config file's model_overrides change the source's architecture: {changes}; to train "
              f"the source's architecture with that file's recipe, remove model_overrides from it (or give the "
              f"source's values as flags, e.g. --depths, --T)", file=sys.stderr)
    print(f"training from {where}{scaled}: C={mc.embed_dim} depths={list(mc.depths)} T={mc.T} p={mc.patch_size} "
          f"spe={mc.spe}, {cfg.epochs} epoch(s), batch {cfg.batch_size} x {scale.num_workers} worker(s), "
          f"lr {cfg.lr:g}{lim}{held}", file=sys.stderr)


def _scale_text(d: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _open_run(cfg: Any, scale: Any, name: str, origin: dict[str, Any]) -> str:
    """Create (or reopen, by name) the run, record its spec and its links to the source run
    and model; returns the run id."""
    from trainers.spec import SCALE_TAG, SOURCE_MODEL_TAG, SOURCE_RUN_TAG, RunSpec, log_run_spec
    from trainers.tracking import MLflowTracker, resolve_tracking_uri, start_run

    uri = resolve_tracking_uri(cfg.tracking_uri)
    tags: dict[str, Any] = {"mixersnn.kind": "train", "mixersnn.model": cfg.model}
    if "run_id" in origin:
        tags[SOURCE_RUN_TAG] = origin["run_id"]
    if "model_uri" in origin:
        tags[SOURCE_MODEL_TAG] = origin["model_uri"]
    if "scale" in origin:
        tags[SCALE_TAG] = _scale_text(origin["scale"])
    run_id = start_run(uri, cfg.experiment, name, parent_run_id=cfg.parent_run_id, tags=tags)
    log_run_spec(MLflowTracker(uri, run_id), RunSpec.of(cfg, kind="train", num_workers=scale.num_workers,
                                                         source=origin), tags=tags)
    return run_id


def _summary(name: str, m: dict[str, Any], ckpt: Any, wall: float, cfg: Any, *, run_id: Any = None,
             origin: Any = None, registered: Any = None) -> str:
    lines = [
        "",
        f"run {name}{f' ({run_id})' if run_id else ''}: {cfg.model} on {cfg.data}, "
        f"{int(m.get('epoch', -1)) + 1} epoch(s) in {wall:.0f} s",
        f"  test accuracy {m.get('test_acc', float('nan')):.4f} (top-5 {m.get('test_top5', float('nan')):.4f}), "
        f"test loss {m.get('test_loss', float('nan')):.4f}",
    ]
    if "energy_per_image_uj" in m:
        lines.append(
            f"  energy {m['energy_per_image_uj']:.4f} uJ/image ({m.get('sops_per_image', 0) / 1e6:.2f} M SOPs, "
            f"{m.get('macs_per_image', 0) / 1e6:.2f} M MACs, mean firing rate {m.get('mean_firing_rate', 0):.3f})"
        )
    if origin:
        src = origin.get("model_uri") or f"run {origin.get('run_id')}"
        how = f"scaled {_scale_text(origin['scale'])}" if "scale" in origin else "retrained"
        lines.append(f"  {how} from {src}" if "run_id" in origin else f"  {how}")
    lines.append(f"  checkpoint {ckpt}")
    if registered:
        lines.append(f"  registered as {registered}")
    if cfg.tracking_uri is None:
        from trainers.tracking import mlflow_ui_hint, resolve_tracking_uri

        lines.append(f"  review: {mlflow_ui_hint(resolve_tracking_uri(None))}")
    return "\n".join(lines)
