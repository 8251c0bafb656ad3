"""The shard manifest: what a split holds and how to check it.

Every split directory written by :func:`mixersnn.data.make_shards` looks like::

    DIR/<split>/shard-000000.tar
    DIR/<split>/shard-000001.tar
    ...
    DIR/<split>/manifest.json

and ``manifest.json`` is the single source of truth for the loader: class names, sample
counts per shard (the loader balances ranks from these, so it never has to scan a shard to
know its length), image size/channels, the normalisation statistics and a sha256 per shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Optional, Union

from mixersnn._atomic import atomic_write_bytes

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ManifestError",
    "MissingShardError",
    "ChecksumError",
    "SampleError",
    "ShardInfo",
    "Manifest",
    "read_manifest",
    "write_manifest",
    "sha256_file",
    "atomic_write_bytes",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """The manifest is missing, malformed or disagrees with the shards next to it."""


class MissingShardError(ManifestError, FileNotFoundError):
    """A shard listed in the manifest (or in a URL list) does not exist."""


class ChecksumError(ManifestError):
    """A shard's sha256 differs from the one recorded in the manifest."""


class SampleError(ValueError):
    """One sample is unusable (bad label, wrong shape); the message names its key and shard."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split.

    Attributes:
        name: file name relative to the split directory (``shard-000000.tar``).
        num_samples: samples stored in the shard.
        sha256: hex digest of the whole tar file.
    """

    name: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Description of one split of a sharded data set (the parsed ``manifest.json``).

    Attributes:
        dataset: data set name (``fashion-mnist``).
        split: split name (``train``, ``test``, ``val``).
        classes: class names; a label ``y`` is valid iff ``0 <= y < len(classes)``.
        num_samples: total samples, equal to the sum over ``shards``.
        image_size: ``(H, W)`` when every image has that size, None for variable sizes
            (ImageNet-style folders stored without resizing).
        channels: 1 (grey) or 3 (RGB); decoded images are converted to this.
        mean: per-channel mean of the pixels scaled to [0, 1] (length ``channels``).
        std: per-channel standard deviation on the same scale.
        encoding: how images are stored: ``png``, ``jpeg``, ``npy`` or ``keep``.
        shards: the shards in order.
        root: the split directory the manifest was read from (not serialised): a local
            ``Path``, or a ``str`` URL for splits in an object store (``s3://bucket/fmnist/train``).
        extra: free-form provenance (source path, seed, shuffle), kept as written.
        flip_safe: whether a horizontally flipped image keeps its label (True for clothes,
            CIFAR objects; False for digits, text); None when unknown, which training's
            ``augment: auto`` treats as not safe. Manifests written without it read as None.
    """

    dataset: str
    split: str
    classes: tuple[str, ...]
    num_samples: int
    image_size: Optional[tuple[int, int]]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    encoding: str
    shards: tuple[ShardInfo, ...]
    root: Union[Path, str, None] = None
    extra: dict[str, Any] = field(default_factory=dict)
    flip_safe: Optional[bool] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_paths(self) -> list[Path]:
        """Absolute paths of the shards, in manifest order (local splits only)."""
        if self.root is None:
            raise ManifestError("this manifest was not read from disk, so it has no shard paths")
        if isinstance(self.root, str):
            raise ManifestError(
                f"the shards of {self.root} are in an object store and have no local paths; use shard_urls()"
            )
        return [self.root / s.name for s in self.shards]

    def shard_urls(self) -> list[str]:
        """The shards as strings the loader opens: local paths, or ``s3://...`` URLs."""
        if isinstance(self.root, str):
            from mixersnn.data import remote

            return [remote.join(self.root, s.name) for s in self.shards]
        return [str(p) for p in self.shard_paths()]

    def holdout(self, num_shards: int) -> tuple["Manifest", "Manifest"]:
        """Split off the last ``num_shards`` shards as a held-out part of this split.

        Returns ``(rest, held_out)``, two manifests over the same root (nothing is written;
        ``held_out.split`` is ``"<split>-holdout"``). Shards are the unit, so the split works
        alike for local and object-store data and for any number of ranks; the shards of a
        split made by ``mixersnn data make-shards`` are shuffled, so the last ones are a random
        sample. The one-shot search trains its supernet on ``rest`` and ranks subnets on
        ``held_out``, never on the test split.

        Raises:
            ManifestError: ``num_shards`` is not in ``[1, len(shards) - 1]``.
        """
        n = len(self.shards)
        if not isinstance(num_shards, int) or isinstance(num_shards, bool) or not 1 <= num_shards < n:
            raise ManifestError(
                f"holdout of {num_shards!r} shard(s) from the {n}-shard split {self.split!r}: allowed 1 to "
                f"{n - 1} (some shards must stay for training); make more, smaller shards with "
                f"`mixersnn data make-shards --samples-per-shard N` to hold out a finer share"
            )
        rest, held = self.shards[: n - num_shards], self.shards[n - num_shards:]
        return (replace(self, shards=rest, num_samples=sum(s.num_samples for s in rest)),
                replace(self, split=f"{self.split}-holdout", shards=held,
                        num_samples=sum(s.num_samples for s in held)))

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json`` (no ``root``)."""
        d = asdict(self)
        d.pop("root")
        d["classes"] = list(self.classes)
        d["image_size"] = list(self.image_size) if self.image_size is not None else None
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["shards"] = [asdict(s) for s in self.shards]
        return {"format_version": MANIFEST_VERSION, **d}


def sha256_stream(f: IO[bytes], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a binary stream, read to its end in 1 MiB chunks."""
    h = hashlib.sha256()
    while b := f.read(chunk):
        h.update(b)
    return h.hexdigest()


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)


