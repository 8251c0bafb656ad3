"""Converters from common image-classification layouts to WebDataset shards.

Three source layouts are read:

* **idx** (MNIST, Fashion-MNIST, KMNIST): a folder with ``{train,t10k}-{images-idx3,
  labels-idx1}-ubyte[.gz]``; splits ``train`` and ``test``.
* **cifar** (CIFAR-10/100 "python version"): ``data_batch_1..5`` + ``test_batch`` +
  ``batches.meta``, or ``train`` + ``test`` + ``meta`` (fine labels); splits ``train``/``test``.
* **imagefolder**: one folder per class holding JPEG/PNG files. Either SOURCE itself is the
  split (``--split`` names it) or SOURCE holds split folders (``train/``, ``val/``, ``test/``)
  each laid out that way, as ImageNet is. The shards get 1 channel when every image of every
  split is stored grey (PIL modes ``L``, ``1``, ``I;16``, ...), else 3 (RGB).

The manifest also records whether horizontal flips keep the labels (``flip_safe``): true for
Fashion-MNIST and CIFAR, unknown for other data unless the caller says (``--flip-safe``).

Every split is written by :func:`write_split`: a seeded permutation of the samples (so each
shard mixes the classes), fixed-size shards written in parallel by worker processes, each
atomically, then the manifest last. A split folder without ``manifest.json`` is therefore an
unfinished conversion, and the loader says so.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from mixersnn.data.idx import FASHION_MNIST_DIR, load_idx_split
from mixersnn.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, write_manifest
from mixersnn.data.shard_writer import ENCODINGS, ShardResult, encode_image, write_shard

__all__ = [
    "DEFAULT_SAMPLES_PER_SHARD",
    "FASHION_MNIST_CLASSES",
    "SplitSource",
    "detect_format",
    "load_sources",
    "idx_sources",
    "cifar_sources",
    "imagefolder_sources",
    "image_channels",
    "write_split",
    "make_shards",
]

DEFAULT_SAMPLES_PER_SHARD = 5000
"""About 3 MB of 28-px PNG or 12 MB of 32-px CIFAR per shard: enough shards for ranks x
workers on Fashion-MNIST (12 train shards), few enough that opening them is cheap."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
_SPLIT_DIRS = ("train", "val", "valid", "validation", "test")


@dataclass
class SplitSource:
    """One split to convert: either in-memory arrays or a list of image files.

    Attributes:
        dataset: data set name written to the manifest.
        split: split name.
        classes: class names; labels index into them.
        labels: ``int64 [N]``.
        images: ``uint8 [N, H, W]`` or ``[N, H, W, C]`` (array sources), else None.
        files: image paths (folder sources), else None.
        channels: 1 or 3.
        origin: where the data came from, recorded in the manifest.
        extra: more provenance for the manifest's ``extra``.
        flip_safe: whether horizontal flips keep the labels; None when unknown.
    """

    dataset: str
    split: str
    classes: list[str]
    labels: np.ndarray
    images: Optional[np.ndarray] = None
    files: Optional[list[str]] = None
    channels: int = 1
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    flip_safe: Optional[bool] = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        if (self.images is None) == (self.files is None):
            raise ValueError("a SplitSource needs exactly one of images= or files=")
        if self.images is not None:
            if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4) or len(self.images) != n:
                raise ValueError(
                    f"{self.dataset}/{self.split}: images must be uint8 [N, H, W] or [N, H, W, C] with N={n} "
                    f"(the label count), got {self.images.dtype} {list(self.images.shape)}"
                )
            self.channels = 1 if self.images.ndim == 3 else int(self.images.shape[-1])
        elif len(self.files) != n:  # type: ignore[arg-type]
            raise ValueError(f"{self.dataset}/{self.split}: {len(self.files)} files but {n} labels")  # type: ignore[arg-type]
        if self.channels not in (1, 3):
            raise ValueError(f"{self.dataset}/{self.split}: channels={self.channels}; allowed 1 or 3")
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.classes)))
        if len(bad):
            i = int(bad[0])
            where = self.files[i] if self.files is not None else f"index {i}"
            raise ValueError(
                f"{self.dataset}/{self.split}: sample {where} has label {int(self.labels[i])}, outside "
                f"[0, {len(self.classes) - 1}] ({len(bad)} such samples). Fix the labels or the class list."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, limit: Optional[int]) -> "SplitSource":
        """The first ``limit`` samples in source order (all of them when None)."""
        if limit is None or limit >= len(self):
            return self
        return SplitSource(
            dataset=self.dataset,
            split=self.split,
            classes=self.classes,
            labels=self.labels[:limit],
            images=None if self.images is None else self.images[:limit],
            files=None if self.files is None else self.files[:limit],
            channels=self.channels,
            origin=self.origin,
            extra={**self.extra, "limit": int(limit)},
            flip_safe=self.flip_safe,
        )


