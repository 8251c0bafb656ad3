"""Atomic file replacement: the one way this project writes a file that others may be reading.

Every file a failure must not corrupt (shards, manifests, checkpoints, downloaded data) is
written to a hidden temporary file in the same folder and renamed over the final name only
when it is complete, so a reader or a crash sees either the old file or the whole new one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_path", "atomic_write_bytes"]


@contextmanager
def atomic_path(path: Union[str, Path], *, suffix: str = ".tmp", mode: int = 0o644) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``.

    The temporary file is ``.<name>.<random><suffix>`` in ``path``'s folder (created, empty),
    so the rename never crosses file systems. On success it is fsynced, given ``mode`` and
    moved into place with ``os.replace``; on any exception it is deleted and ``path`` is
    untouched.

    Args:
        path: the final file.
        suffix: the temporary name's ending (some readers pick a format by extension).
        mode: permission bits of the final file (``mkstemp`` creates 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
