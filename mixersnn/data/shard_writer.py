"""Writing one WebDataset shard: image encodings and byte-reproducible tar files.

A shard is a plain POSIX tar in which sample ``KEY`` is the member pair ``KEY.<ext>`` (the
image: ``png``, ``jpg`` or ``npy``) and ``KEY.cls`` (the label as ASCII digits), which is
what WebDataset groups into one sample. Every tar header field that would otherwise depend on
the machine or the clock (mtime, uid/gid, user names, mode) is fixed, members are written in
sample order, and the format is USTAR, so converting the same input twice gives the same bytes
and the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
from PIL import Image
from mixersnn._atomic import atomic_path

__all__ = ["ENCODINGS", "encode_image", "decode_image", "ShardResult", "write_shard", "IMAGE_EXTS"]

ENCODINGS = ("png", "jpeg", "npy", "keep")
"""``png`` lossless, ``jpeg`` lossy and small, ``npy`` raw uint8 (fastest to decode, largest),
``keep`` the source file's own bytes (ImageFolder only: no re-encoding loss for JPEG data)."""

IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")
_EXT = {"png": "png", "jpeg": "jpg", "npy": "npy"}


def encode_image(img: np.ndarray, encoding: str, *, jpeg_quality: int = 95) -> tuple[bytes, str]:
    """Encode one image.

    Args:
        img: ``uint8 [H, W]`` (grey) or ``[H, W, 3]`` (RGB).
        encoding: ``png``, ``jpeg`` or ``npy``.
        jpeg_quality: 1-100, used by ``jpeg`` only.

    Returns:
        ``(bytes, extension)``, the extension being the tar member suffix.
    """
    if img.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {img.dtype}; scale to 0-255 and cast first")
    if encoding == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
        return buf.getvalue(), "npy"
    pil = Image.fromarray(img)
    buf = io.BytesIO()
    if encoding == "png":
        # PNG output of a given Pillow/zlib build is deterministic; no metadata chunks are added.
        pil.save(buf, format="PNG", compress_level=6)
    elif encoding == "jpeg":
        pil.save(buf, format="JPEG", quality=int(jpeg_quality))
    else:
        raise ValueError(f"encoding={encoding!r}; allowed: png, jpeg, npy (and keep for image folders)")
    return buf.getvalue(), _EXT[encoding]


def decode_image(data: bytes, ext: str, channels: Optional[int] = None) -> np.ndarray:
    """Decode image bytes to ``uint8 [H, W, C]``.

    Args:
        data: the member's bytes.
        ext: the member suffix (``png``, ``jpg``, ``jpeg``, ``npy``).
        channels: convert to 1 (``L``) or 3 (``RGB``) channels; None keeps what is stored.
    """
    if ext == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if channels is not None and arr.shape[-1] != channels:
            if channels == 3 and arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
            elif channels == 1 and arr.shape[-1] == 3:
                arr = np.asarray(Image.fromarray(arr).convert("L"))[:, :, None]
        return arr
    with Image.open(io.BytesIO(data)) as im:
        want = {1: "L", 3: "RGB"}.get(channels or 0)
        if want is not None and im.mode != want:
            im = im.convert(want)
        elif want is None and im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    # Fixed header fields: the same input must give the same bytes on any machine, any day.
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


@dataclass(frozen=True)
class ShardResult:
    """What writing one shard produced (sent back from a worker process).

    Attributes:
        name: file name of the shard.
        num_samples: samples written.
        sha256: hex digest of the tar.
        nbytes: tar size in bytes.
        pixel_sum: per-channel sum of pixels in [0, 1] (float64), for the data set mean.
        pixel_sumsq: per-channel sum of squares, for the standard deviation.
        pixel_count: pixels per channel that were summed.
        sizes: the distinct ``(H, W)`` image sizes in the shard.
    """

    name: str
    num_samples: int
    sha256: str
    nbytes: int
    pixel_sum: tuple[float, ...]
    pixel_sumsq: tuple[float, ...]
    pixel_count: int
    sizes: tuple[tuple[int, int], ...]


def write_shard(
    path: Union[str, Path], samples: Iterable[tuple[str, bytes, str, int, np.ndarray]]
) -> ShardResult:
    """Write a shard atomically and return its statistics.

    The tar is written to a hidden temp file in the target folder and renamed into place only
    once it is complete and closed, so a failure never leaves a partial shard under a final name.

    Args:
        path: final shard path.
        samples: ``(key, image_bytes, ext, label, pixels)`` per sample, ``pixels`` being the
            decoded ``uint8 [H, W, C]`` image used for the statistics.
    """
    path = Path(path)
    n = 0
    psum: Optional[np.ndarray] = None
    psq: Optional[np.ndarray] = None
    count = 0
    sizes: set[tuple[int, int]] = set()
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data, ext, label, pixels in samples:
                if "." in key or "/" in key:
                    raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits on them)")
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                cls = str(int(label)).encode()
                tar.addfile(_tarinfo(f"{key}.cls", len(cls)), io.BytesIO(cls))
                x = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255.0
                s, q = x.sum(0), (x * x).sum(0)
                psum = s if psum is None else psum + s
                psq = q if psq is None else psq + q
                count += x.shape[0]
                sizes.add((int(pixels.shape[0]), int(pixels.shape[1])))
                n += 1
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        nbytes = os.path.getsize(tmp)
    return ShardResult(
        name=path.name,
        num_samples=n,
        sha256=h.hexdigest(),
        nbytes=nbytes,
        pixel_sum=tuple(float(v) for v in (psum if psum is not None else [])),
        pixel_sumsq=tuple(float(v) for v in (psq if psq is not None else [])),
        pixel_count=count,
        sizes=tuple(sorted(sizes)),
    )
