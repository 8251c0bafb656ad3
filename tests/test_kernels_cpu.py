"""The "cpu" backend (lif.cu compiled as host C++) against the torch reference.

Spikes must match exactly; v_final and the gradients of x and v0 to fp32 tolerance. Also: the
fp16/bf16 kernel instantiations the GPU runs, executed on the CPU; backend selection, the
GPU-less failure mode of "cupy", and the on-disk library cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _helpers import KERNEL_TOL, lif_grads, lif_inputs, lif_option_grid
from mixersnn.kernels import cpu as cpu_kernels
from mixersnn.neurons import LIF, lif_multistep, lif_reference, make_lif_params
from mixersnn.neurons.backends import LIFParams, resolve_backend

pytestmark = pytest.mark.skipif(
    cpu_kernels.cpu_unavailable_reason() is not None,
    reason=f"cpu kernels unavailable: {cpu_kernels.cpu_unavailable_reason()}",
)

REPO = Path(__file__).resolve().parents[1]


#: Every option choice, once with the paper's constants and once with others.
OPTIONS = lif_option_grid(
    lambda v_reset, *_: {"v_reset": v_reset},
    lambda v_reset, *_: {"tau": 3.7, "v_threshold": 0.6, "v_reset": None if v_reset is None else -0.2, "alpha": 2.5},
)


@pytest.fixture(params=["cached", "streamed"])
def store_path(request):
    """Run with the kernels writing outputs through the cache (threshold above any test size)
    or with non-temporal stores (threshold 0); odd n puts rows off 32-byte alignment, so the
    streamed path's unaligned head and tail are covered too."""
    before = cpu_kernels.stream_threshold()
    cpu_kernels.set_stream_threshold(0 if request.param == "streamed" else 1 << 40)
    yield request.param
    cpu_kernels.set_stream_threshold(before)


@pytest.mark.parametrize("p", OPTIONS, ids=lambda p: repr(p))
def test_parity_with_reference_fp32(p: LIFParams, store_path: str) -> None:
    for steps, n in [(1, 1), (2, 7), (5, 1031), (16, 7), (16, 1031), (3, 20000)]:
        x = lif_inputs(steps, n, seed=steps * 7919 + n)
        v0 = torch.randn(n) * 0.5
        gs, gv = torch.randn(steps, n), torch.randn(n)
        s_ref, v_ref, gx_ref, gv0_ref = lif_grads(lif_reference, x, v0, p, gs, gv)
        s, v, gx, gv0 = lif_grads(cpu_kernels.lif_cpu, x, v0, p, gs, gv)
        assert s.dtype == torch.float32 and s.shape == (steps, n)
        assert torch.equal(s, s_ref), f"spikes differ at T={steps}, N={n}"
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gv0, gv0_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [4.0, 0.5])
def test_sigmoid_surrogate_far_from_threshold_and_nan(alpha: float, store_path: str) -> None:
    """The host exp behind the sigmoid surrogate over its whole range: alpha * u from -400 to
    400 (past the clamp at 2^-126 = e^-87.3 on either side, since the surrogate takes
    e^-|alpha u| = 2^-|alpha log2(e) u|),
    every chunk position and tail (n = 3 * 4096 + 5), and a NaN membrane, whose gradient
    stays NaN as in the reference. Gradients are checked against the reference in float64:
    the fp32 reference loses sig'(alpha u) to cancellation in 1 - sig once sig rounds near 1
    (47% off at alpha u = 15.5), the kernel does not."""
    p = make_lif_params(surrogate="sigmoid", alpha=alpha, detach_reset=False)
    n = 3 * 4096 + 5
    # T=1 from v0 = 0 with hard reset and decay_input: h = x / tau, u = h - v_threshold.
    u = torch.linspace(-400.0, 400.0, n) / alpha
    x = ((u + p.v_threshold) * p.tau)[None]
    x[0, 17] = float("nan")
    v0, gs, gv = torch.zeros(n), torch.randn(1, n), torch.randn(n)
    s_ref, _, gx_ref, gv0_ref = lif_grads(lif_reference, x.double(), v0.double(), p, gs.double(), gv.double())
    s, _, gx, gv0 = lif_grads(cpu_kernels.lif_cpu, x, v0, p, gs, gv)
    assert torch.equal(s.double(), s_ref)
    gx_ref, gv0_ref = gx_ref.float(), gv0_ref.float()
    assert torch.isnan(gx[0, 17]) and torch.isnan(gx_ref[0, 17])
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gv0, gv0_ref, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("alpha", [4.0, 1.3])
def test_sigmoid_surrogate_is_within_a_few_ulp_of_the_exact_derivative(alpha: float) -> None:
    """The surrogate the backward kernel computes, read out alone: with T=1, detach_reset, no
    gradient on v_final and a spike gradient of 1, grad_x is sg(u). Against sig'(alpha u) in
    float64, every u on a dense grid out to where sg underflows: relative error at most
    3e-7 * max(1, |alpha u|), the peak sg(0) = alpha / 4 exact, nothing negative or NaN. The
    base-2 exp is 1.7e-7 at most; what grows with |alpha u| is the fp32 rounding of its
    argument, as for any fp32 exp (measured: 2.6e-7 |alpha u| at most; the Cody-Waite expf
    before it, 2.3e-7 |alpha u|)."""
    p = make_lif_params(surrogate="sigmoid", alpha=alpha, detach_reset=True, decay_input=False)
    u = torch.cat([torch.linspace(-90.0, 90.0, 720_001) / alpha, torch.tensor([0.0, -0.0])])[None]
    n = u.shape[1]
    gs, grad_x = torch.ones(1, n), torch.full((1, n), float("nan"))
    cpu_kernels._CpuLauncher.backward(p, u, gs, None, grad_x, None, n, 1)
    sg = grad_x[0].double()
    z = alpha * u[0].double()
    exact = alpha * torch.sigmoid(z) * torch.sigmoid(-z)
    assert torch.isfinite(sg).all() and (sg >= 0).all()
    assert sg[-1] == sg[-2] == torch.tensor(alpha).float().item() / 4  # alpha as the kernel gets it
    live = exact > 1e-35  # sg underflows fp32 (subnormals) past |alpha u| ~ 80
    rel = ((sg - exact).abs() / exact / z.abs().clamp_min(1.0))[live]
    assert live.float().mean() > 0.85 and rel.max() < 3e-7, rel.max()


