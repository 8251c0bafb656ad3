"""``mixersnn models``: list the registered variants with their sizes, or show one architecture
(a registry variant, or a trained run's / registered model's) and its scaled family member.

``--from-run`` / ``--from-model`` read a run's spec from MLflow: this command is the CLI edge,
so it reaches MLflow through ``trainers.spec`` (imported only then); the model library itself
never imports it."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = ("List registered model variants with parameter counts and stage shapes; with --scale, "
        "--from-run or --from-model, show one architecture and its scaled family member.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, default=None, help="override the input size (px)")
    p.add_argument("--in-chans", type=int, default=None, help="override the input channels")
    p.add_argument("--num-classes", type=int, default=None, help="override the class count")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    one = p.add_argument_group("one architecture and its family (nothing trains)")
    one.add_argument("--model", help="a registry variant to show (default with --scale: mlp_spe_t)")
    one.add_argument("--from-run", metavar="RUN_ID", help="the architecture a training run or search trial recorded")
    one.add_argument("--from-model", metavar="URI", help="the same from models:/NAME/VERSION or runs:/RUN_ID")
    one.add_argument("--scale", metavar="K=V,...",
                     help="width=F,depth=F,img_size=PX: print the scaled member's parameters and dense-bound energy")
    one.add_argument("--tracking-uri", help="MLflow URI for --from-run/--from-model (default $MLFLOW_TRACKING_URI, "
                     "else sqlite:///./mlflow.db)")


def _row(label: str, cfg: Any) -> dict[str, Any]:
    """One architecture (a ``MixerSNNConfig``): size, shapes and dense-bound energy per image."""
    from mixersnn.accounting import energy_report

    rep = energy_report(cfg)  # dense bound: every spike-layer input fires
    return {"name": label, "params": cfg.closed_form_num_params(), "embed_dim": cfg.embed_dim,
            "depths": list(cfg.depths), "spe": cfg.spe, "T": cfg.T, "patch_size": cfg.patch_size,
            "img_size": cfg.img_size, "grids": list(cfg.grids), "energy_uj_dense": rep.energy_pj * 1e-6,
            "config": cfg.to_dict()}


def _family(args: argparse.Namespace) -> int:
    """One architecture (and its scaled member): parameters and dense-bound energy per image."""
    from mixersnn.errors import UserError
    from mixersnn.models import model_config
    from mixersnn.models.scale import parse_scale, scale_config

    scale = parse_scale(args.scale) if args.scale is not None else None  # a bad --scale fails first
    shape = {"img_size": args.img_size, "in_chans": args.in_chans, "num_classes": args.num_classes}
    if args.from_run is not None or args.from_model is not None:
        if args.model is not None:
            raise UserError("give one architecture: --model NAME, or --from-run/--from-model, not both")
        from trainers.spec import resolve_source
        from trainers.tracking import check_tracking_server, resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri)
        check_tracking_server(uri)
        src = resolve_source(uri, run_id=args.from_run, model_uri=args.from_model)
        base = src.spec.model_config.replace(**shape)
        label = src.model_uri or f"run {src.run_id[:12]}"
    else:
        name = args.model or "mlp_spe_t"
        base = model_config(name, **shape)
        label = name
    rows = [_row(label, base)]
    if scale is not None:
        rows.append(_row(f"scaled {scale}", scale_config(base, scale)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'':<40}{'params':>10} {'uJ/img':>10}  {'C':>4}  {'depths':<16}{'T':>2} {'p':>2}  {'SPE':<4} img")
    for r in rows:
        print(f"{r['name'][:39]:<40}{r['params'] / 1e6:>9.3f}M {r['energy_uj_dense']:>10.3f}  {r['embed_dim']:>4}  "
              f"{str(r['depths']):<16}{r['T']:>2} {r['patch_size']:>2}  {'yes' if r['spe'] else 'no':<4} "
              f"{r['img_size']}")
    print("energy: dense bound per image (every spike-layer input firing; 45 nm, 4.6 pJ/MAC, 0.9 pJ/AC); "
          "trained models fire far less (mixersnn energy measures it)")
    return 0


def run(args: argparse.Namespace) -> int:
    from mixersnn.models import list_models, model_config

    if any(v is not None for v in (args.model, args.from_run, args.from_model, args.scale)):
        return _family(args)

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
