"""``mixersnn export --mfi``: fold every BatchNorm into a multiplication-free inference model."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Export a checkpoint as a BatchNorm-free multiplication-free-inference (MFI) model."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mfi", action="store_true", help="fold BatchNorm into an MFI model (the only format so far)")
    p.add_argument("checkpoint", help="a mixersnn checkpoint (mixersnn.models.save_checkpoint), or a trained model's "
                   "MLflow URI: runs:/RUN_ID (its final model), runs:/RUN_ID/PATH, models:/NAME/VERSION")
    p.add_argument("out", help="output file, e.g. model.mfi.safetensors")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="stored precision; float64 (default) keeps every spike identical to the eval-mode model",
    )
    p.add_argument("--tracking-uri", help="MLflow URI for runs:/ and models:/ (default $MLFLOW_TRACKING_URI, "
                   "else sqlite:///./mlflow.db)")


def run(args: argparse.Namespace) -> int:
    import torch

    from mixersnn.accounting import fold_mfi, model_size, save_mfi
    from mixersnn.models import load_model

    if not args.mfi:
        raise SystemExit("error: choose an export format; --mfi is the one available (mixersnn export --mfi CKPT OUT)")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} already exists; pass --force to replace it or choose another OUT")
    if args.checkpoint.startswith(("runs:/", "models:/")):
        # MLflow only for a URI, through trainers (the command line is where the two meet).
        from trainers.mlflow_model import load_model_uri

        model = load_model_uri(args.checkpoint, args.tracking_uri)
    else:
        model = load_model(args.checkpoint)
    mfi = fold_mfi(model, dtype=getattr(torch, args.dtype))
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in mfi.modules())
    if n_bn:
        raise RuntimeError(f"internal error: {n_bn} BatchNorm modules survived folding")
    save_mfi(out, mfi, overwrite=args.force, source=str(args.checkpoint))
    size = model_size(mfi)
    print(
        f"wrote {out}: MFI model ({args.dtype}), {size.num_params:,} parameters, "
        f"{size.param_bytes / 2**20:.2f} MiB, no BatchNorm (folded from {args.checkpoint})"
    )
    return 0
