"""The training loop in plain torch: one function, run as-is in one process or on every Ray
Train worker.

Everything distributed comes in through a :class:`WorkerContext` (rank, device, how to wrap
the model for DDP, how to report an epoch and where to resume from), so this file never
imports Ray; MLflow is reached only through the ``tracker`` the caller passes to rank 0.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mixersnn.models import MixerSNN, create_model
from mixersnn.models.mixer_snn import compile_model
from mixersnn.models.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save
from trainers.config import TrainConfig

__all__ = ["WorkerContext", "run_training", "CHECKPOINT_FILE", "resolve_data", "DataSpec"]

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class WorkerContext:
    """What the loop needs from whoever runs it.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        device: this rank's device.
        wrap_model: wraps the model for data parallelism (identity in one process).
        report: called once per epoch on every rank with ``(metrics, checkpoint_dir)``;
            ``checkpoint_dir`` holds ``checkpoint.pt`` on rank 0 and is None elsewhere.
        resume_dir: a directory holding ``checkpoint.pt`` to resume from, or None.
        tracker: MLflow tracker on rank 0 (``log_params``, ``log_metrics``, ``logged_epochs``,
            ``log_artifact``, ``log_dict``), None on other ranks or when tracking is off.
        log: progress printer (rank 0).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
    report: Callable[[dict[str, Any], Optional[Path]], None] = lambda metrics, ckpt: None
    resume_dir: Optional[Path] = None
    tracker: Any = None
    log: Callable[[str], None] = print

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class DataSpec:
    """Resolved data locations and the shape facts the model needs."""

    train: str
    eval: str
    img_size: int
    in_chans: int
    num_classes: int
    num_train: int
    num_eval: int
    flip_safe: Optional[bool] = None


def resolve_data(data: str) -> DataSpec:
    """Turn ``TrainConfig.data`` into split folders and read their manifests."""
    from mixersnn.data import default_shards, read_manifest

    from mixersnn.data import remote

    # Local folders and object-store prefixes (s3://bucket/data) are handled alike, as strings.
    if data == "fashion-mnist":
        root = str(default_shards())
    elif remote.is_remote(data):
        root = data.rstrip("/")
    else:
        root = str(Path(data))
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"data={data!r}: {root} is not a folder. Pass 'fashion-mnist' (the embedded default), "
                f"a folder or an s3:// prefix with train/ and test/ shard splits made by "
                f"`mixersnn data make-shards`"
            )

    def join(*names: str) -> str:
        return remote.join(root, *names) if remote.is_remote(root) else str(Path(root, *names))

    def exists(path: str) -> bool:
        return remote.exists(path) if remote.is_remote(path) else Path(path).exists()

    eval_dir = next((join(s) for s in ("test", "val", "validation") if exists(join(s, "manifest.json"))), None)
    if not exists(join("train", "manifest.json")) or eval_dir is None:
        raise FileNotFoundError(
            f"data={data!r}: {root} needs train/manifest.json and test/ (or val/) manifest.json; "
            f"make them with `mixersnn data make-shards`"
        )
    mtrain = read_manifest(join("train"))
    meval = read_manifest(eval_dir)
    return DataSpec(
        train=join("train"),
        eval=eval_dir,
        # Variable-size data (ImageNet folders stored unresized) has no fixed size: 224.
        img_size=int(mtrain.image_size[0]) if mtrain.image_size else 224,
        in_chans=int(mtrain.channels),
        num_classes=len(mtrain.classes),
        num_train=int(mtrain.num_samples),
        num_eval=int(meval.num_samples),
        flip_safe=mtrain.flip_safe,
    )


