"""``mixersnn data``: convert data sets to WebDataset shards, inspect and fetch them.

    mixersnn data make-shards [SOURCE] --out DIR     # default SOURCE: Fashion-MNIST
    mixersnn data make-shards [SOURCE] --out s3://bucket/prefix   # needs mixersnn[s3]
    mixersnn data info DIR/train [--verify]          # or s3://bucket/prefix/train
    mixersnn data upload DIR s3://bucket/prefix      # existing shards -> object store
    mixersnn data download DEST [--url URL]

Object stores are reached through fsspec (``mixersnn.data.remote``); an S3-compatible server
is chosen with the standard ``AWS_ENDPOINT_URL`` (or ``FSSPEC_S3_ENDPOINT_URL``) variable.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "Convert idx / CIFAR / ImageFolder data to WebDataset shards; inspect or download data."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mixersnn.cli import DeprecatedAlias
    from mixersnn.data.converters import DEFAULT_SAMPLES_PER_SHARD
    from mixersnn.data.shard_writer import ENCODINGS

    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    m = sub.add_parser("make-shards", help="convert a data set to DIR/<split>/shard-*.tar + manifest.json")
    m.add_argument("source", nargs="?", default=None, help="idx, CIFAR or ImageFolder folder (default: Fashion-MNIST)")
    m.add_argument(
        "--out", required=True, type=_location,
        help="output folder or object-store prefix (s3://bucket/prefix); each split goes to OUT/<split>/",
    )
    m.add_argument("--format", default="auto", choices=["auto", "idx", "cifar", "imagefolder"])
    m.add_argument("--name", dest="dataset", metavar="NAME", default=None, help="data set name for the manifest (default: from the folder)")
    m.add_argument("--split", default="train", help="split name when SOURCE is a single ImageFolder split")
    m.add_argument("--splits", nargs="+", default=None, help="convert only these splits")
    m.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD, help="samples in each tar shard")
    m.add_argument("--seed", type=int, default=0, help="seed of the sample permutation")
    m.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the source order")
    m.add_argument("--encoding", default=None, choices=list(ENCODINGS), help="default: png (arrays), keep (folders)")
    m.add_argument("--jpeg-quality", type=int, default=95, help="quality of --encoding jpeg")
    m.add_argument("--img-size", type=int, default=None, help="folders: resize shorter side + centre-crop to N x N")
    m.add_argument(
        "--channels", type=int, default=None, choices=[1, 3],
        help="folders: store 1 (grey) or 3 (RGB) channels (default: 1 when every image is grey, else 3)",
    )
    m.add_argument(
        "--flip-safe", action=argparse.BooleanOptionalAction, default=None,
        help="record that horizontal flips keep the labels (--no-flip-safe: they do not, e.g. digits); "
        "training's --augment auto flips only such data (default: known for Fashion-MNIST and CIFAR, else unknown)",
    )
    m.add_argument("--limit", default=None, help="first N samples per split, or per split: train=500,test=200")
    m.add_argument("--processes", dest="workers", type=int, default=None, metavar="N",
                   help="parallel conversion processes (default: all cores)")
    m.add_argument("--workers", dest="workers", type=int, action=DeprecatedAlias, new="--processes")
    m.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    m.add_argument("--json", action="store_true", help="print the manifests as JSON")

    i = sub.add_parser("info", help="summarise a split's manifest")
    i.add_argument("split_dir", type=_location, help="split folder, manifest.json, or s3://bucket/prefix/<split>")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256")
    i.add_argument("--json", action="store_true", help="print the manifest summary as JSON")

    u = sub.add_parser("upload", help="upload shard splits (made by make-shards) to an object store")
    u.add_argument("source", type=Path, help="a split folder (DIR/train) or a folder of split folders (DIR)")
    u.add_argument("dest", help="object-store prefix, e.g. s3://bucket/fmnist (splits go to DEST/<split>/)")

    d = sub.add_parser("download", help="fetch the Fashion-MNIST idx files (needs internet or a mirror)")
    d.add_argument("dest", type=Path, help="folder for the four idx .gz files (then: mixersnn data make-shards DEST "
                   "--out DIR, or MIXERSNN_FASHION_MNIST=DEST)")
    d.add_argument("--url", default=None, help="base URL (default: the canonical bucket; file:// for a mirror)")
    d.add_argument("--force", action="store_true", help="download again files that are already there")


def _location(s: str):  # type: ignore[no-untyped-def]
    """A local path as ``Path``, an object-store URL kept as ``str`` (``Path`` would fold ``//``)."""
    from mixersnn.data.remote import is_remote

    return s if is_remote(s) else Path(s)


def _nbytes(m) -> int:  # type: ignore[no-untyped-def]
    from mixersnn.data import remote

    if isinstance(m.root, str):
        return sum(remote.size(u) for u in m.shard_urls())
    return sum((m.root / s.name).stat().st_size for s in m.shards)


def _summary(m) -> str:  # type: ignore[no-untyped-def]
    size = "variable" if m.image_size is None else f"{m.image_size[0]}x{m.image_size[1]}"
    mean = ", ".join(f"{v:.4f}" for v in m.mean)
    std = ", ".join(f"{v:.4f}" for v in m.std)
    flips = {True: "label-safe", False: "not label-safe", None: "unknown"}[m.flip_safe]
    return (
        f"{m.dataset}/{m.split}: {m.num_samples} samples in {len(m.shards)} shards, {m.num_classes} classes, "
        f"{size} px x {m.channels} ch, {m.encoding}; mean ({mean}) std ({std}); flips {flips}  -> {m.root}"
    )


#: make-shards' flags by their ``make_shards`` keyword (each flag's ``dest``).
_MAKE_SHARDS_OPTIONS = ("format", "dataset", "split", "splits", "limit", "samples_per_shard", "shuffle", "seed",
                        "encoding", "jpeg_quality", "img_size", "channels", "flip_safe", "workers", "progress")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "make-shards":
        from mixersnn.data.converters import make_shards

        t0 = time.perf_counter()
        options = {k: getattr(args, k) for k in _MAKE_SHARDS_OPTIONS}
        manifests = make_shards(args.source, args.out, **options)
        dt = time.perf_counter() - t0
        if args.json:
            print(json.dumps({k: m.to_json() for k, m in manifests.items()}, indent=2))
            return 0
        total = sum(m.num_samples for m in manifests.values())
        for m in manifests.values():
            nbytes = _nbytes(m)
            print(f"{_summary(m)}  ({nbytes / 1e6:.1f} MB)")
        print(f"wrote {total} samples in {dt:.1f} s ({total / max(dt, 1e-9):.0f} samples/s)")
        return 0
    if args.data_command == "info":
        from mixersnn.data.manifest import read_manifest

        m = read_manifest(args.split_dir, verify=args.verify)
        if args.json:
            print(json.dumps(m.to_json(), indent=2))
        else:
            print(_summary(m) + ("  [sha256 verified]" if args.verify else ""))
        return 0
    if args.data_command == "upload":
        from mixersnn.data import remote
        from mixersnn.data.manifest import MANIFEST_NAME, read_manifest

        if not remote.is_remote(args.dest):
            raise SystemExit(f"dest={args.dest!r} is not an object-store URL; pass e.g. s3://bucket/prefix")
        src = Path(args.source)
        if (src / MANIFEST_NAME).is_file():
            pairs = [(src, remote.join(args.dest, src.name))]
        else:
            pairs = [(d, remote.join(args.dest, d.name)) for d in sorted(src.iterdir()) if (d / MANIFEST_NAME).is_file()]
        if not pairs:
            raise SystemExit(
                f"{src} holds no split with a {MANIFEST_NAME}; convert it first with `mixersnn data make-shards`"
            )
        for local, url in pairs:
            read_manifest(local)  # refuse to upload a split whose shards are missing
            remote.upload_split(local, url)
            print(_summary(read_manifest(url)))
        return 0
    if args.data_command == "download":
        from mixersnn.data.datasets import FASHION_MNIST_URL, download_fashion_mnist

        dest = download_fashion_mnist(args.dest, base_url=args.url or FASHION_MNIST_URL, force=args.force)
        print(f"Fashion-MNIST idx files in {dest}; convert with `mixersnn data make-shards {dest} --out DIR`")
        return 0
    raise AssertionError(args.data_command)
