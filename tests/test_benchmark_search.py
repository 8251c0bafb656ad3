"""benchmarks/search.py's smoke run: both trial paths and a short search, figures written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import WORKER_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_search_benchmark_smoke_measures_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "search.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search.py"), "--smoke", "--json", str(out)],
                          cwd=tmp_path, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    paths = {r["path"]: r for r in figures["overhead"]}
    assert set(paths) == {"in-process", "ray-train"}
    for r in paths.values():
        assert r["trials"] == 2 and r["startup_s_median"] > 0 and r["cpu_s_per_trial"] > 0 and r["step_s_per_trial"] > 0
        assert r["slot_overhead_s"] > 0
    s = figures["search"]
    assert s["trials"] >= 1 and s["images_per_min"] > 0 and 0 < s["step_cpu_share"] < 1
    assert "per-trial overhead" in proc.stdout and "Ray Train path / in-process" in proc.stdout
