"""Loader throughput: samples/s for 28-px Fashion-MNIST PNG shards and 224-px JPEG shards.

Measured, not asserted. Builds both shard sets in a temp folder (Fashion-MNIST from the
installed idx files, the 224-px set from synthetic smooth JPEGs in an ImageFolder tree), then
times full epochs of :func:`mixersnn.data.build_loader` in train mode (the train preset:
pad-crop + flip at 28 px, random-resized-crop + flip at 224 px) and eval mode (decode +
normalise only at 28 px; resize 256 + centre crop at 224 px), for each worker count. The
first epoch of each configuration is a warm-up (worker start-up, page cache); the table
reports the best of the next ``--epochs``.

    .venv/bin/python benchmarks/data.py                 # table
    .venv/bin/python benchmarks/data.py --json          # machine-readable
    .venv/bin/python benchmarks/data.py --smoke         # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixersnn.data import build_loader, make_shards  # noqa: E402


def synthetic_jpeg_folder(root: Path, n: int, size: int = 224, classes: int = 10, seed: int = 0) -> Path:
    """``root/train/<class>/*.jpg``: smooth random images (JPEG-compressible like photos, ~15-30 kB)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "train" / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        noise = rng.integers(-12, 13, (size, size, 3))
        px = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(px).save(d / f"{i:06d}.jpg", quality=90)
    return root


def time_loader(split_dir: Path, *, train: bool, workers: int, batch_size: int, epochs: int) -> dict[str, float]:
    loader = build_loader(split_dir, batch_size=batch_size, train=train, num_workers=workers, seed=0)
    best = float("inf")
    n = 0
    for e in range(epochs + 1):
        t0 = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        dt = time.perf_counter() - t0
        if e > 0:  # epoch 0 is the warm-up
            best = min(best, dt)
    return {"samples": n, "seconds": best, "samples_per_s": n / best}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fmnist-samples", type=int, default=10000, help="Fashion-MNIST train samples to shard")
    p.add_argument("--jpeg-images", type=int, default=768, help="synthetic 224-px JPEG images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts (0: in-process)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up (best is reported)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one timed epoch")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.fmnist_samples, args.jpeg_images, args.epochs = 1000, 64, 1
    torch.set_num_threads(1)  # one thread per process: workers, not intra-op threads, parallelise here

    rows = []
    with tempfile.TemporaryDirectory(prefix="mixersnn-bench-data-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        make_shards(None, tmp_path / "fmnist", splits=["train"], limit=args.fmnist_samples,
                    samples_per_shard=max(1, args.fmnist_samples // 8), progress=False)  # fmt: skip
        t_fm = time.perf_counter() - t0
        synthetic_jpeg_folder(tmp_path / "jpeg-src", args.jpeg_images)
        t0 = time.perf_counter()
        make_shards(tmp_path / "jpeg-src", tmp_path / "jpeg", samples_per_shard=max(1, args.jpeg_images // 8),
                    progress=False)  # fmt: skip
        t_jp = time.perf_counter() - t0
        sets = [
            ("fashion-mnist", "28 px PNG", tmp_path / "fmnist/train", t_fm),
            ("synthetic", "224 px JPEG", tmp_path / "jpeg/train", t_jp),
        ]
        for name, kind, split, t_conv in sets:
            mb = sum(f.stat().st_size for f in split.glob("shard-*.tar")) / 1e6
            for mode in ("train", "eval"):
                for w in args.workers:
                    r = time_loader(split, train=mode == "train", workers=w, batch_size=args.batch_size, epochs=args.epochs)
                    rows.append({"dataset": name, "images": kind, "mode": mode, "workers": w, "shards_mb": round(mb, 1),
                                 "convert_s": round(t_conv, 2), **{k: round(v, 3) for k, v in r.items()}})  # fmt: skip

    if args.json:
        print(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                      "torch": torch.__version__, "loadavg_1min": os.getloadavg()[0]},
                          "rows": rows}, indent=2))  # fmt: skip
        return 0
    # The load average says how far to trust the numbers: other processes share these cores.
    print(f"loader throughput, batch {args.batch_size}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
          f"best of {args.epochs} epoch(s) after warm-up")
    print(f"{'data':<26}{'mode':<7}{'workers':>8}{'samples':>9}{'seconds':>9}{'samples/s':>11}")
    for r in rows:
        print(f"{r['dataset'] + ' ' + r['images']:<26}{r['mode']:<7}{r['workers']:>8}{r['samples']:>9}"
              f"{r['seconds']:>9.2f}{r['samples_per_s']:>11.0f}")  # fmt: skip
    seen = set()
    for r in rows:
        if r["dataset"] not in seen:
            seen.add(r["dataset"])
            print(f"{r['dataset']} {r['images']}: {r['shards_mb']} MB of shards, converted in {r['convert_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