def write_manifest(manifest: Manifest, split_dir: Union[str, Path]) -> Path:
    """Write ``manifest.json`` atomically; keys sorted so identical input gives identical bytes."""
    path = Path(split_dir) / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def _manifest_path(path_or_split_dir: Union[str, Path]) -> Path:
    p = Path(path_or_split_dir)
    if p.is_dir():
        cand = p / MANIFEST_NAME
        if not cand.exists():
            subs = sorted(d.name for d in p.iterdir() if (d / MANIFEST_NAME).exists())
            hint = (
                f" It holds split folders {subs}: pass one of them, e.g. {p / subs[0]}."
                if subs
                else " Convert the data first: `mixersnn data make-shards SOURCE --out DIR` "
                "(a conversion that failed or is still running has no manifest yet)."
            )
            raise ManifestError(f"no {MANIFEST_NAME} in {p}.{hint}")
        return cand
    if not p.exists():
        raise ManifestError(
            f"{p} does not exist. Pass a split folder with a {MANIFEST_NAME} (DIR/train) or the "
            f"manifest file itself; create one with `mixersnn data make-shards`."
        )
    return p


def read_manifest(path_or_split_dir: Union[str, Path], *, verify: bool = False) -> Manifest:
    """Read and validate a split's manifest.

    Args:
        path_or_split_dir: the split folder (``DIR/train``) or its ``manifest.json``; either may
            be an object-store URL (``s3://bucket/fmnist/train``, see :mod:`mixersnn.data.remote`).
        verify: also recompute the sha256 of every shard (reads every byte; about 1 s/GB).

    Returns:
        The parsed :class:`Manifest`, with ``root`` set to the split folder.

    Raises:
        ManifestError: the manifest is missing, malformed, empty or inconsistent.
        MissingShardError: a listed shard is not on disk.
        ChecksumError: ``verify=True`` and a shard's bytes differ from the recorded sha256.
    """
    from mixersnn.data import remote

    if remote.is_remote(path_or_split_dir):
        return _read_remote_manifest(str(path_or_split_dir), verify=verify)
    path = _manifest_path(path_or_split_dir)
    m = _parse_manifest(path.read_bytes(), str(path), path.parent)
    root = path.parent
    shards = m.shards
    absent = [s.name for s in shards if not (root / s.name).is_file()]
    if absent:
        raise MissingShardError(
            f"{len(absent)} of {len(shards)} shards listed in {path} are missing: {absent[:5]}"
            f"{' ...' if len(absent) > 5 else ''}. Copy them back or re-run `mixersnn data make-shards`."
        )
    if verify:
        for s in shards:
            digest = sha256_file(root / s.name)
            if digest != s.sha256:
                raise ChecksumError(
                    f"{root / s.name}: sha256 {digest[:16]}... differs from the manifest's {s.sha256[:16]}...; "
                    f"the shard is corrupt or was replaced. Re-run `mixersnn data make-shards` for this split."
                )
    return m


