"""``mixersnn energy``: per-layer SOPs, MACs and energy of a model on real data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

HELP = "Measure firing rates on data and print per-layer dense ops, SOPs, MACs and energy."

# Names of the embedded Fashion-MNIST (its shards built on first use, as `train` does).
_FMNIST_ALIASES = ("fashion-mnist", "fashion_mnist", "fmnist")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="registry variant name, a checkpoint / MFI export file, or a trained model's MLflow URI: "
                   "runs:/RUN_ID (its final model), runs:/RUN_ID/PATH, models:/NAME/VERSION (or /latest, @ALIAS)")
    p.add_argument(
        "--data",
        required=True,
        help="'fashion-mnist' (built on first use) or a shard root holding train/ and test/, as `train --data` "
        "takes (--split picks the split); also one split's folder or manifest, or a folder of MNIST-format idx files",
    )
    p.add_argument("--split", choices=("train", "test"), default="test",
                   help="the split of --data to measure on (default test)")
    p.add_argument("--batches", type=int, default=4, help="batches to measure rates on (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--mac-pj", type=float, default=None, help="energy per MAC in pJ (default 4.6)")
    p.add_argument("--ac-pj", type=float, default=None, help="energy per AC/SOP in pJ (default 0.9)")
    p.add_argument("--img-size", type=int, default=None, help="override the input size (registry names only)")
    p.add_argument("--in-chans", type=int, default=None, help="override the input channels (registry names only)")
    p.add_argument("--num-classes", type=int, default=None, help="override the class count (registry names only)")
    p.add_argument("--T", type=int, default=None, help="override the time steps")
    p.add_argument("--embed-dim", type=int, default=None, help="override the stage-1 width (registry names only)")
    p.add_argument("--seed", type=int, default=0, help="seed for an untrained registry model's weights")
    p.add_argument("--tracking-uri", help="MLflow URI for runs:/ and models:/ models (default $MLFLOW_TRACKING_URI, "
                   "else sqlite:///./mlflow.db)")


def _load(args: argparse.Namespace):
    """The model: a checkpoint, an MFI export or a freshly initialised registry variant."""
    import torch

    from mixersnn.models import create_model, list_models, load_model

    overrides = {
        "img_size": args.img_size,
        "in_chans": args.in_chans,
        "num_classes": args.num_classes,
        "embed_dim": args.embed_dim,
        "T": args.T,
    }
    path = Path(args.model)
    if args.model.startswith(("runs:/", "models:/")):
        # A trained model in MLflow: the command line is the edge where the library meets the
        # tracker, so MLflow is reached through trainers, and only for such a URI.
        from trainers.mlflow_model import load_model_uri

        _no_shape_overrides(overrides, args.model)
        model = load_model_uri(args.model, args.tracking_uri)
        if args.T is not None:
            model.config = model.config.replace(T=args.T)
        return model
    if path.is_file():
        _no_shape_overrides(overrides, f"checkpoint {path}")
        if path.suffix == ".safetensors":
            from mixersnn.accounting import load_mfi

            model = load_mfi(path)
        else:
            model = load_model(path)
        if args.T is not None:
            # T changes no weight, so a trained model can be measured at another T.
            model.config = model.config.replace(T=args.T)
        return model
    if args.model in list_models():
        torch.manual_seed(args.seed)
        return create_model(args.model, **overrides)
    raise SystemExit(
        f"error: --model {args.model!r} is neither a file nor a registered model; use a checkpoint "
        f"path or one of {list_models()}"
    )


def _no_shape_overrides(overrides: dict, what: str) -> None:
    shape_over = {k: v for k, v in overrides.items() if v is not None and k != "T"}
    if shape_over:
        raise SystemExit(
            f"error: {sorted(shape_over)} cannot change a trained model's shapes (the weights fix "
            f"them); drop those options for {what}"
        )


def _batches(source: str, *, split: str, batch_size: int) -> Iterator[Any]:
    """Batches ``(float32 [B, C, H, W], int64 [B])`` of ``split`` from ``source``, in order, through
    the data package's loader: the eval transform, normalised with the split manifest's mean/std.

    ``source`` is what :func:`_split_source` accepts; an idx folder other than the embedded
    Fashion-MNIST is converted to shards in a temporary folder first.
    """
    import tempfile

    from mixersnn.data import build_loader

    with tempfile.TemporaryDirectory(prefix="mixersnn-energy-") as tmp:
        yield from build_loader(_split_source(source, split, Path(tmp)), batch_size=batch_size, train=False)


def _split_source(source: str, split: str, tmp: Path) -> str:
    """The split ``build_loader`` reads for ``--data source --split split``.

    - ``fashion-mnist`` (or the embedded idx folder): its shards, built on first use;
    - another folder of MNIST-format idx files: the split converted to shards under ``tmp``;
    - a root holding ``<split>/manifest.json`` (what ``train --data`` takes): that split;
    - anything else (a split folder, a manifest, shard URLs, an object-store split) as it is.
    """
    from mixersnn.data import FASHION_MNIST_DIR, default_shards

    path = Path(source)
    is_idx = path.is_dir() and any(path.glob("*-idx3-ubyte*"))
    if source.lower() in _FMNIST_ALIASES or (is_idx and path.resolve() == FASHION_MNIST_DIR.resolve()):
        return str(default_shards() / split)
    if is_idx:
        from mixersnn.data import write_split
        from mixersnn.data.converters import idx_sources

        src = next(s for s in idx_sources(path) if s.split == split)
        write_split(src, tmp / split)
        return str(tmp / split)
    if path.is_dir() and not (path / "manifest.json").exists() and (path / split / "manifest.json").exists():
        return str(path / split)
    return source


def run(args: argparse.Namespace) -> int:
    from mixersnn.accounting import EnergyConstants, measure_energy

    if args.batches < 1:
        raise SystemExit(f"error: --batches {args.batches} is out of range; measure at least 1 batch")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size} is out of range; use >= 1")
    const_over = {k: v for k, v in (("mac_pj", args.mac_pj), ("ac_pj", args.ac_pj)) if v is not None}
    constants = EnergyConstants(**const_over)
    model = _load(args)
    cfg = model.config
    batches = _batches(args.data, split=args.split, batch_size=args.batch_size)

    def checked() -> Iterator[Any]:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if tuple(x.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
                raise SystemExit(
                    f"error: the data gives images {tuple(x.shape[1:])} but the model expects "
                    f"{(cfg.in_chans, cfg.img_size, cfg.img_size)}; for a registry model pass "
                    f"--img-size {x.shape[-1]} --in-chans {x.shape[1]} (and --num-classes), or use "
                    f"data of the model's resolution"
                )
            yield batch

    report = measure_energy(
        model,
        checked(),
        max_batches=args.batches,
        constants=constants,
        meta={"model": args.model, "data": args.data, "split": args.split},
    )
    if args.json:
        print(report.to_json(indent=2))
    else:
        print(f"model {args.model} on {args.data} ({args.split})", file=sys.stderr)
        print(report.format_table())
    return 0