@pytest.mark.parametrize("offset", [1, 3, 4, 8, 15])
def test_outputs_off_cache_line_alignment_are_bitwise_equal(offset: int, store_path: str) -> None:
    """The kernels lay their chunks on the first output's cache lines (a short first chunk
    when a row starts mid-line): outputs written at every misalignment, with n not a
    multiple of 16 so each row starts elsewhere, equal those written to aligned memory."""
    p = make_lif_params(detach_reset=False)
    steps, n = 3, 2 * 4096 + 37
    x, v0 = lif_inputs(steps, n, seed=13), torch.randn(n) * 0.5
    gs = torch.randn(steps, n)

    def run(shift: int) -> list[torch.Tensor]:
        def buf(*shape: int) -> torch.Tensor:
            numel = int(torch.tensor(shape).prod())
            return torch.full((numel + 16,), float("nan"))[shift : shift + numel].view(*shape)

        spikes, u, grad_x = buf(steps, n), buf(steps, n), buf(steps, n)
        v_final, grad_v0 = buf(n), buf(n)
        cpu_kernels._CpuLauncher.forward(p, x, v0, spikes, u, v_final, n, steps)
        cpu_kernels._CpuLauncher.backward(p, u, gs, None, grad_x, grad_v0, n, steps)
        return [spikes, u, v_final, grad_x, grad_v0]

    for a, b in zip(run(0), run(offset)):
        assert torch.equal(a, b)


def test_streamed_and_cached_outputs_are_bitwise_equal() -> None:
    # Large enough for several tiles per thread; n odd so no row is 32-byte aligned.
    p = make_lif_params(detach_reset=False)
    steps, n = 4, 3 * 4096 + 5
    x, v0 = lif_inputs(steps, n, seed=11), torch.randn(n) * 0.5
    gs, gv = torch.randn(steps, n), torch.randn(n)
    before = cpu_kernels.stream_threshold()
    try:
        cpu_kernels.set_stream_threshold(1 << 40)
        cached = lif_grads(cpu_kernels.lif_cpu, x, v0, p, gs, gv)
        cpu_kernels.set_stream_threshold(0)
        streamed = lif_grads(cpu_kernels.lif_cpu, x, v0, p, gs, gv)
    finally:
        cpu_kernels.set_stream_threshold(before)
    for a, b in zip(cached, streamed):
        assert torch.equal(a, b)