# ----------------------------------------------------------------------------- sources


def detect_format(source: Union[str, Path]) -> str:
    """``idx``, ``cifar`` or ``imagefolder`` from the files in ``source``."""
    p = Path(source)
    if not p.is_dir():
        raise FileNotFoundError(f"source {p} is not a folder; pass an idx, CIFAR or ImageFolder directory")
    names = {c.name for c in p.iterdir()}
    if any(n.startswith("train-images-idx3-ubyte") for n in names):
        return "idx"
    if {"data_batch_1", "test_batch"} <= names or {"train", "test", "meta"} <= names and (p / "meta").is_file():
        return "cifar"
    if any(c.is_dir() for c in p.iterdir()):
        return "imagefolder"
    raise ValueError(
        f"cannot tell the layout of {p} (files: {sorted(names)[:8]}); expected idx files, CIFAR python "
        f"batches or class folders. Pass --format to choose."
    )


def idx_sources(root: Union[str, Path], *, dataset: Optional[str] = None) -> list[SplitSource]:
    """Train and test splits of an MNIST-format folder.

    A data set named like Fashion-MNIST gets its class names and ``flip_safe=True`` (a
    mirrored shirt is still a shirt); other idx data (MNIST digits, KMNIST) gets digit class
    names and ``flip_safe=None``, since a mirrored character can be another or none.
    """
    root = Path(root)
    out = []
    name = dataset or ("fashion-mnist" if root.resolve() == FASHION_MNIST_DIR.resolve() else root.name)
    fashion = "fashion" in name.lower()
    for split in ("train", "test"):
        images, labels = load_idx_split(root, split)
        n_cls = int(labels.max()) + 1 if len(labels) else 10
        classes = list(FASHION_MNIST_CLASSES) if fashion else [str(i) for i in range(max(n_cls, 10))]
        out.append(SplitSource(name, split, classes, labels, images=images, origin=str(root),
                               flip_safe=True if fashion else None))  # fmt: skip
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers.

    CIFAR ships as Python pickles; a pickle can run arbitrary code, so only the handful of
    globals a numpy array needs are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle (only numpy arrays)")


