"""Every CUDA kernel variant compiles through NVRTC (no GPU needed).

Covers all option sets (hard/soft reset x decay_input x save for the forward; reset x
decay_input x detach_reset x surrogate for the backward) at fp32/fp16/bf16, for sm_80
(A100) and sm_90 (H100/H200). Skips only when CuPy's NVRTC binding cannot be imported.
"""

from __future__ import annotations

import pytest

from mixersnn.kernels.source import (
    DTYPES,
    SURROGATE_NAMES,
    backward_variants,
    forward_variants,
    kernel_source,
)
from mixersnn.neurons.surrogate import SURROGATES

try:  # cupy.cuda.nvrtc is an attribute (a compiled module), not an importable module path
    from cupy.cuda import nvrtc  # noqa: F401
except ImportError:  # pragma: no cover - CI installs the dev extra
    pytest.skip("CuPy/NVRTC not installed (dev extra)", allow_module_level=True)


def test_variant_lists_cover_every_option_set() -> None:
    fwd = forward_variants()
    bwd = backward_variants()
    assert len(fwd) == len(DTYPES) * 2 * 2 * 2
    assert len(bwd) == len(DTYPES) * 2 * 2 * 2 * len(SURROGATE_NAMES)
    assert len({v.template_name for v in fwd + bwd}) == len(fwd) + len(bwd)


def test_host_entry_points_per_dtype_and_unknown_dtypes_named() -> None:
    fp32 = kernel_source("host")
    everything = kernel_source("host", ("float32", "float16", "bfloat16"))
    for v in forward_variants() + backward_variants():
        assert (f'void {v.c_symbol}(' in fp32) == (v.dtype == "float32"), v
        assert f'void {v.c_symbol}(' in everything and v.host_template_name in everything, v
    with pytest.raises(ValueError, match=r"\['float8'\] unknown; choose from \['float32', 'float16', 'bfloat16'\]"):
        kernel_source("host", ("float32", "float8"))


def test_surrogates_are_generated_from_the_single_definition() -> None:
    for target in ("cuda", "host"):
        src = kernel_source(target)
        for name in SURROGATE_NAMES:
            for line in SURROGATES[name].cuda_derivative.splitlines():
                assert line in src, (name, line)
        assert "@SURROGATES@" not in src


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_all_variants_compile_to_cubin(arch: str) -> None:
    from mixersnn.kernels.cupy_backend import nvrtc_compile

    # One program per arch holds every dtype: the fp16/bf16 headers are parsed once.
    variants = forward_variants() + backward_variants()
    cubin, lowered = nvrtc_compile(variants, arch)
    assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image
    assert set(lowered) == {v.template_name for v in variants}
    # Every instantiation is a distinct kernel present in the binary.
    assert len(set(lowered.values())) == len(variants)
    for mangled in lowered.values():
        assert mangled.encode() in cubin


def test_compile_failure_raises_with_the_nvrtc_log(monkeypatch: pytest.MonkeyPatch) -> None:
    from mixersnn.kernels import cupy_backend

    broken = kernel_source("cuda") + "\n__global__ void broken() { undefined_symbol(); }\n"
    monkeypatch.setattr(cupy_backend, "kernel_source", lambda target: broken)
    with pytest.raises(RuntimeError, match="undefined_symbol"):
        cupy_backend.nvrtc_compile(forward_variants(("float32",))[:1], "sm_80")
