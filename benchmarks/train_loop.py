"""``mixersnn train``'s images/s against the bare step's: what loading, augmentation and
bookkeeping cost (issue 24: the loop within 10% of the step). Measured, not asserted.

One process, alternating rounds (a shared machine drifts over seconds, so the two are
measured under the same load):

- loop: ``trainers.loop.run_training`` for one epoch of ``--samples`` training images, with
  the config's model, batch, optimiser, augmentation and data (Fashion-MNIST shards, decoded
  once into the in-memory cache, as ``cache_data`` does for the full run); the figure is the
  epoch's own ``images_per_s`` (training steps only, as the run logs it). Evaluation, energy
  metering, model logging and MLflow are off: they run between epochs, outside that figure.
- step: the same model and batch size, one fixed batch already in memory: forward, the
  loop's soft-target loss, backward, gradient clipping and the optimiser step (what a step
  costs with no data to fetch).

    .venv/bin/python benchmarks/train_loop.py                      # configs/fashion_mnist_15min.yaml
    .venv/bin/python benchmarks/train_loop.py --rounds 5 --samples 6400 --json out.json
    .venv/bin/python benchmarks/train_loop.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import write_json  # noqa: E402

from mixersnn.models import create_model  # noqa: E402
from trainers.config import TrainConfig, load_yaml_config  # noqa: E402
from trainers.loop import WorkerContext, build_optimizer, resolve_data, run_training, soft_targets  # noqa: E402


def loop_config(path: Path, samples: int, compile_mode: Any) -> TrainConfig:
    """The YAML's training config, cut to one epoch of ``samples`` images, no evaluation cost
    beyond one batch, nothing logged."""
    train, _ = load_yaml_config(path)
    train.update(
        epochs=1, samples_per_epoch=samples, warmup_epochs=0.0, time_budget_s=None, max_eval_batches=1,
        full_final_eval=False, log_model=False, measure_energy=False, cache_data=True, run_name=None,
    )  # fmt: skip
    if compile_mode is not None:
        train["compile"] = compile_mode
    return TrainConfig.from_dict(train)


def bare_step(cfg: TrainConfig, steps: int) -> float:
    """Images/s of ``steps`` training steps on one in-memory batch (same model, batch, loss,
    clipping and optimiser as the loop)."""
    spec = resolve_data(cfg.data)
    over = {"img_size": spec.img_size, "in_chans": spec.in_chans, "num_classes": spec.num_classes, **cfg.model_overrides}
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **over).train()
    opt = build_optimizer(model, cfg)
    step_model = model
    if cfg.compile:
        from mixersnn.models.mixer_snn import compile_model

        step_model = compile_model(model, mode=cfg.compile, device_type="cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, spec.in_chans, spec.img_size, spec.img_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (cfg.batch_size,), generator=gen)

    def step() -> None:
        targets = soft_targets(y, spec.num_classes, cfg.label_smoothing)
        logits = step_model(x).float().mean(0)
        loss = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        float(loss.detach())  # the loop reads the loss every step too

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "fashion_mnist_15min.yaml")
    ap.add_argument("--samples", type=int, default=3200, help="training images per loop round (default 3200: 50 steps)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating loop/step rounds; medians are shown")
    ap.add_argument("--compile", default=None, help="override the config's compile (e.g. true)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--smoke", action="store_true", help="128 images, one round (CI)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.rounds = 128, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    compile_mode = None if args.compile is None else (True if args.compile.lower() == "true" else
                                                      False if args.compile.lower() == "false" else args.compile)  # fmt: skip
    cfg = loop_config(args.config, args.samples, compile_mode)
    ctx = WorkerContext(log=lambda msg: None)
    steps = max(1, args.samples // cfg.batch_size)
    t0 = time.perf_counter()
    run_training(cfg, ctx)  # warm-up: decodes the splits into the process's cache
    warm_s = time.perf_counter() - t0
    loop_ips: list[float] = []
    step_ips: list[float] = []
    for r in range(args.rounds):
        order = ("loop", "step") if r % 2 == 0 else ("step", "loop")
        for what in order:
            if what == "loop":
                loop_ips.append(float(run_training(cfg, ctx)["images_per_s"]))
            else:
                step_ips.append(bare_step(cfg, steps))
    loop_med, step_med = statistics.median(loop_ips), statistics.median(step_ips)
    # On a machine other jobs load, a round can run several times slower than the next (two
    # OpenMP threads on busy cores spin against each other); the best round of each is the
    # least disturbed estimate, so its ratio is reported beside the medians'.
    loop_best, step_best = max(loop_ips), max(step_ips)
    result = {
        "config": str(args.config),
        "model": cfg.model,
        "model_overrides": cfg.model_overrides,
        "batch": cfg.batch_size,
        "samples_per_round": steps * cfg.batch_size,
        "compile": cfg.compile,
        "threads": torch.get_num_threads(),
        "warmup_run_s": warm_s,
        "loop_images_per_s": loop_ips,
        "step_images_per_s": step_ips,
        "loop_median": loop_med,
        "step_median": step_med,
        "loop_vs_step": loop_med / step_med,
        "loop_best": loop_best,
        "step_best": step_best,
        "loop_vs_step_best": loop_best / step_best,
    }
    print(f"{args.config.name}: {cfg.model} {cfg.model_overrides}, batch {cfg.batch_size}, "
          f"{steps} steps per round, {args.rounds} rounds, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"  loop (mixersnn train's epoch): {loop_med:7.1f} img/s   rounds: {', '.join(f'{v:.0f}' for v in loop_ips)}")
    print(f"  bare step (batch in memory):   {step_med:7.1f} img/s   rounds: {', '.join(f'{v:.0f}' for v in step_ips)}")
    print(f"  loop / step: {100 * loop_med / step_med:.0f}% of medians, {100 * loop_best / step_best:.0f}% of best "
          f"rounds (target >= 90%)")  # fmt: skip
    write_json(args.json, result)


if __name__ == "__main__":
    main()
