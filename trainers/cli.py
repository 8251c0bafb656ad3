"""``mixersnn train``: train one Mixer-SNN variant with Ray Train (or in this process)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

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
    "time_budget": "time_budget_s", "tracking_uri": "tracking_uri", "experiment": "experiment",
    "run_name": "run_name",
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


def _depths(s: str) -> list[int]:
    try:
        return [int(v) for v in s.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depths {s!r} must be comma-separated integers, e.g. 1,2,1") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--config", help="YAML file with train: and scale: sections (flags override it)")
    g.add_argument("--model", help="registry name (see `mixersnn models`)")
    g.add_argument("--data", help="'fashion-mnist' (default, built on demand) or a folder with train/ and test/ shards")
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
    o.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    o.add_argument("--max-steps-per-epoch", type=int, help="smoke runs")
    o.add_argument("--max-eval-batches", type=int, help="smoke runs")
    s = p.add_argument_group("scale")
    s.add_argument("--workers", type=int, help="data-parallel workers")
    s.add_argument("--gpus-per-worker", type=float, help="> 0 turns GPUs on")
    s.add_argument("--cpus-per-worker", type=float)
    s.add_argument("--max-failures", type=int, help="restarts from the last checkpoint")
    s.add_argument("--storage-path", help="Ray Train checkpoints (default runs/ray)")
    s.add_argument("--no-ray", action="store_true", help="run the loop in this process (debugging)")
    t = p.add_argument_group("tracking")
    t.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    t.add_argument("--experiment")
    t.add_argument("--run-name", help="a run with the same name and config resumes from its last checkpoint "
                   "(default: the model and a hash of the config)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run of this name even though its recorded config differs")
    t.add_argument("--no-mlflow", action="store_true")
    t.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """Merge dataclass defaults <- YAML file <- flags into (TrainConfig, ScaleConfig)."""
    from trainers.config import ConfigError, ScaleConfig, TrainConfig, load_yaml_config

    train_d: dict[str, Any] = {}
    scale_d: dict[str, Any] = {}
    if args.config:
        train_d, scale_d = load_yaml_config(args.config)
    overrides = dict(train_d.get("model_overrides") or {})
    for flag, key in _TRAIN_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            train_d[key] = v
    for flag, key in _MODEL_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            overrides[key] = v
    if args.no_spe:
        overrides["spe"] = False
    if "depths" in overrides:
        overrides["depths"] = list(overrides["depths"])
    train_d["model_overrides"] = overrides
    for flag, key in _SCALE_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            scale_d[key] = v
    if args.gpus_per_worker:
        scale_d["use_gpu"] = True
    known = set(ScaleConfig.__dataclass_fields__)
    unknown = sorted(set(scale_d) - known)
    if unknown:
        raise ConfigError(f"scale: unknown keys {unknown}; valid keys: {sorted(known)}")
    return TrainConfig.from_dict(train_d), ScaleConfig(**scale_d)


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

    train_cfg, scale_cfg = build_configs(args)
    preflight(train_cfg, track=not args.no_mlflow)
    # A default name is the model and a hash of the config: two configs never share a run.
    name = train_cfg.run_name or run_name_for(train_cfg, scale_cfg)
    if args.no_ray:
        run_dir = Path("runs/local") / name
    else:
        storage = scale_cfg.storage_path
        run_dir = Path(storage if "://" in storage else Path(storage).resolve()) / name
    claim_run(run_dir, train_cfg, scale_cfg, resume=args.resume)
    t0 = time.time()
    if args.no_ray:
        metrics, ckpt = _run_local(train_cfg, name, track=not args.no_mlflow)
    else:
        from trainers.ray_train import fit

        res = fit(train_cfg, scale_cfg, track=not args.no_mlflow, name=name)
        metrics, ckpt, name = res.metrics, res.checkpoint_path, res.run_name
    wall = time.time() - t0
    if args.json:
        print(json.dumps({"run_name": name, "wall_s": wall, "checkpoint": ckpt, **metrics}, default=str))
    else:
        print(_summary(name, metrics, ckpt, wall, train_cfg))
    return 0


def _run_local(cfg: Any, name: str, *, track: bool) -> tuple[dict[str, Any], str]:
    """The loop in this process: no Ray, checkpoints under runs/local/<run name>/."""
    import shutil

    from mixersnn.errors import UserError
    from trainers.loop import CHECKPOINT_FILE, WorkerContext, run_training
    from trainers.tracking import MLflowTracker, close_run, resolve_tracking_uri, start_run

    out = Path("runs/local") / name
    out.mkdir(parents=True, exist_ok=True)
    resume = out if (out / CHECKPOINT_FILE).exists() else None
    tracker, uri, run_id = None, resolve_tracking_uri(cfg.tracking_uri), None
    if track:
        run_id = start_run(uri, cfg.experiment, name, parent_run_id=cfg.parent_run_id)
        tracker = MLflowTracker(uri, run_id)

    def report(metrics: dict[str, Any], ckpt_dir: Any) -> None:
        if ckpt_dir is not None:
            tmp = out / (CHECKPOINT_FILE + ".tmp")
            try:
                shutil.copyfile(Path(ckpt_dir) / CHECKPOINT_FILE, tmp)
                tmp.replace(out / CHECKPOINT_FILE)
            except OSError as err:  # a full or failing disk: the previous checkpoint is untouched
                tmp.unlink(missing_ok=True)
                raise UserError(f"cannot write the checkpoint of epoch {int(metrics['epoch']) + 1} to {out} "
                                f"({err.strerror or err}); the previous checkpoint there is intact: free space and "
                                f"run the same command again to continue from it") from None

    status = "FAILED"
    try:
        metrics = run_training(cfg, WorkerContext(report=report, resume_dir=resume, tracker=tracker))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"  # stopped by the user: the same command continues from the last epoch
        raise
    finally:
        if run_id:
            close_run(uri, run_id, status)
    return metrics, str(out / CHECKPOINT_FILE)


def _summary(name: str, m: dict[str, Any], ckpt: Any, wall: float, cfg: Any) -> str:
    lines = [
        "",
        f"run {name}: {cfg.model} on {cfg.data}, {int(m.get('epoch', -1)) + 1} epoch(s) in {wall:.0f} s",
        f"  test accuracy {m.get('test_acc', float('nan')):.4f} (top-5 {m.get('test_top5', float('nan')):.4f}), "
        f"test loss {m.get('test_loss', float('nan')):.4f}",
    ]
    if "energy_per_image_uj" in m:
        lines.append(
            f"  energy {m['energy_per_image_uj']:.4f} uJ/image ({m.get('sops_per_image', 0) / 1e6:.2f} M SOPs, "
            f"{m.get('macs_per_image', 0) / 1e6:.2f} M MACs, mean firing rate {m.get('mean_firing_rate', 0):.3f})"
        )
    lines.append(f"  checkpoint {ckpt}")
    if cfg.tracking_uri is None:
        from trainers.tracking import mlflow_ui_hint, resolve_tracking_uri

        lines.append(f"  review: {mlflow_ui_hint(resolve_tracking_uri(None))}")
    return "\n".join(lines)