def test_stream_threshold_defaults_to_the_last_level_cache_and_validates() -> None:
    before = cpu_kernels.stream_threshold()
    try:
        cpu_kernels.set_stream_threshold(12345)
        assert cpu_kernels.stream_threshold() == 12345
        cpu_kernels.set_stream_threshold(None)
        assert cpu_kernels.stream_threshold() == cpu_kernels.last_level_cache_bytes()
        with pytest.raises(ValueError, match="nbytes=-1 must be >= 0"):
            cpu_kernels.set_stream_threshold(-1)
    finally:
        cpu_kernels.set_stream_threshold(before)
    # sysfs (what lscpu shows) is the source, never glibc's sysconf.
    llc = cpu_kernels.last_level_cache_bytes()
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
    assert llc == (max(sizes) if sizes else 32 << 20)


@pytest.mark.parametrize("n", [1, 7, 1031, 3 * 4096 + 5])
def test_stream_copy_copies_exactly_at_any_alignment(n: int) -> None:
    src = torch.randn(n + 1)[1:]  # storage offset 1: 4 bytes off the allocation's alignment
    for s in (src, torch.randn(n)):
        dst = torch.full_like(s, float("nan"))
        cpu_kernels.stream_copy(s, dst)
        assert torch.equal(dst, s)
    view = torch.empty(n + 1)[1:]
    cpu_kernels.stream_copy(src, view)
    assert torch.equal(view, src)


