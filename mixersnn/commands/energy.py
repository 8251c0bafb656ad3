"""``mixersnn energy``: per-layer SOPs, MACs and energy of a model on real data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

HELP = "Measure firing rates on data and print per-layer dense ops, SOPs, MACs and energy."

_IDX_ALIASES = ("fashion-mnist", "fashion_mnist", "fmnist")
# Fashion-MNIST normalisation (the statistics of its training split).
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="registry variant name, a checkpoint / MFI export file, or a trained model's MLflow URI: "
                   "runs:/RUN_ID (its final model), runs:/RUN_ID/PATH, models:/NAME/VERSION (or /latest, @ALIAS)")
    p.add_argument(
        "--data",
        required=True,
        help="'fashion-mnist', a folder of MNIST-format idx files, or any source mixersnn.data.build_loader accepts",
    )
    p.add_argument("--split", choices=("train", "test"), default="test", help="split of idx data (default test)")
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
    """Normalised image batches ``[B, C, H, W]`` (with labels) from ``source``."""
    import torch

    from mixersnn import data as mdata

    idx_dir = None
    if source.lower() in _IDX_ALIASES:
        idx_dir = mdata.FASHION_MNIST_DIR
    elif Path(source).is_dir() and any(Path(source).glob("*-idx3-ubyte*")):
        idx_dir = Path(source)
    if idx_dir is not None:
        images, labels = mdata.load_idx_split(idx_dir, split)
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).float().div_(255.0)
            x = x.sub_(_FMNIST_MEAN).div_(_FMNIST_STD).unsqueeze(1)
            yield x, torch.from_numpy(labels[i : i + batch_size])
        return
    build_loader = getattr(mdata, "build_loader", None)
    if build_loader is None:
        raise SystemExit(
            f"error: --data {source!r} is not 'fashion-mnist' or an idx folder, and this mixersnn "
            f"has no mixersnn.data.build_loader for other sources"
        )
    yield from build_loader(source, batch_size=batch_size, train=split == "train")


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
