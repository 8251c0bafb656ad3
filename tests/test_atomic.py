"""``mixersnn._atomic``: the one atomic-replace helper behind shards, manifests, checkpoints
and downloads."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from mixersnn._atomic import atomic_path, atomic_write_bytes


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_complete_write_replaces_the_file_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "manifest.json"  # the folder is created
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    with atomic_path(target, suffix=".part.gz") as tmp:
        assert tmp.endswith(".part.gz") and Path(tmp).parent == target.parent
        assert Path(tmp).name.startswith(".manifest.json.")
        Path(tmp).write_bytes(b"newer")
        assert target.read_bytes() == b"new"  # untouched until the block ends
    assert target.read_bytes() == b"newer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]