@pytest.mark.parametrize("steps, n", [(1, 7), (3, 3 * 4096 + 5), (4, 2 * 4096)])
@pytest.mark.parametrize("stream", [True, False])
def test_stream_traffic_moves_every_element_of_both_passes(steps: int, n: int, stream: bool) -> None:
    """benchmarks/lif.py's traffic rows time real work: every element read and written, with
    streaming stores (threshold 0) and without, in tiles, tails and rows off cache lines."""
    a, b = torch.randn(steps, n), torch.randn(steps, n)
    cpu_kernels.set_stream_threshold(0 if stream else 1 << 62)
    try:
        s, u = torch.full_like(a, float("nan")), torch.full_like(a, float("nan"))
        cpu_kernels.stream_traffic("forward", a, s, u)
        assert torch.equal(s, a) and torch.equal(u, a + 1)
        g = torch.full_like(a, float("nan"))
        cpu_kernels.stream_traffic("backward", a, b, g)
        assert torch.equal(g, a + b)
    finally:
        cpu_kernels.set_stream_threshold(None)
    with pytest.raises(ValueError, match="'sideways'"):
        cpu_kernels.stream_traffic("sideways", a, b, g)
    with pytest.raises(ValueError, match=r"one shape.*\(1, 2\)"):
        cpu_kernels.stream_traffic("backward", a, b, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        cpu_kernels.stream_traffic("backward", a, b, g.double())


def test_stream_copy_rejects_bad_tensors() -> None:
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.stream_copy(torch.zeros(4, dtype=torch.float64), torch.zeros(4))
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.stream_copy(torch.zeros(4, 4).t(), torch.zeros(16))
    with pytest.raises(ValueError, match="4 elements and dst 5"):
        cpu_kernels.stream_copy(torch.zeros(4), torch.zeros(5))


def test_the_inputs_exercise_firing_and_exact_threshold_hits() -> None:
    # Guards the parity test against inputs that never fire (where a broken reset or a
    # broken surrogate branch would go unnoticed).
    p = make_lif_params()
    x = lif_inputs(16, 1031, seed=1)
    h = torch.zeros(1031)
    hits = 0
    for t in range(16):
        h_t = h + (x[t] - h) * 0.5
        hits += int((h_t == p.v_threshold).sum())
        h = torch.where(h_t >= 1.0, torch.zeros_like(h_t), h_t)
    s, _ = lif_reference(x, torch.zeros(1031), p)
    assert 0.1 < s.mean().item() < 0.9
    assert hits > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", OPTIONS[::3], ids=lambda p: repr(p))
def test_16bit_inputs_match_fp32_reference_on_upcast_values(dtype: torch.dtype, p: LIFParams) -> None:
    steps, n = 6, 1031
    x = lif_inputs(steps, n, seed=5, dtype=dtype)
    v0 = (torch.randn(n) * 0.5).to(dtype)
    gs, gv = torch.randn(steps, n), torch.randn(n)
    s_ref, v_ref, gx_ref, gv0_ref = lif_grads(lif_reference, x.float(), v0.float(), p, gs, gv)
    s, v, gx, gv0 = lif_grads(cpu_kernels.lif_cpu, x, v0, p, gs.to(dtype), gv.to(dtype))
    assert s.dtype == dtype and v.dtype == dtype and gx.dtype == dtype
    assert torch.equal(s.float(), s_ref)
    # The results are fp32 values rounded once to the 16-bit type (plus the 16-bit upstream
    # gradients), so the tolerance is a few units of that type's precision.
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(v.float(), v_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.float(), gx_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gv0.float(), gv0_ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------- the GPU's 16-bit kernels on a CPU
# The cpu backend computes 16-bit tensors in fp32 (torch converts around the call), but the GPU
# runs lif.cu's fp16/bf16 instantiations: 16-bit loads and stores, u saved in 16 bits, and the
# backward pass's spike read back from that u's sign. The host build compiles those same
# instantiations with host types that round like CUDA (lif_shim.h), so they run here too.
# Tolerances are the GPU suite's (KERNEL_TOL): what passes here should pass there.


@pytest.mark.parametrize("p", OPTIONS, ids=lambda p: repr(p))
def test_no_initial_membrane_and_no_final_one_read_and_write_nothing(p: LIFParams, store_path: str) -> None:
    """v0 None starts from rest (v_reset for a hard reset, 0 for a soft one) without reading,
    v_final=False writes no final membrane (the models' LIF nodes): the same spikes and
    gradients, bit for bit, as an explicit v0 filled with the rest value."""
    rest = 0.0 if p.v_reset is None else p.v_reset
    for steps, n in [(1, 7), (4, 2 * 4096 + 37), (16, 1031)]:
        x = lif_inputs(steps, n, seed=steps * 13 + n)
        gs = torch.randn(steps, n)
        outs = []
        for v0, keep in ((torch.full((n,), rest), True), (None, False), (torch.zeros(n), False)):
            xx = x.clone().requires_grad_()
            s, v = cpu_kernels.lif_cpu(xx, v0, p, v_final=keep)
            assert (v is None) == (not keep)
            s.backward(gs)
            outs.append((s, xx.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), (steps, n)
        if rest != 0.0 and steps > 1:
            # Non-vacuous: a start at 0 is another neuron (the gradients differ).
            assert not torch.equal(outs[2][1], outs[1][1]), (steps, n)


@pytest.fixture(scope="module")
def host16(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return cpu_kernels.compile_host_kernels(tmp_path_factory.mktemp("host16") / "lif16.so", ("float16", "bfloat16"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", OPTIONS, ids=lambda p: repr(p))
def test_16bit_kernel_instantiations_match_the_fp32_reference(host16, dtype: torch.dtype, p: LIFParams) -> None:  # type: ignore[no-untyped-def]
    from mixersnn.kernels.source import backward_variant, forward_variant

    name = str(dtype).removeprefix("torch.")
    forward = getattr(host16, forward_variant(p, name, save=True).c_symbol)
    backward = getattr(host16, backward_variant(p, name).c_symbol)
    threads = torch.get_num_threads()
    # n = 2 tiles + 37 lanes: short last tile and chunk; T = 16 is the GPU suite's longest.
    for steps, n in [(1, 7), (5, 2 * 4096 + 37), (16, 1031)]:
        x = lif_inputs(steps, n, seed=steps * 31 + n, dtype=dtype)
        v0 = (torch.randn(n) * 0.5).to(dtype)
        gs, gv = torch.randn(steps, n).to(dtype), torch.randn(n).to(dtype)
        s_ref, v_ref, gx_ref, gv0_ref = lif_grads(lif_reference, x.float(), v0.float(), p, gs.float(), gv.float())

        spikes, u_saved, v_final = torch.empty_like(x), torch.empty_like(x), torch.empty_like(v0)
        forward(x.data_ptr(), v0.data_ptr(), spikes.data_ptr(), u_saved.data_ptr(), v_final.data_ptr(),
                n, steps, 1.0 / p.tau, p.v_reset_charge, p.v_threshold, threads)
        grad_x, grad_v0 = torch.empty_like(x), torch.empty_like(v0)
        backward(u_saved.data_ptr(), gs.data_ptr(), gv.data_ptr(), grad_x.data_ptr(), grad_v0.data_ptr(),
                 n, steps, 1.0 / p.tau, p.v_reset_charge, p.v_threshold, p.alpha, threads)

        assert torch.equal(spikes.float(), s_ref), f"spikes differ at T={steps}, N={n}"
        # What the backward pass recomputes: fired == the stored u's sign bit is clear, also
        # where u rounded to zero in 16 bits or sat exactly on the threshold.
        assert torch.equal((~torch.signbit(u_saved.float())).float(), s_ref), f"sign of u at T={steps}, N={n}"
        tol = KERNEL_TOL[dtype]
        for label, got, want in (("v_final", v_final, v_ref), ("grad_x", grad_x, gx_ref), ("grad_v0", grad_v0, gv0_ref)):
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol,
                                       msg=lambda m, label=label: f"{label} at T={steps}, N={n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_kernels_take_null_v0_and_v_final(host16, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """The GPU's instantiations, run here: a null v0 starts from rest (the fp32 v_reset of a
    hard reset, 0 for a soft one), a null v_final is skipped.

    The rest value is an fp32 kernel argument, which a 16-bit v0 tensor may not hold exactly
    (-0.2 does not), so the null start is checked against the fp32 reference started there;
    where rest is 0 it is also bitwise what an explicit zero v0 gives."""
    from mixersnn.kernels.source import forward_variant

    name = str(dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    steps, n = 5, 2 * 4096 + 37
    x = lif_inputs(steps, n, seed=5, dtype=dtype)
    picked = OPTIONS[::5]
    assert any(p.v_reset not in (None, 0.0) for p in picked)  # a hard reset whose rest is not 0

    def run(p: LIFParams, v0: torch.Tensor | None, v_final: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        forward = getattr(host16, forward_variant(p, name, save=True).c_symbol)
        spikes, u_saved = torch.empty_like(x), torch.empty_like(x)
        forward(x.data_ptr(), None if v0 is None else v0.data_ptr(), spikes.data_ptr(), u_saved.data_ptr(),
                None if v_final is None else v_final.data_ptr(), n, steps, 1.0 / p.tau, p.v_reset_charge,
                p.v_threshold, threads)
        return spikes, u_saved

    for p in picked:
        rest = 0.0 if p.v_reset is None else p.v_reset
        s_ref, v_ref = lif_reference(x.float(), torch.full((n,), rest), p)
        v_final = torch.empty(n, dtype=dtype)
        with_vf = run(p, None, v_final)
        assert torch.equal(with_vf[0].float(), s_ref), p
        torch.testing.assert_close(v_final.float(), v_ref, rtol=KERNEL_TOL[dtype], atol=KERNEL_TOL[dtype])
        bare = run(p, None, None)
        assert torch.equal(bare[0], with_vf[0]) and torch.equal(bare[1], with_vf[1]), p
        if rest == 0.0:
            explicit = run(p, torch.zeros(n, dtype=dtype), torch.empty(n, dtype=dtype))
            assert torch.equal(explicit[0], bare[0]) and torch.equal(explicit[1], bare[1]), p
        else:
            # Non-vacuous: the reference started at 0 fires elsewhere.
            assert not torch.equal(lif_reference(x.float(), torch.zeros(n), p)[0], s_ref), p


@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("decay_input", [True, False])
def test_hard_reset_null_v0_starts_at_v_reset(decay_input: bool, detach_reset: bool, store_path: str) -> None:
    """The fp32 kernel with v0 None (a null pointer) and v_reset = -0.3: spikes, final membrane
    and gradient of x bit for bit as with an explicit v0 of -0.3, and within fp32 tolerance of
    the reference loop started there; not what a start at 0 gives."""
    p = make_lif_params(v_reset=-0.3, decay_input=decay_input, detach_reset=detach_reset, surrogate="atan")
    for steps, n in [(1, 7), (4, 2 * 4096 + 37), (16, 1031)]:
        x = lif_inputs(steps, n, seed=steps * 17 + n)
        gs, gv = torch.randn(steps, n), torch.randn(n)
        s, v, gx, gv0 = lif_grads(cpu_kernels.lif_cpu, x, None, p, gs, gv)
        assert gv0 is None
        s_rest, v_rest, gx_rest, _ = lif_grads(cpu_kernels.lif_cpu, x, torch.full((n,), -0.3), p, gs, gv)
        assert torch.equal(s, s_rest) and torch.equal(v, v_rest) and torch.equal(gx, gx_rest), (steps, n)
        s_ref, v_ref, gx_ref, _ = lif_grads(lif_reference, x, torch.full((n,), -0.3), p, gs, gv)
        assert torch.equal(s, s_ref), (steps, n)
        torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
        s_zero, v_zero, _, _ = lif_grads(lif_reference, x, torch.zeros(n), p, gs, gv)
        assert not torch.equal(v, v_zero), (steps, n)


@pytest.mark.parametrize("v_reset", [0.0, -0.3, None], ids=["hard0", "hard_neg", "soft"])
@pytest.mark.parametrize("v_init", [None, "given"])
def test_lif_multistep_backend_cpu_matches_torch(v_init: str | None, v_reset: float | None) -> None:
    x = lif_inputs(4, 2 * 3 * 5 * 7, seed=3).reshape(4, 2, 3, 5, 7)
    v = None if v_init is None else torch.randn(2, 3, 5, 7)
    outs = {}
    for backend in ("torch", "cpu"):
        xx = x.clone().requires_grad_()
        vv = None if v is None else v.clone().requires_grad_()
        s, vf = lif_multistep(xx, vv, v_reset=v_reset, backend=backend, surrogate="atan", detach_reset=False)
        (s * torch.arange(s.numel()).reshape(s.shape).sin()).sum().add(vf.square().sum()).backward()
        outs[backend] = (s, vf, xx.grad, None if vv is None else vv.grad)
    for a, b in zip(outs["torch"], outs["cpu"]):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs["torch"][0], outs["cpu"][0])


def test_non_contiguous_input_and_state() -> None:
    p = make_lif_params(v_reset=None)
    base = lif_inputs(9, 3 * 257, seed=11).reshape(9, 3, 257)
    x = base.transpose(1, 2)  # [9, 257, 3], non-contiguous
    v0 = torch.randn(3, 257).t()
    assert not x.is_contiguous() and not v0.is_contiguous()
    gs, gv = torch.randn(x.shape), torch.randn(v0.shape)
    ref = lif_grads(lif_reference, x, v0, p, gs, gv)
    got = lif_grads(cpu_kernels.lif_cpu, x, v0, p, gs, gv)
    assert torch.equal(got[0], ref[0])
    for a, b in zip(ref[1:], got[1:]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_only_v_final_used_and_no_grad_forward() -> None:
    p = make_lif_params(detach_reset=False)
    x = lif_inputs(5, 333, seed=2)
    v0 = torch.randn(333)
    # A gradient that reaches only v_final (spikes unused downstream).
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    lif_reference(xr, v0, p)[1].sum().backward()
    cpu_kernels.lif_cpu(xc, v0, p)[1].sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)
    # Under no_grad the forward stores nothing for backward and still returns the same result.
    with torch.no_grad():
        s_ref, v_ref = lif_reference(x, v0, p)
        s, v = cpu_kernels.lif_cpu(x.requires_grad_(), v0, p)
    assert not s.requires_grad
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(v, v_ref)


def test_float64_keeps_its_precision() -> None:
    p = make_lif_params()
    x = lif_inputs(3, 50, seed=4).double()
    v0 = torch.zeros(50, dtype=torch.float64)
    s, v = cpu_kernels.lif_cpu(x, v0, p)
    s_ref, v_ref = lif_reference(x, v0, p)
    assert v.dtype == torch.float64
    assert torch.equal(s, s_ref) and torch.equal(v, v_ref)


def test_empty_tensor() -> None:
    x = torch.zeros(3, 0, requires_grad=True)
    s, v = cpu_kernels.lif_cpu(x, torch.zeros(0), make_lif_params())
    s.sum().backward()
    assert s.shape == (3, 0) and v.shape == (0,) and x.grad.shape == (3, 0)


def test_auto_picks_cpu_for_cpu_tensors() -> None:
    assert resolve_backend("auto", torch.zeros(2, 3)).name == "cpu"


def test_module_uses_the_cpu_backend() -> None:
    x = lif_inputs(4, 64, seed=9).reshape(4, 8, 8).requires_grad_()
    layer_cpu, layer_ref = LIF(backend="cpu"), LIF(backend="torch")
    s_cpu, s_ref = layer_cpu(x), layer_ref(x)
    assert torch.equal(s_cpu, s_ref)
    (g_cpu,) = torch.autograd.grad(s_cpu.sum(), x)
    (g_ref,) = torch.autograd.grad(s_ref.sum(), x)
    torch.testing.assert_close(g_cpu, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cupy_without_a_gpu_raises_at_once_with_the_reason() -> None:
    from mixersnn.kernels.cupy_backend import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    assert reason is not None and ("CUDA" in reason or "CuPy" in reason)
    with pytest.raises(RuntimeError, match="backend='cupy' cannot run here") as info:
        LIF(backend="cupy")
    assert reason in str(info.value)
    with pytest.raises(RuntimeError, match="backend='cupy' cannot run here"):
        lif_multistep(torch.zeros(2, 3), backend="cupy")


def _load_in_subprocess(cache: Path) -> str:
    """Load the library in a fresh process (dlopen caches by path within one process)."""
    code = textwrap.dedent(
        """
        import torch
        from mixersnn.kernels.cpu import load_library
        from mixersnn.kernels import lif_cpu
        from mixersnn.neurons import make_lif_params
        lib = load_library()
        s, v = lif_cpu(torch.full((2, 3), 2.0), torch.zeros(3), make_lif_params())
        assert s.tolist() == [[1.0] * 3, [1.0] * 3], s
        print("compiled" if lib.compiled else "reused", lib.path)
        """
    )
    env = dict(os.environ, MIXERSNN_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_library_cache_is_reused_and_a_corrupt_file_is_rebuilt(tmp_path: Path) -> None:
    # Seed the test cache with this process's library (the file name is the hash of source,
    # flags, compiler and CPU, not of the directory), so only the rebuild below compiles.
    loaded = cpu_kernels.load_library()
    so = tmp_path / "kernels" / loaded.path.name
    so.parent.mkdir(parents=True)
    so.write_bytes(loaded.path.read_bytes())
    assert _load_in_subprocess(tmp_path) == f"reused {so}"

    so.write_bytes(b"\x7fELF not really a shared library")
    assert _load_in_subprocess(tmp_path) == f"compiled {so}"
    assert so.stat().st_size > 10_000
    assert [f.name for f in so.parent.iterdir()] == [so.name]  # no temp files left behind

    assert _load_in_subprocess(tmp_path) == f"reused {so}"


def test_without_a_compiler_import_works_and_the_reason_is_reported(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import torch
        import mixersnn.kernels  # must not raise
        from mixersnn.neurons import available_backends, lif_multistep
        from mixersnn.neurons.backends import resolve_backend
        reason = available_backends("cpu")["cpu"]
        assert reason is not None and "no C++ compiler" in reason, reason
        assert resolve_backend("auto", torch.zeros(2)).name == "torch"
        try:
            lif_multistep(torch.zeros(2, 3), backend="cpu")
        except RuntimeError as err:
            assert "no C++ compiler" in str(err), err
        else:
            raise AssertionError("backend='cpu' ran without a compiler")
        print("ok")
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), MIXERSNN_CACHE=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