def _load_cifar_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        d = _ArrayUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def cifar_sources(root: Union[str, Path], *, dataset: Optional[str] = None) -> list[SplitSource]:
    """CIFAR-10 (``data_batch_*``) or CIFAR-100 (``train``/``test``, fine labels) python batches.

    Both are natural-object photos whose labels survive a horizontal flip: ``flip_safe=True``.
    """
    root = Path(root)

    def to_images(data: Any) -> np.ndarray:
        arr = np.asarray(data, dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3072:
            raise ValueError(f"CIFAR data must be [N, 3072] uint8 rows (R, G, B planes of 32x32), got {list(arr.shape)}")
        return arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()

    if (root / "data_batch_1").exists():
        meta = _load_cifar_pickle(root / "batches.meta") if (root / "batches.meta").exists() else {}
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", range(10))]
        parts = {"train": sorted(root.glob("data_batch_*"), key=lambda p: int(p.name.rsplit("_", 1)[1])), "test": [root / "test_batch"]}
        label_key, name = "labels", dataset or "cifar10"
    else:
        meta = _load_cifar_pickle(root / "meta")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta["fine_label_names"]]
        parts = {"train": [root / "train"], "test": [root / "test"]}
        label_key, name = "fine_labels", dataset or "cifar100"
    out = []
    for split, files in parts.items():
        batches = [_load_cifar_pickle(f) for f in files]
        images = np.concatenate([to_images(b["data"]) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        out.append(SplitSource(name, split, classes, labels, images=images, channels=3, origin=str(root), flip_safe=True))
    return out


def _folder_split(root: Path, dataset: str, split: str) -> SplitSource:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders; an ImageFolder split needs one folder per class")
    files: list[str] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        # Sorted walk: the sample order (and so the shards) must not depend on the file system.
        for dirpath, dirnames, filenames in sorted(os.walk(root / c)):
            dirnames.sort()
            for fn in sorted(filenames):
                if Path(fn).suffix.lower() in _IMG_SUFFIXES:
                    files.append(os.path.join(dirpath, fn))
                    labels.append(i)
    if not files:
        raise ValueError(f"{root}: the class folders {classes[:5]} hold no images ({sorted(_IMG_SUFFIXES)})")
    return SplitSource(dataset, split, classes, np.asarray(labels), files=files, channels=3, origin=str(root))


#: PIL modes of single-channel images: 1-bit, 8-bit, 16/32-bit integer and float grey, grey + alpha.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _is_grey(im: Image.Image) -> bool:
    if im.mode in GREY_MODES:
        return True
    if im.mode in ("P", "PA"):  # a palette whose entries are all grey (r == g == b)
        pal = im.getpalette() or []
        return all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
    return False


def image_channels(files: Iterable[str]) -> int:
    """1 when every image in ``files`` is stored grey (see :data:`GREY_MODES`), else 3.

    Reads each file's header only (and a palette image's palette), stopping at the first
    colour image, so a colour data set costs one open.
    """
    for path in files:
        try:
            with Image.open(path) as im:
                grey = _is_grey(im)
        except Exception as e:  # PIL raises many types for damaged files
            raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace the file") from e
        if not grey:
            return 3
    return 1


def imagefolder_sources(
    root: Union[str, Path], *, dataset: Optional[str] = None, split: str = "train", channels: Optional[int] = None
) -> list[SplitSource]:
    """Splits of an ImageFolder tree (``root/<class>/*.jpg`` or ``root/<split>/<class>/*.jpg``).

    Args:
        channels: 1 or 3 for every split; None: 1 when all images of all splits are grey
            (:func:`image_channels`), else 3. One count for all splits, because one model reads them.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels!r}; allowed 1 (grey), 3 (RGB) or None (detect from the images)")
    root = Path(root)
    name = dataset or root.name
    split_dirs = [root / s for s in _SPLIT_DIRS if (root / s).is_dir()]
    if split_dirs and all(any(c.is_dir() for c in d.iterdir()) for d in split_dirs):
        srcs = [_folder_split(d, name, d.name) for d in split_dirs]
        ref = srcs[0].classes
        for s in srcs[1:]:
            if s.classes != ref:
                diff = sorted(set(ref) ^ set(s.classes))[:5]
                raise ValueError(f"{root}: split {s.split} has different class folders than {srcs[0].split} ({diff} ...)")
    else:
        srcs = [_folder_split(root, name, split)]
    ch = channels if channels is not None else image_channels(f for s in srcs for f in s.files or [])
    for s in srcs:
        s.channels = ch
    return srcs


def load_sources(
    source: Union[str, Path],
    *,
    format: str = "auto",
    dataset: Optional[str] = None,
    split: str = "train",
    channels: Optional[int] = None,
) -> list[SplitSource]:
    """All splits found in ``source`` (see the module docstring for the layouts).

    ``channels`` (1 or 3) overrides the grey/colour detection of image folders; idx and CIFAR
    data have a fixed channel count, and asking for another is an error.
    """
    fmt = detect_format(source) if format == "auto" else format
    if fmt == "imagefolder":
        return imagefolder_sources(source, dataset=dataset, split=split, channels=channels)
    if fmt == "idx":
        srcs = idx_sources(source, dataset=dataset)
    elif fmt == "cifar":
        srcs = cifar_sources(source, dataset=dataset)
    else:
        raise ValueError(f"format={format!r}; allowed: auto, idx, cifar, imagefolder")
    if channels is not None and any(s.channels != channels for s in srcs):
        raise ValueError(
            f"channels={channels}: the {fmt} data in {source} is stored with {srcs[0].channels} channel(s), and "
            f"channels sets the count of image folders only; drop --channels for this source"
        )
    return srcs


# ----------------------------------------------------------------------------- writing


@dataclass
class _ShardJob:
    """Everything one worker process needs to write one shard (picklable)."""

    path: str
    keys: list[str]
    labels: list[int]
    images: Optional[np.ndarray]
    files: Optional[list[str]]
    encoding: str
    jpeg_quality: int
    channels: int
    img_size: Optional[int]


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _job_samples(job: _ShardJob):
    for j, (key, label) in enumerate(zip(job.keys, job.labels)):
        if job.images is not None:
            pixels = job.images[j]
            data, ext = encode_image(pixels, "png" if job.encoding == "keep" else job.encoding, jpeg_quality=job.jpeg_quality)
            yield key, data, ext, label, pixels if pixels.ndim == 3 else pixels[:, :, None]
            continue
        path = job.files[j]  # type: ignore[index]
        try:
            raw = Path(path).read_bytes()
            with Image.open(io.BytesIO(raw)) as im:
                fmt = im.format
                im = im.convert("RGB" if job.channels == 3 else "L")
                if job.img_size is not None:
                    im = _resize_center_crop(im, job.img_size)
                pixels = np.asarray(im)
        except Exception as e:  # PIL raises many types for damaged files
            raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace the file") from e
        if job.encoding == "keep" and job.img_size is None and fmt in ("JPEG", "PNG"):
            data, ext = raw, ("jpg" if fmt == "JPEG" else "png")
        else:
            data, ext = encode_image(pixels, "png" if job.encoding == "keep" else job.encoding, jpeg_quality=job.jpeg_quality)
        yield key, data, ext, label, pixels if pixels.ndim == 3 else pixels[:, :, None]


def _run_job(job: _ShardJob) -> ShardResult:
    return write_shard(job.path, _job_samples(job))


def write_split(
    src: SplitSource,
    out_dir: Union[str, Path],
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    shuffle: bool = True,
    seed: int = 0,
    encoding: Optional[str] = None,
    jpeg_quality: int = 95,
    workers: Optional[int] = None,
    img_size: Optional[int] = None,
    progress: bool = True,
) -> Manifest:
    """Write one split as ``out_dir/shard-*.tar`` + ``out_dir/manifest.json``.

    Args:
        src: the samples.
        out_dir: the split folder (created).
        samples_per_shard: samples per shard (the last may hold fewer).
        shuffle: permute the samples with ``seed`` first, so every shard mixes the classes.
        seed: permutation seed; same seed and input give byte-identical shards.
        encoding: ``png``/``jpeg``/``npy``/``keep``; None picks ``png`` for arrays and ``keep``
            (the files' own JPEG/PNG bytes) for image folders.
        jpeg_quality: JPEG quality for ``jpeg``.
        workers: processes writing shards in parallel (None: all cores; 1: in this process).
        img_size: image folders only: resize the shorter side to this and centre-crop square.
        progress: show a tqdm bar.

    Returns:
        The manifest written.
    """
    n = len(src)
    if n == 0:
        raise ValueError(f"{src.dataset}/{src.split} has no samples; nothing to write")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}; allowed: >= 1")
    encoding = encoding or ("png" if src.images is not None else "keep")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}; allowed: {', '.join(ENCODINGS)}")
    if img_size is not None and src.images is not None:
        raise ValueError("img_size resizes image-folder sources only; array sources are stored at their own size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The old manifest goes first: if this run dies, the folder has no manifest and every
    # reader refuses it instead of mixing old and new shards.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in out_dir.glob(".shard-*.tmp"):
        stale.unlink()
    jobs = _shard_jobs(src, out_dir, samples_per_shard=samples_per_shard, shuffle=shuffle, seed=seed,
                       encoding=encoding, jpeg_quality=jpeg_quality, img_size=img_size)
    results = _run_jobs(jobs, workers=min(len(jobs), workers or os.cpu_count() or 1),
                        desc=f"{src.dataset}/{src.split}", progress=progress)
    keep = {r.name for r in results}
    for old in out_dir.glob("shard-*.tar"):
        if old.name not in keep:  # left over from an earlier, larger conversion
            old.unlink()
    extra = {"origin": src.origin, "seed": seed, "shuffled": shuffle, "samples_per_shard": samples_per_shard, **src.extra}
    if encoding == "jpeg":
        extra["jpeg_quality"] = jpeg_quality
    if img_size is not None:
        extra["img_size"] = img_size
    manifest = _manifest(src, results, out_dir, encoding=encoding, extra=extra)
    write_manifest(manifest, out_dir)
    return manifest


def _shard_jobs(src: SplitSource, out_dir: Path, *, samples_per_shard: int, shuffle: bool, seed: int,
                encoding: str, jpeg_quality: int, img_size: Optional[int]) -> list[_ShardJob]:
    """One job per shard: which samples (permuted with ``seed`` when ``shuffle``) go where."""
    n = len(src)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    width = max(8, len(str(n - 1)))
    jobs = []
    for si, start in enumerate(range(0, n, samples_per_shard)):
        idx = order[start : start + samples_per_shard]
        jobs.append(
            _ShardJob(
                path=str(out_dir / f"shard-{si:06d}.tar"),
                keys=[f"{int(i):0{width}d}" for i in idx],  # the source index: traceable to the input
                labels=[int(v) for v in src.labels[idx]],
                images=None if src.images is None else src.images[idx],
                files=None if src.files is None else [src.files[int(i)] for i in idx],
                encoding=encoding,
                jpeg_quality=jpeg_quality,
                channels=src.channels,
                img_size=img_size,
            )
        )
    return jobs


def _run_jobs(jobs: list[_ShardJob], *, workers: int, desc: str, progress: bool) -> list[ShardResult]:
    """Write every shard (in ``workers`` processes, or here when 1), results in shard order.
    On any failure, the shards already written are deleted before the error propagates:
    without a manifest nobody reads them, and the folder must not pass for a usable split."""
    from tqdm.auto import tqdm

    results: list[Optional[ShardResult]] = [None] * len(jobs)
    bar = tqdm(total=sum(len(j.keys) for j in jobs), unit="img", desc=desc, disable=not progress, leave=False)
    try:
        if workers <= 1:
            for i, job in enumerate(jobs):
                results[i] = _run_job(job)
                bar.update(len(job.keys))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futs: dict[Future[ShardResult], int] = {pool.submit(_run_job, j): i for i, j in enumerate(jobs)}
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        results[futs[f]] = f.result()  # re-raises a worker's error here
                        bar.update(len(jobs[futs[f]].keys))
    except BaseException:
        for job in jobs:
            Path(job.path).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _manifest(src: SplitSource, results: list[ShardResult], out_dir: Path, *, encoding: str,
              extra: dict) -> Manifest:
    """The split's manifest: shards with their hashes, and per-channel pixel mean/std pooled
    over every shard's sums."""
    count = sum(r.pixel_count for r in results)
    psum = np.sum([r.pixel_sum for r in results], axis=0)
    psq = np.sum([r.pixel_sumsq for r in results], axis=0)
    mean = psum / count
    std = np.sqrt(np.maximum(psq / count - mean**2, 1e-12))
    sizes = {s for r in results for s in r.sizes}
    return Manifest(
        dataset=src.dataset,
        split=src.split,
        classes=tuple(src.classes),
        num_samples=len(src),
        image_size=next(iter(sizes)) if len(sizes) == 1 else None,
        channels=src.channels,
        mean=tuple(round(float(v), 6) for v in mean),
        std=tuple(round(float(v), 6) for v in std),
        encoding=encoding,
        shards=tuple(ShardInfo(r.name, r.num_samples, r.sha256) for r in results),
        root=out_dir,
        extra=extra,
        flip_safe=src.flip_safe,
    )


def _parse_limit(limit: Union[None, int, str, dict[str, int]], split: str) -> Optional[int]:
    if limit is None or isinstance(limit, int):
        return limit
    if isinstance(limit, dict):
        return limit.get(split)
    if re.fullmatch(r"\d+", limit):
        return int(limit)
    parts = dict(p.split("=", 1) for p in limit.split(",") if p)
    return int(parts[split]) if split in parts else None


def make_shards(
    source: Union[str, Path, None],
    out: Union[str, Path],
    *,
    format: str = "auto",
    dataset: Optional[str] = None,
    split: str = "train",
    splits: Optional[Sequence[str]] = None,
    limit: Union[None, int, str, dict[str, int]] = None,
    channels: Optional[int] = None,
    flip_safe: Optional[bool] = None,
    **write_kwargs: Any,
) -> dict[str, Manifest]:
    """Convert every split of ``source`` to ``out/<split>/``.

    Args:
        source: idx, CIFAR or ImageFolder folder; None means Fashion-MNIST at FASHION_MNIST_DIR.
        out: output root: a folder, or an object-store prefix (``s3://bucket/fmnist``). Remote
            splits are written to a local staging folder under ``$TMPDIR`` first (one split at
            a time, so it needs room for the largest split) and then uploaded with
            :func:`mixersnn.data.remote.upload_split`, manifest last.
        format: ``auto``, ``idx``, ``cifar`` or ``imagefolder``.
        dataset: name for the manifest (default: from the folder).
        split: split name when an ImageFolder source is a single split.
        splits: convert only these splits.
        limit: keep the first N samples of each split (int), or per split
            (``{"train": 500}`` or ``"train=500,test=200"``); for smoke tests.
        channels: image folders: 1 or 3 channels; None detects them (1 when every image is grey).
        flip_safe: record in every manifest whether horizontal flips keep the labels; None
            keeps the converter's own (True for Fashion-MNIST and CIFAR, else unknown).
        **write_kwargs: passed to :func:`write_split`.

    Returns:
        ``{split: manifest}``.
    """
    srcs = load_sources(
        source if source is not None else FASHION_MNIST_DIR, format=format, dataset=dataset, split=split, channels=channels
    )
    if flip_safe is not None:
        for s in srcs:
            s.flip_safe = flip_safe
    if splits:
        unknown = sorted(set(splits) - {s.split for s in srcs})
        if unknown:
            raise ValueError(f"splits {unknown} are not in {source}; it has {[s.split for s in srcs]}")
        srcs = [s for s in srcs if s.split in splits]
    from mixersnn.data import remote

    if remote.is_remote(out):
        url = str(out)
        bucket = url.split("://", 1)[0] + "://" + url.split("://", 1)[1].split("/", 1)[0]
        if not remote.exists(bucket):  # fail before converting anything
            raise FileNotFoundError(remote.missing_message(url))
        manifests = {}
        for s in srcs:
            with tempfile.TemporaryDirectory(prefix=f"mixersnn-{s.split}-") as staging:
                m = write_split(s.head(_parse_limit(limit, s.split)), Path(staging) / s.split, **write_kwargs)
                remote.upload_split(Path(staging) / s.split, remote.join(url, s.split))
            manifests[s.split] = replace(m, root=remote.join(url, s.split))
        return manifests
    out = Path(out)
    return {s.split: write_split(s.head(_parse_limit(limit, s.split)), out / s.split, **write_kwargs) for s in srcs}
