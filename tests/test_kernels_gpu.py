"""The "cupy" backend on a CUDA device against the torch reference in fp32.

Run with ``pytest -m gpu tests/test_kernels_gpu.py`` (benchmarks/gpu_check.sh does). Every
test skips cleanly without a CUDA device. 16-bit inputs are compared with the fp32 reference
on the upcast values: the kernels compute in fp32, so spikes match exactly and only the
16-bit rounding of stored values separates the rest.
"""

from __future__ import annotations


import pytest
import torch

from _helpers import KERNEL_TOL, lif_grads, lif_inputs, lif_option_grid
from mixersnn.neurons import LIF, lif_multistep, lif_reference, make_lif_params
from mixersnn.neurons.backends import LIFParams, available_backends, resolve_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


OPTIONS = lif_option_grid(lambda v_reset, decay, detach, surrogate: {
    "tau": 2.0 if decay else 3.7,
    "v_threshold": 1.0 if surrogate == "sigmoid" else 0.6,
    "v_reset": v_reset if v_reset is None or detach else -0.2,
})


def _check(p: LIFParams, steps: int, n: int, dtype: torch.dtype, seed: int) -> None:
    x = lif_inputs(steps, n, seed, dtype, device="cuda")
    v0 = (torch.randn(n, device="cuda") * 0.5).to(dtype)
    gs = torch.randn(steps, n, device="cuda").to(dtype)
    gv = torch.randn(n, device="cuda").to(dtype)
    ref = lif_grads(resolve_backend("torch", x).fn, x.float(), v0.float(), p, gs.float(), gv.float())
    got = lif_grads(resolve_backend("cupy", x).fn, x, v0, p, gs, gv)
    assert got[0].dtype == dtype and got[0].shape == (steps, n)
    assert torch.equal(got[0].float(), ref[0]), f"spikes differ: T={steps} N={n} {dtype}"
    tol = KERNEL_TOL[dtype]
    for name, a, b in zip(("v_final", "grad_x", "grad_v0"), ref[1:], got[1:]):
        torch.testing.assert_close(b.float(), a, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_cupy_is_available_and_auto_picks_it() -> None:
    assert available_backends("cuda")["cupy"] is None
    assert resolve_backend("auto", torch.zeros(1, device="cuda")).name == "cupy"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", OPTIONS, ids=repr)
def test_parity_all_options_odd_sizes(p: LIFParams, dtype: torch.dtype) -> None:
    for steps, n in [(1, 1), (2, 7), (5, 1031), (16, 1031), (16, 4097), (3, 65537)]:
        _check(p, steps, n, dtype, seed=steps * 1000 + n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_parity_large(steps: int, dtype: torch.dtype) -> None:
    # More elements than one grid-stride pass of a small grid, and not a multiple of a tile.
    _check(make_lif_params(), steps, (1 << 22) + 3, dtype, seed=steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lif_multistep_and_module(dtype: torch.dtype) -> None:
    x = lif_inputs(4, 2 * 3 * 8 * 8, seed=7, dtype=dtype, device="cuda").reshape(4, 2, 3, 8, 8)
    s_ref, v_ref = lif_multistep(x.float(), backend="torch")
    s, v = lif_multistep(x, backend="cupy")
    assert torch.equal(s.float(), s_ref)
    torch.testing.assert_close(v.float(), v_ref, rtol=KERNEL_TOL[dtype], atol=KERNEL_TOL[dtype])
    layer = LIF(backend="cupy")
    xx = x.detach().clone().requires_grad_()
    layer(xx).sum().backward()
    xr = x.float().detach().clone().requires_grad_()
    LIF(backend="torch")(xr).sum().backward()
    torch.testing.assert_close(xx.grad.float(), xr.grad, rtol=KERNEL_TOL[dtype], atol=KERNEL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_initial_membrane_and_no_final_one_match_an_explicit_zero(dtype: torch.dtype) -> None:
    """v0 None (a null pointer: start from rest) and v_final=False (not written), as the
    models' LIF nodes call it: bit for bit what an explicit zero v0 gives."""
    x = lif_inputs(4, (1 << 20) + 3, seed=11, dtype=dtype, device="cuda")
    gs = torch.randn_like(x)
    outs = []
    for v0, keep in ((torch.zeros_like(x[0]), True), (None, False)):
        xx = x.clone().requires_grad_()
        s, v = resolve_backend("cupy", xx).fn(xx, v0, make_lif_params(), v_final=keep)
        assert (v is None) == (not keep)
        s.backward(gs)
        outs.append((s, xx.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hard_reset_without_v0_starts_at_v_reset(dtype: torch.dtype) -> None:
    """v0 None (a null pointer) with a hard reset at v_reset = -0.3 starts at v_reset. The
    kernel starts at the fp32 v_reset, which a 16-bit v0 tensor cannot hold exactly, so the
    check is against the fp32 reference started there: spikes exactly, the rest to KERNEL_TOL;
    in fp32 also bit for bit what an explicit v0 of -0.3 gives. The module (v0 and v_final both
    null) starts there too."""
    steps, n = 4, (1 << 16) + 3
    x = lif_inputs(steps, n, seed=13, dtype=dtype, device="cuda")
    gs = torch.randn(steps, n, device="cuda").to(dtype)
    gv = torch.randn(n, device="cuda").to(dtype)
    rest = torch.full((n,), -0.3, device="cuda")
    tol = KERNEL_TOL[dtype]
    for p in (
        make_lif_params(v_reset=-0.3),
        make_lif_params(v_reset=-0.3, decay_input=False, detach_reset=True, surrogate="atan"),
    ):
        ref = lif_grads(resolve_backend("torch", x).fn, x.float(), rest, p, gs.float(), gv.float())
        got = lif_grads(resolve_backend("cupy", x).fn, x, None, p, gs, gv)
        assert got[3] is None
        assert torch.equal(got[0].float(), ref[0]), p
        for name, a, b in zip(("v_final", "grad_x"), ref[1:3], got[1:3]):
            torch.testing.assert_close(b.float(), a, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
        # Non-vacuous: the reference started at 0 fires elsewhere.
        assert not torch.equal(lif_reference(x.float(), torch.zeros_like(rest), p)[0], ref[0]), p
        if dtype == torch.float32:
            explicit = lif_grads(resolve_backend("cupy", x).fn, x, rest, p, gs, gv)
            for a, b in zip(got[:3], explicit[:3]):
                assert torch.equal(a, b), p
        layer = LIF(v_reset=p.v_reset, decay_input=p.decay_input, detach_reset=p.detach_reset,
                    surrogate=p.surrogate, backend="cupy")
        with torch.no_grad():
            assert torch.equal(layer(x).float(), ref[0]), p


def test_non_contiguous_no_grad_and_v_final_only() -> None:
    p = make_lif_params(v_reset=None, detach_reset=False)
    base = lif_inputs(6, 3 * 1000, seed=3, dtype=torch.float32, device="cuda").reshape(6, 3, 1000)
    x = base.transpose(1, 2)
    assert not x.is_contiguous()
    with torch.no_grad():
        s_ref, v_ref = lif_reference(x, torch.zeros(1000, 3, device="cuda"), p)
        s, v = resolve_backend("cupy", x).fn(x, torch.zeros(1000, 3, device="cuda"), p)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    lif_reference(xa, torch.zeros(1000, 3, device="cuda"), p)[1].sum().backward()
    resolve_backend("cupy", xb).fn(xb, torch.zeros(1000, 3, device="cuda"), p)[1].sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)


def test_runs_on_a_side_stream() -> None:
    # Launches go to torch's current stream; work queued there must be ordered correctly.
    p = make_lif_params()
    side = torch.cuda.Stream()
    x = lif_inputs(4, 1 << 20, seed=5, dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        y = x * 1.0  # produced on the side stream
        s, _ = resolve_backend("cupy", y).fn(y, torch.zeros_like(y[0]), p)
    side.synchronize()
    s_ref, _ = lif_reference(x, torch.zeros_like(x[0]), p)
    assert torch.equal(s, s_ref)
