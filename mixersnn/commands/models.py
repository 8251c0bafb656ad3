"""``mixersnn models``: list the registered variants with their sizes."""

from __future__ import annotations

import argparse
import json

HELP = "List registered model variants with parameter counts and stage shapes."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, default=None, help="override the input size (px)")
    p.add_argument("--in-chans", type=int, default=None, help="override the input channels")
    p.add_argument("--num-classes", type=int, default=None, help="override the class count")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from mixersnn.models import list_models, model_config

    rows = []
    for name in list_models():
        cfg = model_config(name, img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes)
        rows.append(
            {
                "name": name,
                "params": cfg.closed_form_num_params(),
                "embed_dim": cfg.embed_dim,
                "depths": list(cfg.depths),
                "spe": cfg.spe,
                "grids": list(cfg.grids),
                "img_size": cfg.img_size,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<12}{'params':>12}  {'C':>4}  {'depths':<16}{'SPE':<5}grids @ {rows[0]['img_size']} px")
    for r in rows:
        print(
            f"{r['name']:<12}{r['params'] / 1e6:>11.2f}M  {r['embed_dim']:>4}  "
            f"{str(r['depths']):<16}{'yes' if r['spe'] else 'no':<5}{r['grids']}"
        )
    return 0