# ----------------------------------------------------------------------------- pieces
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on BatchNorm parameters and biases (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return _fast_optimizer(torch.optim.SGD, groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return _fast_optimizer(torch.optim.AdamW, groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def _fast_optimizer(cls: type, groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """``cls(groups, fused=True)``: one kernel over all parameters (CPU and CUDA in current
    torch; measured in docs/benchmarks.md, "Training step"), else ``foreach=True``, else the
    per-parameter loop. The update is the same arithmetic in every form."""
    for extra in ({"fused": True}, {"foreach": True}):
        try:
            return cls(groups, **kwargs, **extra)
        except (RuntimeError, ValueError, TypeError):  # this torch or device has no such form
            continue
    return cls(groups, **kwargs)


class TrainClock:
    """Training time (seconds), excluding evaluation and checkpointing; survives resume."""

    def __init__(self, already: float = 0.0) -> None:
        self.already = already
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.already += time.perf_counter() - self._start
            self._start = None

    def elapsed(self) -> float:
        return self.already + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def sync(self, device: torch.device) -> float:
        """The elapsed time agreed by every rank (the maximum), kept in ``synced``.

        Learning rates and the decision to stop must be identical on all ranks, or DDP
        replicas drift apart (different steps) or hang (different step counts).
        """
        t = self.elapsed()
        if _distributed():
            v = torch.tensor([t], dtype=torch.float64, device=device)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
            t = float(v)
        self.synced = t
        return t

    synced: float = 0.0


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, clock: Optional[TrainClock] = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    The cosine runs over all ``epochs``, or, with ``time_budget_s`` and a ``clock``, over
    whichever ends first: a fixed-time run (the 15-minute benchmark, a search trial with a
    wall-clock budget) still anneals fully instead of stopping at a high learning rate.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    budget = cfg.time_budget_s if clock is not None else None

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if budget is not None:
            progress = max(progress, clock.synced / budget)  # type: ignore[union-attr]
        progress = min(1.0, progress)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    t.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)
    return t


def mix_batch(
    x: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix on a batch with soft targets (one of them per batch, chosen at random)."""
    use_mixup = cfg.mixup > 0
    use_cutmix = cfg.cutmix > 0
    if not (use_mixup or use_cutmix):
        return x, targets
    if use_mixup and use_cutmix:
        use_mixup = bool(torch.rand((), generator=gen) < 0.5)
        use_cutmix = not use_mixup
    alpha = cfg.mixup if use_mixup else cfg.cutmix
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if use_mixup:
        x = lam * x + (1 - lam) * x[perm]
    else:
        H, W = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy = int(torch.randint(H, (1,), generator=gen))
        cx = int(torch.randint(W, (1,), generator=gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    return x, lam * targets + (1 - lam) * targets[perm]


def amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None: AMP is a CUDA feature here, CPU runs in fp32."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def replica_divergence(model: nn.Module, device: torch.device) -> float:
    """Largest difference between DDP replicas of a few parameter checksums (0 when in sync).

    Each rank reduces its parameters to (sum, sum of squares, position-weighted sum) in
    float64; replicas that DDP keeps identical give identical triples. A non-zero value means
    the ranks drifted apart (a bug, or non-deterministic kernels at the last few ulps).
    """
    if not _distributed():
        return 0.0
    s0 = s1 = s2 = 0.0
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            v = p.detach().double()
            s0 += float(v.sum())
            s1 += float((v * v).sum())
            s2 += (i + 1) * float(v.mean())
    mine = torch.tensor([s0, s1, s2], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    stacked = torch.stack(everyone)
    return float((stacked.max(0).values - stacked.min(0).values).abs().max())


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    num_classes: int,
    max_batches: Optional[int] = None,
    meter: Any = None,
    autocast: Optional[torch.dtype] = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy and loss on T-averaged logits, summed over every rank."""
    model.eval()
    loss_sum = correct1 = correct5 = n = 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None), (
            meter.recording() if meter is not None else contextlib.nullcontext()
        ):
            logits = model(x).float().mean(0)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, num_classes)
        top = logits.topk(k, dim=1).indices
        correct1 += float((top[:, 0] == y).sum())
        correct5 += float((top == y.unsqueeze(1)).any(1).sum())
        n += y.shape[0]
    loss_sum, correct1, correct5, n = _all_reduce_sum([loss_sum, correct1, correct5, n], device)
    n = max(n, 1.0)
    return {"test_loss": loss_sum / n, "test_acc": correct1 / n, "test_top5": correct5 / n, "test_samples": n}


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """:func:`evaluate`'s ``test_*`` keys renamed ``<prefix>_*`` (the held-out shards' figures)."""
    return {prefix + k[len("test"):]: v for k, v in metrics.items()}


# ----------------------------------------------------------------------------- data
#: Largest decoded split (bytes) that ``cache_data: auto`` keeps in memory.
CACHE_LIMIT_BYTES = 2 << 30


def build_loaders(cfg: TrainConfig, spec: DataSpec, img_size: int, ctx: WorkerContext) -> tuple[Any, Any, Any]:
    """This rank's train, eval (test split) and validation loaders: streamed from the shards,
    or batched from the decoded splits held in memory (:mod:`mixersnn.data.memory`) when
    ``cache_data`` says so. The validation loader reads the ``holdout_shards`` held out of the
    training split with the eval transform; None when nothing is held out.

    ``auto`` caches a split of fixed-size images (all splits within :data:`CACHE_LIMIT_BYTES`)
    when this process holds it decoded already (a reused search-trial process), or when the
    run reads at least as many samples as the split holds: decoding it once then costs no more
    than streaming. Transforms follow the model's input size, which may differ from the
    stored size.
    """
    from mixersnn.data import augment_preset, build_loader, eval_preset
    from mixersnn.data.memory import MemoryLoader, decoded_nbytes, is_cached

    eval_tf = eval_preset(img_size, source_size=spec.img_size)
    common = dict(num_workers=cfg.data_workers, rank=ctx.rank, world_size=ctx.world_size)
    train = build_loader(train_source(spec, cfg.holdout_shards), batch_size=cfg.batch_size, train=True, seed=cfg.seed,
                         transform=augment_preset(cfg.augment, img_size, flip_safe=spec.flip_safe,
                                                  source_size=spec.img_size), **common)
    evaluation = build_loader(spec.eval, batch_size=cfg.eval_batch_size, train=False, transform=eval_tf, **common)
    loaders = [train, evaluation]
    if cfg.holdout_shards:
        loaders.append(build_loader(holdout_source(spec, cfg.holdout_shards), batch_size=cfg.eval_batch_size,
                                    train=False, transform=eval_tf, **common))
    if cfg.cache_data != "auto":
        loaders = [MemoryLoader(ld) for ld in loaders] if cfg.cache_data else loaders
    else:
        sizes = [decoded_nbytes(ld) for ld in loaders]
        if not any(n is None for n in sizes) and sum(sizes) <= CACHE_LIMIT_BYTES:  # type: ignore[misc]
            per_epoch = epoch_steps(cfg, len(train), ctx.world_size) * cfg.batch_size
            reads = [cfg.epochs * per_epoch] + [
                cfg.epochs * cfg.eval_batch_size * (len(ld) if cfg.max_eval_batches is None else min(len(ld), cfg.max_eval_batches))
                for ld in loaders[1:]]  # fmt: skip
            loaders = [MemoryLoader(ld) if is_cached(ld) or n >= ld.num_samples else ld for ld, n in zip(loaders, reads)]
    return loaders[0], loaders[1], (loaders[2] if len(loaders) > 2 else None)


def train_source(spec: DataSpec, holdout_shards: int) -> Any:
    """The training split, less its last ``holdout_shards`` shards (``Manifest.holdout``)."""
    if not holdout_shards:
        return spec.train
    from mixersnn.data import read_manifest

    return read_manifest(spec.train).holdout(holdout_shards)[0]


def holdout_source(spec: DataSpec, holdout_shards: int) -> Any:
    """The held-out last ``holdout_shards`` shards of the training split."""
    from mixersnn.data import read_manifest

    return read_manifest(spec.train).holdout(holdout_shards)[1]


def epoch_steps(cfg: TrainConfig, batches: int, world_size: int) -> int:
    """Training steps in one epoch: the loader's batches, capped by ``max_steps_per_epoch``
    and by ``samples_per_epoch`` (images over all ranks, in whole global batches)."""
    steps = batches
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    if cfg.samples_per_epoch is not None:
        steps = min(steps, max(1, cfg.samples_per_epoch // (cfg.batch_size * world_size)))
    return steps


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """What one rank trains with: built by :func:`_setup`, advanced by the epoch loop."""

    spec: DataSpec
    model: nn.Module  # a MixerSNN, or a MixerSNNSupernet (cfg.supernet)
    ddp_model: nn.Module  # what evaluation calls
    step_model: nn.Module  # what the training step calls: ddp_model, compiled when asked
    train_loader: Any
    eval_loader: Any
    val_loader: Any  # the held-out training shards (cfg.holdout_shards), or None
    steps_per_epoch: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    clock: TrainClock
    autocast: Optional[torch.dtype]
    gen: torch.Generator
    meter: Any = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    logged_epochs: set[int] = field(default_factory=set)


def run_training(cfg: TrainConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train ``cfg`` on this rank; returns the last epoch's metrics (identical on every rank).

    Resumes from ``ctx.resume_dir`` when given: model, optimiser, scheduler, scaler, epoch
    and the metric history all come back, and epochs before the checkpoint are not re-run.
    """
    run = _setup(cfg, ctx)
    metrics: dict[str, Any] = run.history[-1] if run.history else {}
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        totals, out_of_time = _train_epoch(run, cfg, ctx, epoch)
        epoch_time = time.perf_counter() - t0
        last = out_of_time or epoch == cfg.epochs - 1
        metrics = _epoch_metrics(run, cfg, epoch, totals, epoch_time, last=last, device=ctx.device)
        run.history.append(metrics)
        _checkpoint_and_report(run, cfg, ctx, epoch, metrics)
        if out_of_time:
            ctx.log(f"time budget {cfg.time_budget_s:.0f} s of training used in epoch {epoch + 1}; stopping")
            break
    if ctx.is_main and ctx.tracker is not None and cfg.log_model:
        sample = next(iter(run.eval_loader))[0][:16].to(ctx.device)
        _log_final_model(ctx.tracker, run.model, cfg, metrics, sample)
    return metrics


def _setup(cfg: TrainConfig, ctx: WorkerContext) -> _Run:
    """Model, loaders, optimiser, schedule and AMP for this rank, resumed from
    ``ctx.resume_dir`` when given; a new run logs its parameters."""
    torch.manual_seed(cfg.seed + ctx.rank)
    device = ctx.device
    if device.type == "cpu":
        from mixersnn.kernels import keep_heap_pages

        keep_heap_pages()  # every step allocates the same sizes: reuse mapped pages, no faults
    spec = resolve_data(cfg.data)
    overrides = {"img_size": spec.img_size, "in_chans": spec.in_chans, "num_classes": spec.num_classes}
    overrides.update(cfg.model_overrides)
    model = _build_model(cfg, overrides).to(device)
    if cfg.supernet is not None:
        _broadcast_from_rank0(model)

    train_loader, eval_loader, val_loader = build_loaders(cfg, spec, model.config.img_size, ctx)
    steps_per_epoch = epoch_steps(cfg, len(train_loader), ctx.world_size)
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training split {spec.train} gives 0 batches of {cfg.batch_size} per rank with "
            f"{ctx.world_size} ranks; lower batch_size or use fewer workers"
        )
    opt = build_optimizer(model, cfg)
    # Read once: the clock needs the time already trained before the scheduler is built, the
    # rest is loaded into model, optimiser and scheduler by _resume.
    state = None
    if ctx.resume_dir is not None:
        state = torch.load(Path(ctx.resume_dir) / CHECKPOINT_FILE, map_location=device, weights_only=True)
    clock = TrainClock(float(state.get("train_time_s", 0.0)) if state is not None else 0.0)
    sched = build_scheduler(opt, cfg, steps_per_epoch, clock)
    autocast = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    run = _Run(spec=spec, model=model, ddp_model=model, step_model=model, train_loader=train_loader,
               eval_loader=eval_loader, val_loader=val_loader, steps_per_epoch=steps_per_epoch, opt=opt, sched=sched, scaler=scaler,
               clock=clock, autocast=autocast, gen=torch.Generator().manual_seed(cfg.seed * 1000 + ctx.rank),
               # A supernet's subnets run through per-subnet templates the meter cannot hook;
               # the one-shot search measures each subnet it scores instead.
               meter=_energy_meter(model) if cfg.measure_energy and cfg.supernet is None else None)
    if state is not None:
        _resume(run, state, ctx)
    # A supernet is not wrapped for DDP: each step runs several subnets, each using part of
    # the weights, and _sandwich_step averages the accumulated gradients over ranks itself.
    run.ddp_model = ctx.wrap_model(model) if cfg.supernet is None else model
    # Evaluation stays eager: its eval-mode graph would be a second compile.
    run.step_model = (compile_model(run.ddp_model, mode=cfg.compile, device_type=device.type)
                      if cfg.compile else run.ddp_model)  # fmt: skip
    if ctx.is_main and ctx.tracker is not None:
        if run.start_epoch == 0:
            ctx.tracker.log_params(
                {**{f"train.{k}": v for k, v in cfg.to_dict().items() if k != "model_overrides"},
                 **{f"model.{k}": v for k, v in model.config.to_dict().items()},
                 "model.num_params": sum(p.numel() for p in model.parameters()),
                 **({"supernet.subnets": model.space.size()} if cfg.supernet is not None else {}),
                 "scale.world_size": ctx.world_size}
            )
        # Epochs this run has already logged. An epoch's metrics go to MLflow before its
        # checkpoint is reported; a worker killed between the two (or before Ray registered
        # the checkpoint) trains that epoch again on restart, and it must not be logged twice.
        run.logged_epochs = ctx.tracker.logged_epochs()
    return run


def _resume(run: _Run, state: dict[str, Any], ctx: WorkerContext) -> None:
    """Load a checkpoint's model, optimiser, schedule, scaler and history into ``run``."""
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch = int(state["epoch"]) + 1
    run.history = list(state.get("history", []))
    ctx.log(f"resumed from epoch {run.start_epoch - 1} ({ctx.resume_dir})")
    if ctx.is_main and ctx.tracker is not None:
        ctx.tracker.log_metrics({"resumed_from_epoch": run.start_epoch - 1}, step=run.start_epoch)


def _train_epoch(run: _Run, cfg: TrainConfig, ctx: WorkerContext, epoch: int) -> tuple[list[float], bool]:
    """One epoch of training steps; returns (loss sum, correct, seen) summed over ranks, and
    whether the time budget ran out (the schedule has reached its floor: evaluate and stop)."""
    device = ctx.device
    if hasattr(run.train_loader, "set_epoch"):
        run.train_loader.set_epoch(epoch)
    run.ddp_model.train()
    run.clock.start()
    loss_sum = correct = seen = 0.0
    out_of_time = False
    for step, (x, y) in enumerate(run.train_loader):
        if step >= run.steps_per_epoch:
            break
        if cfg.time_budget_s is not None and run.clock.sync(device) >= cfg.time_budget_s:
            out_of_time = True
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        step_fn = _train_step if cfg.supernet is None else _sandwich_step
        loss, logits = step_fn(run, cfg, x, y, epoch, step)
        loss_sum += float(loss.detach()) * y.shape[0]
        correct += float((logits.argmax(1) == y).sum())
        seen += y.shape[0]
        if ctx.is_main and step % 50 == 0:
            ctx.log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{run.steps_per_epoch} "
                    f"loss {loss_sum / max(seen, 1):.4f} lr {run.sched.get_last_lr()[0]:.3g}")
    run.clock.stop()
    return _all_reduce_sum([loss_sum, correct, seen], device), out_of_time


def _train_step(run: _Run, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, epoch: int,
                step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (soft targets, mixing, autocast), backward, clipping and the optimiser step;
    returns the loss and the time-averaged logits."""
    targets = soft_targets(y, run.spec.num_classes, cfg.label_smoothing)
    x, targets = mix_batch(x, targets, cfg, run.gen)
    with torch.autocast(x.device.type, dtype=run.autocast, enabled=run.autocast is not None):
        logits = run.step_model(x).float().mean(0)
        loss = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {float(loss.detach())} at epoch {epoch} step {step}; lower lr (now "
            f"{run.sched.get_last_lr()[0]:.3g}) or turn on grad_clip"
        )
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.grad_clip is not None:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    return loss, logits


def _sandwich_step(run: _Run, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, epoch: int,
                   step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One supernet step by the sandwich rule (BigNAS, Yu et al. 2020): the largest subnet
    learns from the labels, then the smallest and ``cfg.sandwich_random`` random subnets from
    the largest's predictions (in-place distillation); their gradients accumulate into one
    optimiser step. Every subnet's backward runs before the next forward, so memory is that of
    one subnet. Returns the largest subnet's loss and logits.

    Only the largest subnet updates BatchNorm running statistics, so the per-epoch evaluation
    (of the largest) is on its own statistics; subnets are scored after recalibration. Over
    several ranks the subnets are the same on every rank (drawn from the step's seed) and the
    gradients are averaged here, not by DDP (which expects every weight used once per step).
    """
    supernet = run.model
    targets = soft_targets(y, run.spec.num_classes, cfg.label_smoothing)
    x, targets = mix_batch(x, targets, cfg, run.gen)
    rng = random.Random(f"{cfg.seed}:{epoch}:{step}")
    space = supernet.space  # type: ignore[attr-defined]
    specs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(cfg.sandwich_random)]
    run.opt.zero_grad(set_to_none=True)
    teacher: Optional[torch.Tensor] = None
    first: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    for i, spec in enumerate(specs):
        with torch.autocast(x.device.type, dtype=run.autocast, enabled=run.autocast is not None):
            logits = supernet(x, spec, update_bn_stats=i == 0).float().mean(0)
            soft = targets if teacher is None else teacher
            loss = torch.sum(-soft * F.log_softmax(logits, dim=1), dim=1).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss of subnet {spec} is {float(loss.detach())} at epoch {epoch} step {step}; lower lr "
                f"(now {run.sched.get_last_lr()[0]:.3g}) or turn on grad_clip"
            )
        run.scaler.scale(loss).backward()
        if teacher is None:
            teacher = F.softmax(logits.detach(), dim=1)
            first = (loss, logits)
    _average_gradients(supernet)
    if cfg.grad_clip is not None:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(supernet.parameters(), cfg.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    assert first is not None
    return first


def _distributed() -> bool:
    """More than one rank: collectives are needed (and would fail without a process group)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Make every rank start from rank 0's weights and statistics (what DDP does on wrapping)."""
    if not _distributed():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def _average_gradients(model: nn.Module) -> None:
    """Average the accumulated gradients over ranks in one flat all-reduce."""
    if not _distributed():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(avg)


def _build_model(cfg: TrainConfig, overrides: dict[str, Any]) -> nn.Module:
    """``cfg.model`` with ``overrides``, or the supernet over ``cfg.supernet`` around it."""
    if cfg.supernet is None:
        return create_model(cfg.model, **overrides)
    from mixersnn.models import model_config
    from mixersnn.models.supernet import MixerSNNSupernet, SupernetSpace

    return MixerSNNSupernet(model_config(cfg.model, **overrides), SupernetSpace.from_dict(cfg.supernet))


def _epoch_metrics(run: _Run, cfg: TrainConfig, epoch: int, totals: list[float], epoch_time: float, *,
                   last: bool, device: torch.device) -> dict[str, Any]:
    """Evaluate and gather the epoch's metrics. The last evaluation is of the whole split when
    asked (``full_final_eval``): the figure a run ends with is then exact, the ones before it
    cheaper samples."""
    loss_sum, correct, seen = totals
    if run.meter is not None:
        run.meter.reset()
    t_eval = time.perf_counter()
    max_batches = None if cfg.full_final_eval and last else cfg.max_eval_batches
    ev = evaluate(run.ddp_model, run.eval_loader, device=device, num_classes=run.spec.num_classes,
                  max_batches=max_batches, meter=run.meter, autocast=run.autocast)
    if run.val_loader is not None:
        # Held-out training shards: what a search ranks and selects on, so that the test
        # split's figure of the model it picks is not the maximum of many noisy draws.
        ev.update(_prefixed(evaluate(run.ddp_model, run.val_loader, device=device, num_classes=run.spec.num_classes,
                                     max_batches=max_batches, autocast=run.autocast), "val"))
    loaders = [ld for ld in (run.train_loader, run.eval_loader, run.val_loader) if ld is not None]
    metrics = {
        "epoch": epoch,
        "train_loss": loss_sum / seen if seen else float("nan"),
        "train_acc": correct / seen if seen else float("nan"),
        **ev,
        "lr": run.sched.get_last_lr()[0],
        "images_per_s": seen / max(epoch_time, 1e-9),
        "epoch_time_s": epoch_time,
        "eval_time_s": time.perf_counter() - t_eval,
        "train_time_s": run.clock.elapsed(),
        "replica_divergence": replica_divergence(run.model, device),
        # Damaged data is skipped, counted and reported, never silently absorbed.
        "corrupt_shards_skipped": float(sum(ld.stats.corrupt_shards for ld in loaders)),
        "corrupt_samples_skipped": float(sum(ld.stats.corrupt_samples for ld in loaders)),
    }
    if run.meter is not None:
        metrics.update(run.meter.summary(run.model.config))
    return metrics


def _checkpoint_and_report(run: _Run, cfg: TrainConfig, ctx: WorkerContext, epoch: int,
                           metrics: dict[str, Any]) -> None:
    """Rank 0 writes the epoch's checkpoint and logs its metrics (once per epoch, even after a
    restart); every rank reports to the caller (Ray Train, Tune or the local runner)."""
    ckpt_dir: Optional[Path] = None
    if ctx.is_main:
        ckpt_dir = Path(tempfile.mkdtemp(prefix="mixersnn-ckpt-"))
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": run.model.config.to_dict(),
                "model_name": cfg.model,
                "model": run.model.state_dict(),
                "supernet": cfg.supernet,
                "optimizer": run.opt.state_dict(),
                "scheduler": run.sched.state_dict(),
                "scaler": run.scaler.state_dict(),
                "epoch": epoch,
                "train_config": cfg.to_dict(),
                "history": run.history,
                "train_time_s": run.clock.elapsed(),
            },
            ckpt_dir / CHECKPOINT_FILE,
        )
        if ctx.tracker is not None and epoch not in run.logged_epochs:
            ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        ctx.log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_acc']:.4f} | test loss {metrics['test_loss']:.4f} "
            f"acc {metrics['test_acc']:.4f}"
            + (f" | val acc {metrics['val_acc']:.4f}" if "val_acc" in metrics else "")
            + f" | {metrics['images_per_s']:.0f} img/s"
            + (f" | {metrics['energy_per_image_uj']:.3f} uJ/img" if "energy_per_image_uj" in metrics else "")
        )
    try:
        ctx.report(metrics, ckpt_dir)
    finally:
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _energy_meter(model: MixerSNN) -> Any:
    """The accounting module's firing-rate meter, hooked into the eval forward passes."""
    from trainers.energy import EnergyMeter

    return EnergyMeter(model)


def _log_final_model(
    tracker: Any, model: MixerSNN, cfg: TrainConfig, metrics: dict[str, Any], sample: torch.Tensor
) -> None:
    from trainers.energy import mfi_report

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.pt"
        atomic_torch_save(
            {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "model_name": cfg.model,
             "model": model.state_dict(), "supernet": cfg.supernet, "metrics": metrics},
            path,
        )
        tracker.log_artifact(str(path), "model")
    # A supernet is logged whole (load it with trainers.loop.load_supernet); its MFI check is
    # that of its largest subnet, a stand-alone MixerSNN.
    report = mfi_report(model.extract() if cfg.supernet is not None else model, sample)
    tracker.log_dict(report, "model/mfi_report.json")
    tracker.set_tags({"mixersnn.mfi_ok": report.get("ok")})