def _read_remote_manifest(url: str, *, verify: bool) -> Manifest:
    """:func:`read_manifest` for a split in an object store (``s3://bucket/fmnist/train``)."""
    from mixersnn.data import remote

    url = url.rstrip("/")
    if url.endswith(".json"):
        path, root = url, remote.parent(url)
    else:
        path, root = remote.join(url, MANIFEST_NAME), url
    try:
        data = remote.read_bytes(path)
    except FileNotFoundError as e:
        subs = sorted(n for n in remote.list_names(root) if remote.exists(remote.join(root, n, MANIFEST_NAME)))
        hint = f" It holds split prefixes {subs}: pass one of them, e.g. {remote.join(root, subs[0])}." if subs else ""
        raise ManifestError(
            f"no {MANIFEST_NAME} at {path}: {e}{hint} (an upload that failed or is still running has no "
            f"manifest yet)"
        ) from None
    m = _parse_manifest(data, path, root)
    present = remote.list_names(root)
    absent = [s.name for s in m.shards if s.name not in present]
    if absent:
        raise MissingShardError(
            f"{len(absent)} of {len(m.shards)} shards listed in {path} are missing: {absent[:5]}"
            f"{' ...' if len(absent) > 5 else ''}. Upload them again with `mixersnn data make-shards ... --out` "
            f"or `mixersnn data upload`."
        )
    if verify:
        for s in m.shards:
            digest = remote.sha256_url(remote.join(root, s.name))
            if digest != s.sha256:
                raise ChecksumError(
                    f"{remote.join(root, s.name)}: sha256 {digest[:16]}... differs from the manifest's "
                    f"{s.sha256[:16]}...; the shard is corrupt or was replaced. Upload the split again."
                )
    return m


def _parse_manifest(data: bytes, path: str, root: Union[Path, str]) -> Manifest:
    """Parse and validate manifest bytes read from ``path`` (a file or a URL)."""
    try:
        raw = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); regenerate it with `mixersnn data make-shards`") from e
    if not isinstance(raw, dict):
        raise ManifestError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has format_version={version!r}; this mixersnn reads version {MANIFEST_VERSION}. "
            f"Regenerate the shards with this version of `mixersnn data make-shards`."
        )
    required = ("dataset", "split", "classes", "num_samples", "channels", "mean", "std", "encoding", "shards")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ManifestError(f"{path} lacks the fields {missing}; regenerate it with `mixersnn data make-shards`")
    try:
        shards = tuple(ShardInfo(str(s["name"]), int(s["num_samples"]), str(s["sha256"])) for s in raw["shards"])
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path}: malformed shard entry ({e!r}); each needs name, num_samples, sha256") from e
    if not shards or int(raw["num_samples"]) == 0:
        raise ManifestError(
            f"{path} is empty (num_samples={raw['num_samples']}, {len(shards)} shards): there is nothing to "
            f"load. Re-run the conversion on a source that has samples."
        )
    total = sum(s.num_samples for s in shards)
    if total != int(raw["num_samples"]):
        raise ManifestError(f"{path}: num_samples={raw['num_samples']} but the shards hold {total} samples")
    if any(s.num_samples <= 0 for s in shards):
        bad = [s.name for s in shards if s.num_samples <= 0]
        raise ManifestError(f"{path}: shards {bad} have no samples; allowed is num_samples >= 1")
    channels = int(raw["channels"])
    if channels not in (1, 3):
        raise ManifestError(f"{path}: channels={channels}; allowed values are 1 (grey) and 3 (RGB)")
    mean, std = tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"])
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise ManifestError(
            f"{path}: mean={list(mean)} std={list(std)} must have {channels} entries each and std > 0"
        )
    classes = tuple(str(c) for c in raw["classes"])
    if not classes:
        raise ManifestError(f"{path}: classes is empty; a classification split needs at least one class")
    image_size = raw.get("image_size")
    flip_safe = raw.get("flip_safe")
    if flip_safe is not None and not isinstance(flip_safe, bool):
        raise ManifestError(
            f"{path}: flip_safe={flip_safe!r}; allowed are true, false or null (unknown). Fix the value, or "
            f"regenerate the split with `mixersnn data make-shards --flip-safe` / `--no-flip-safe`"
        )
    return Manifest(
        dataset=str(raw["dataset"]),
        split=str(raw["split"]),
        classes=classes,
        num_samples=total,
        image_size=(int(image_size[0]), int(image_size[1])) if image_size else None,
        channels=channels,
        mean=mean,
        std=std,
        encoding=str(raw["encoding"]),
        shards=shards,
        root=root,
        extra=dict(raw.get("extra") or {}),
        flip_safe=flip_safe,
    )
