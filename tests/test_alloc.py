"""The cpu backend's output pool (``mixersnn.kernels._alloc``) and the benchmarks' smoke runs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixersnn.kernels import empty_cache, pool_stats, set_pool_limit
from mixersnn.kernels._alloc import empty_like_large
from mixersnn.neurons import lif_multistep

ROOT = Path(__file__).resolve().parents[1]
BIG = (4, 4 << 20)  # 64 MiB of fp32: above glibc's mmap threshold, so pooled


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.fixture
def pool():
    old = set_pool_limit(1 << 30)
    empty_cache()
    yield
    set_pool_limit(old)
    empty_cache()


def test_freed_large_outputs_are_reused_without_page_faults(pool) -> None:
    like = torch.empty(BIG)
    a = empty_like_large(like)
    a.fill_(1.0)
    ptr = a.data_ptr()
    del a  # the last tensor over the buffer: it goes back to the pool
    assert pool_stats()["idle_buffers"] == 1
    f0 = _minflt()
    b = empty_like_large(like)
    b.fill_(2.0)
    faults = _minflt() - f0
    assert b.data_ptr() == ptr and pool_stats()["idle_buffers"] == 0
    assert faults < 64, faults  # a fresh 64 MiB buffer takes ~16k (4 KiB pages) or ~32 (THP)
    assert b.shape == like.shape and b.dtype == like.dtype and b.is_contiguous()
    # A buffer in use is never handed out twice.
    c = empty_like_large(like)
    assert c.data_ptr() != b.data_ptr()


def test_buffers_start_on_a_huge_page_boundary_new_or_reused(pool) -> None:
    # 2 MiB alignment: whole huge pages, and every row of an output whose N is a multiple of
    # 16 on a cache line (numpy's own large buffers start 16 bytes into a page).
    like = torch.empty(BIG)
    first = [empty_like_large(like) for _ in range(3)]
    assert all(t.data_ptr() % (2 << 20) == 0 for t in first)
    del first
    again = [empty_like_large(like) for _ in range(3)]
    assert pool_stats()["hits"] >= 3
    assert all(t.data_ptr() % (2 << 20) == 0 for t in again)
    for t in again:  # the whole view is usable memory
        t.fill_(1.0)
        assert t.sum().item() == like.numel()


def test_a_buffer_returns_only_when_its_last_view_dies(pool) -> None:
    like = torch.empty(BIG)
    a = empty_like_large(like)
    row = a[1]  # a view keeps the storage alive
    del a
    assert pool_stats()["idle_buffers"] == 0
    row.fill_(3.0)
    del row
    assert pool_stats()["idle_buffers"] == 1


def test_pool_limit_bounds_idle_memory_and_zero_turns_it_off(pool) -> None:
    like = torch.empty(BIG)
    bufs = [empty_like_large(like) for _ in range(3)]
    set_pool_limit(2 * like.nbytes)
    del bufs
    assert pool_stats()["idle_bytes"] == 2 * like.nbytes  # the third went back to the OS
    set_pool_limit(0)
    assert pool_stats()["idle_bytes"] == 0
    a = empty_like_large(like)
    del a
    assert pool_stats()["idle_buffers"] == 0
    with pytest.raises(ValueError, match="max_bytes=-1 must be an integer >= 0"):
        set_pool_limit(-1)


def test_small_outputs_are_plain_tensors(pool) -> None:
    misses = pool_stats()["misses"]
    t = empty_like_large(torch.empty(1024))
    assert t.shape == (1024,) and pool_stats()["misses"] == misses


def test_pooled_outputs_through_autograd_match_fresh_ones(pool) -> None:
    # A full-size LIF step twice (the second one on recycled buffers) against the pool off.
    x = torch.randn(*BIG, requires_grad=True)
    g = torch.randn(*BIG)
    results = []
    for limit in (1 << 30, 1 << 30, 0):
        set_pool_limit(limit)
        s, v = lif_multistep(x, tau=2.0, v_threshold=1.0, backend="cpu")
        s.backward(g)
        results.append((s.clone(), v.clone(), x.grad.clone()))
        x.grad = None
        del s, v
    for got in results[1:]:
        for a, b in zip(results[0], got):
            assert torch.equal(a, b)


def test_bad_pool_size_in_the_environment_names_the_value() -> None:
    proc = subprocess.run([sys.executable, "-c", "import mixersnn.kernels"], capture_output=True, text=True,
                          cwd=ROOT, env={"MIXERSNN_CPU_POOL_MB": "lots", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode != 0 and "MIXERSNN_CPU_POOL_MB='lots' must be a number of MiB >= 0" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["lif.py", "train_step.py"])
def test_benchmark_smoke_runs_measure_the_pool_side_by_side(script: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # lif.py runs with the surrogate that is not the default, to see the option reach the neuron.
    extra = ["--surrogate", "atan"] if script == "lif.py" else []
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *extra, "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if r["device"] == "cpu"]
    seen = {(r["backend"], r["pool"]) for r in rows}
    assert {("torch", "-"), ("cpu", "fresh"), ("cpu", "pool")} <= seen, seen
    if script == "train_step.py":
        # Same weights and batch: the fused kernels give the reference's loss, pool or not, with
        # event-driven synapses ("eager") or dense ones ("dense-synapses").
        assert {"eager", "dense-synapses"} <= {r["variant"] for r in rows}
        assert all(r["loss_diff_vs_reference"] is None or r["loss_diff_vs_reference"] < 1e-4 for r in rows), rows
    else:
        _check_lif_pass_rows_and_neuron(result)


def _check_lif_pass_rows_and_neuron(result: dict) -> None:
    """lif.py's per-pass rows are priced at half a step's bytes, and the neuron is the models'
    own (NeuronConfig's defaults) with the surrogate asked for (atan)."""
    from mixersnn.models.config import NeuronConfig

    expected = {k: v for k, v in NeuronConfig(surrogate="atan").to_dict().items() if k != "backend"}
    assert result["meta"]["neuron"] == expected and expected["detach_reset"] is True
    kern = {r["pool"]: r for r in result["rows"] if r["backend"] == "cpu-kern"}
    assert set(kern) == {"-", "n+1", "cache", "fwd", "bwd", "fwd cache", "bwd cache"}, set(kern)
    elements = result["meta"]["steps"] * result["meta"]["numel"]
    for label, r in kern.items():
        per_element = 12 if label.split()[0] in ("fwd", "bwd") else 24
        assert r["bytes_per_element"] == per_element, (label, r)
        # The floor is those bytes at the row's own best copy bandwidth.
        best = max(r["copy_GBps"].values())
        assert r["floor_ms"] == pytest.approx(elements * per_element / best / 1e6, rel=1e-9), (label, r)
        assert (r["vs_reference"] is None) == (per_element == 12), (label, r)
    # The traffic rows (the kernels' bytes without their arithmetic) are priced alike, and the
    # kernels' time is given against theirs.
    traf = {r["pool"]: r for r in result["rows"] if r["backend"] == "cpu-traf"}
    assert {k: r["bytes_per_element"] for k, r in traf.items()} == {"-": 24, "fwd": 12, "bwd": 12}
    assert result["meta"]["kernels_vs_traffic"] == {k: pytest.approx(kern[k]["ms"] / traf[k]["ms"]) for k in traf}


_HEAP_PROBE = """
import resource, sys, torch
from mixersnn.kernels import keep_heap_pages
kept = keep_heap_pages() if sys.argv[1] == "keep" else False
sizes = [(1 << 20) * k // 4 for k in (1, 3, 2, 5, 4, 7, 6)]  # 1-7 MiB of fp32, as a step's activations
def burst():
    ts = [torch.ones(n) for n in sizes]
    del ts
burst()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    burst()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10
print(kept, faults, sum(sizes) * 4 // 4096)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_kept_heap_pages_are_reused_without_page_faults() -> None:
    """After ``keep_heap_pages`` a process that frees and re-allocates a step's worth of
    1-7 MiB tensors reuses mapped memory; glibc's defaults fault much of it in again."""

    def probe(mode: str) -> tuple[bool, float, int]:
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True,
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        kept, faults, pages = out.stdout.split()
        return kept == "True", float(faults), int(pages)

    kept, faults, pages = probe("keep")
    assert kept and faults < 0.1 * pages, (faults, pages)
    default, faults0, _ = probe("default")
    assert not default and faults0 > 2 * faults, (faults0, faults)
    # Opting out leaves glibc alone.
    out = subprocess.run([sys.executable, "-c", "from mixersnn.kernels import keep_heap_pages; print(keep_heap_pages())"],
                         capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, "MIXERSNN_KEEP_HEAP": "0"})
    assert out.stdout.strip() == "False"


def test_train_step_authors_flag_without_their_code_says_what_it_needs(tmp_path: Path) -> None:
    """``benchmarks/train_step.py --authors DIR`` times the authors' model from a checkout of
    their repository; a folder without it stops with what the flag needs, before timing."""
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--smoke", "--rows", "small", "--authors",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "EMI-Group/mixer-snn" in proc.stderr and "models/mixers_sparse_patchcell_origin.py" in proc.stderr
