"""Shards and manifests in object stores (``s3://``, ``gs://``, ``az://``) through fsspec.

The rest of :mod:`mixersnn.data` works on local paths; this module is the one place that
talks to object stores, so the loader, the manifest reader and the converters only need a
small hook each:

* **reading**: :func:`open_read` streams one shard (sequential reads with a large read-ahead
  block, so a shard costs a handful of GET requests, not one per tar member) into the same tar
  iterator WebDataset uses for local files. WebDataset 1.0.2's own ``gopen`` has no fsspec
  handler (``s3://`` is an error there, ``gs://`` shells out to ``gsutil``), which is why the
  loader opens remote URLs here instead.
* **writing**: shards are written locally first (the converter's atomic, reproducible writer)
  and then uploaded by :func:`upload_split`, shards first and ``manifest.json`` last, so a
  prefix without a manifest is an unfinished upload, exactly as a local folder without one is
  an unfinished conversion.

Where the store is: the standard variables of each backend. For S3 (``s3fs``/botocore):
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or an instance profile, ``AWS_REGION``,
and for S3-compatible servers (MinIO, Ceph, moto) ``AWS_ENDPOINT_URL`` or
``FSSPEC_S3_ENDPOINT_URL``. Nothing here is imported unless a remote URL is used, and the
backend package (``s3fs`` for ``s3://``: ``pip install "mixersnn[s3]"``) only then.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Union

__all__ = [
    "REMOTE_SCHEMES",
    "is_remote",
    "filesystem",
    "join",
    "parent",
    "basename",
    "open_read",
    "read_bytes",
    "write_bytes",
    "exists",
    "list_names",
    "size",
    "sha256_url",
    "missing_message",
    "upload_split",
]

REMOTE_SCHEMES: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", 'pip install "mixersnn[s3]"'),
    "s3a": ("s3fs", 'pip install "mixersnn[s3]"'),
    "gs": ("gcsfs", "pip install gcsfs"),
    "gcs": ("gcsfs", "pip install gcsfs"),
    "az": ("adlfs", "pip install adlfs"),
    "abfs": ("adlfs", "pip install adlfs"),
    "abfss": ("adlfs", "pip install adlfs"),
}
"""URL scheme -> (the fsspec backend package, how to install it). Other schemes (local paths,
``file://``, ``pipe:``, ``http(s)://``) keep going through WebDataset's ``gopen``."""

READ_BLOCK_BYTES = 8 << 20
"""Read-ahead per request: a 3-12 MB shard in one or two GETs; large shards stream."""


def _scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def is_remote(url: Union[str, Path, Any]) -> bool:
    """True for object-store URLs this module handles (``s3://bucket/key``, ``gs://...``)."""
    return isinstance(url, str) and _scheme(url) in REMOTE_SCHEMES


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system for ``url`` and the path inside it (``bucket/key``).

    Raises:
        ImportError: the backend package for this scheme is not installed; the message names it.
        ValueError: ``url`` is not an object-store URL.
    """
    scheme = _scheme(url)
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{url!r} is not an object-store URL; allowed schemes: {sorted(REMOTE_SCHEMES)}")
    package, install = REMOTE_SCHEMES[scheme]
    try:
        import fsspec
        from fsspec.core import url_to_fs

        fsspec.get_filesystem_class(scheme)  # imports the backend: fails here if it is missing
    except ImportError as e:
        raise ImportError(
            f"{url}: {scheme}:// URLs need the {package} package, which is not installed ({e}). "
            f"Install it with `{install}`."
        ) from None
    fs, path = url_to_fs(url)
    return fs, path


def join(base: str, *names: str) -> str:
    """``base/name/...`` for URLs (``posixpath.join`` would treat ``s3://`` oddly)."""
    out = base.rstrip("/")
    for n in names:
        out += "/" + n.strip("/")
    return out


def parent(url: str) -> str:
    """The URL one level up: ``s3://b/fmnist/train/x.tar`` -> ``s3://b/fmnist/train``."""
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    """The last path component of a URL."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _endpoint_note() -> str:
    ep = os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" at endpoint {ep}" if ep else ""


def missing_message(url: str) -> str:
    """Why ``url`` cannot be read: the bucket is missing, or only the key.

    One extra request, made only on the error path, so the message says which to fix.
    """
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    scheme = _scheme(url)
    try:
        bucket_ok = bool(fs.exists(bucket))
    except Exception:  # no permission to look: say what we know
        bucket_ok = True
    if not bucket_ok:
        return (
            f"bucket {bucket!r} does not exist{_endpoint_note()} (or these credentials cannot see it), so "
            f"{url} cannot be read. Check the bucket name, AWS_ENDPOINT_URL / the region, or create the "
            f"bucket and upload the shards with `mixersnn data make-shards SOURCE --out {scheme}://{bucket}/PREFIX`."
        )
    return (
        f"{url} does not exist{_endpoint_note()} (the bucket {bucket!r} does). Check the prefix, or write "
        f"shards with `mixersnn data make-shards SOURCE --out {scheme}://{bucket}/PREFIX` (each split goes "
        f"to PREFIX/<split>/)."
    )


def open_read(url: str, *, block_size: int = READ_BLOCK_BYTES) -> IO[bytes]:
    """A binary, sequentially buffered stream of one object (a shard or a manifest).

    Raises:
        FileNotFoundError: the object or its bucket does not exist (the message says which).
    """
    fs, path = filesystem(url)
    try:
        return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
    except FileNotFoundError:
        raise FileNotFoundError(missing_message(url)) from None


def read_bytes(url: str) -> bytes:
    """The whole object (for small ones: manifests)."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(missing_message(url)) from None


def write_bytes(url: str, data: bytes) -> None:
    """Write one object; an object-store PUT replaces it whole, so readers never see half of it."""
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data)
    except FileNotFoundError:
        raise FileNotFoundError(missing_message(url)) from None
    fs.invalidate_cache(path)


def exists(url: str) -> bool:
    """Whether the object (or prefix) exists; a missing bucket is False, not an error."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        return bool(fs.exists(path))
    except FileNotFoundError:
        return False


def list_names(prefix_url: str) -> set[str]:
    """Names directly under a prefix (``shard-000000.tar``, ``manifest.json``); empty when absent."""
    fs, path = filesystem(prefix_url)
    try:
        return {basename(p) for p in fs.ls(path, detail=False, refresh=True)}
    except FileNotFoundError:
        return set()


def size(url: str) -> int:
    """Object size in bytes."""
    fs, path = filesystem(url)
    return int(fs.size(path))


def sha256_url(url: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of an object, streamed (the remote twin of ``manifest.sha256_file``)."""
    from mixersnn.data.manifest import sha256_stream

    with open_read(url) as f:
        return sha256_stream(f, chunk)


def upload_split(local_dir: Union[str, Path], url: str, *, manifest_name: str = "manifest.json") -> list[str]:
    """Upload one split folder (``shard-*.tar`` + ``manifest.json``) to ``url``.

    Order matters for readers that may be looking at the prefix meanwhile: the old manifest is
    deleted first, then the shards are uploaded, then the new manifest, and last any shards
    left over from an earlier, larger upload are removed. A prefix with a manifest therefore
    always holds every shard that manifest lists.

    Args:
        local_dir: a split folder written by :func:`mixersnn.data.converters.write_split`.
        url: the target prefix (``s3://bucket/fmnist/train``).
        manifest_name: the manifest's file name.

    Returns:
        The URLs of the shards uploaded, in name order.

    Raises:
        FileNotFoundError: ``local_dir`` has no manifest (not a finished split), or the
            bucket does not exist.
    """
    local_dir = Path(local_dir)
    if not (local_dir / manifest_name).is_file():
        raise FileNotFoundError(
            f"{local_dir} has no {manifest_name}: it is not a finished split. Convert it first with "
            f"`mixersnn data make-shards`."
        )
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        bucket_ok = bool(fs.exists(bucket))
    except Exception:
        bucket_ok = True
    if not bucket_ok:
        raise FileNotFoundError(missing_message(url))
    shards = sorted(p for p in local_dir.glob("shard-*.tar") if p.is_file())
    manifest_path = join(path, manifest_name)
    try:
        fs.rm_file(manifest_path)
    except FileNotFoundError:
        pass
    uploaded = []
    for p in shards:
        fs.put_file(str(p), join(path, p.name))
        uploaded.append(join(url, p.name))
    fs.put_file(str(local_dir / manifest_name), manifest_path)
    keep = {p.name for p in shards} | {manifest_name}
    for name in sorted(list_names(url)):
        if name.startswith("shard-") and name.endswith(".tar") and name not in keep:
            fs.rm_file(join(path, name))
    fs.invalidate_cache(path)
    return uploaded
