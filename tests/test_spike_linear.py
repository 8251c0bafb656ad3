"""Event-driven synapses (``spike_mm.cpp`` through ``spike_linear``) against ``F.linear``.

Values and all three gradients must equal the dense layer's to fp32 summation-order tolerance,
for spikes and for any other sparse input; where the sparse kernels do not apply the result
must be ``F.linear``'s, bit for bit. The models use them for their channel MLPs and fusing
convs on the CPU, except with the plain-torch reference backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixersnn.kernels import cpu as cpu_kernels
from mixersnn.kernels import spike_linear as spike_linear_module
from mixersnn.kernels.spike_linear import (
    FORWARD_MIN_ROWS,
    MAX_DENSITY,
    MIN_MACS,
    SpikeLinear,
    set_event_driven,
    spike_linear,
)
from mixersnn.layers import PointwiseConv2d
from mixersnn.models import create_model

pytestmark = pytest.mark.skipif(
    cpu_kernels.cpu_unavailable_reason() is not None,
    reason=f"cpu kernels unavailable: {cpu_kernels.cpu_unavailable_reason()}",
)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small layers normally take the dense GEMM (``MIN_MACS``); here every size runs the
    kernels, so the odd shapes below test them (one test puts the floor back)."""
    monkeypatch.setattr(spike_linear_module, "MIN_MACS", 0)


def _grad_fn_names(t: torch.Tensor, depth: int = 3) -> set[str]:
    names, frontier = set(), [t.grad_fn]
    for _ in range(depth):
        nxt = []
        for fn in frontier:
            if fn is not None:
                names.add(type(fn).__name__)
                nxt.extend(f for f, _ in fn.next_functions)
        frontier = nxt
    return names


def _both(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, grad: bool = True):
    """(sparse, dense) results: output, then grads of x, w, b (None where not asked)."""
    out = []
    for fn in (spike_linear, F.linear):
        xs, ws = x.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
        bs = None if b is None else b.clone().requires_grad_(grad)
        y = fn(xs, ws, bs)
        if grad:
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            y.backward(g)
        out.append((y, xs.grad, ws.grad, None if bs is None else bs.grad))
    return out


@pytest.mark.parametrize(
    "lead, K, N",
    [((1,), 1, 1), ((7,), 5, 3), ((33,), 17, 70), ((4, 8, 16), 78, 234), ((128,), 312, 936), ((2, 16), 936, 65),
     ((3,), 40, 128)],
)  # fmt: skip
@pytest.mark.parametrize("bias", [True, False])
def test_spikes_give_the_dense_layers_values_and_gradients(lead, K, N, bias) -> None:
    gen = torch.Generator().manual_seed(K * 1000 + N)
    x = (torch.rand(*lead, K, generator=gen) < 0.1).float()
    w, b = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen) if bias else None
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _both(x, w, b)
    assert y.shape == y_ref.shape == (*lead, N)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    torch.testing.assert_close(gw, gw_ref, **TOL)
    if bias:
        torch.testing.assert_close(gb, gb_ref, **TOL)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_any_thread_count_gives_the_same_gradients(threads: int) -> None:
    """Few column blocks and many threads: the weight gradient splits the rows into ranges
    (one partial sum each, added in order); 8 threads on 2 blocks of 2048 rows use 4 ranges."""
    gen = torch.Generator().manual_seed(threads)
    x = (torch.rand(2048, 90, generator=gen) < 0.1).float()
    w, b = torch.randn(78, 90, generator=gen), torch.randn(78, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _both(x, w, b)
    finally:
        torch.set_num_threads(before)
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got, want, **TOL)
    ranges = (threads + 1) // 2  # one slab per (block, range), or one per thread when a range each
    slabs = threads if ranges == 1 else 2 * ranges
    assert spike_linear_module._lib().spk_wgrad_scratch(2048, 90, 78, threads) == slabs * 90 * 64


@pytest.mark.parametrize("rows", [FORWARD_MIN_ROWS - 1, FORWARD_MIN_ROWS])
def test_both_forward_products_give_the_dense_layers_result(rows: int) -> None:
    """Under FORWARD_MIN_ROWS rows the forward is the BLAS's and the weight gradient still the
    kernel's; from it on both are the kernels'."""
    gen = torch.Generator().manual_seed(rows)
    x = (torch.rand(rows, 150, generator=gen) < 0.1).float()
    w, b = torch.randn(130, 150, generator=gen), torch.randn(130, generator=gen)
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _both(x, w, b)
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got, want, **TOL)


def test_the_sparse_kernels_are_what_runs_on_sparse_cpu_input() -> None:
    x = (torch.rand(64, 100) < 0.1).float()
    y = spike_linear(x, torch.randn(30, 100, requires_grad=True))
    assert "_SpikeLinearFnBackward" in _grad_fn_names(y)


def test_any_sparse_values_not_only_spikes() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(50, 90, generator=gen) < 0.15
    x = torch.randn(50, 90, generator=gen) * mask  # graded values, and some exact zeros
    w, b = torch.randn(70, 90, generator=gen), torch.randn(70, generator=gen)
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _both(x, w, b)
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got, want, **TOL)


def test_all_zero_input_gives_the_bias_and_no_weight_gradient() -> None:
    w = torch.randn(20, 33, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    y = spike_linear(torch.zeros(9, 33), w, b)
    assert torch.equal(y, b.detach().expand(9, 20))
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.full((20,), 9.0))


def test_nan_and_inf_inputs_propagate_like_the_dense_layer() -> None:
    x = torch.zeros(4, 20)
    x[1, 3], x[2, 7], x[3, 0] = float("nan"), float("inf"), 1.0
    w = torch.randn(5, 20)
    y, y_ref = spike_linear(x, w), F.linear(x, w)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))
    finite = torch.isfinite(y_ref)
    torch.testing.assert_close(y[finite], y_ref[finite], **TOL)


@pytest.mark.parametrize(
    "case",
    ["dense", "float64", "non-contiguous", "autocast", "no-grad-weight"],
)
def test_where_the_kernels_do_not_apply_it_is_f_linear(case: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(40, 24, generator=gen) < 0.1).float()
    w, b = torch.randn(16, 24, generator=gen), torch.randn(16, generator=gen)
    if case == "dense":
        x = (torch.rand(40, 24, generator=gen) < MAX_DENSITY + 0.2).float()
    elif case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    elif case == "non-contiguous":
        x = (torch.rand(24, 40, generator=gen) < 0.1).float().t()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = spike_linear(x, w, b), F.linear(x, w, b)
        assert y.dtype == y_ref.dtype == torch.bfloat16
        assert torch.equal(y, y_ref)
        return
    if case == "no-grad-weight":  # frozen weights still take the sparse path, and no grad is made
        xs = x.clone().requires_grad_()
        y = spike_linear(xs, w, b)
        y.sum().backward()
        torch.testing.assert_close(xs.grad, torch.ones(40, 16) @ w, **TOL)
        return
    y = spike_linear(x.requires_grad_(), w.requires_grad_(), b)
    assert "_SpikeLinearFnBackward" not in _grad_fn_names(y)
    assert torch.equal(y, F.linear(x, w, b))


def test_layers_below_the_size_floor_take_the_dense_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spike_linear_module, "MIN_MACS", MIN_MACS)
    K, N = 128, 256
    rows = MIN_MACS // (K * N)  # exactly at the floor: event-driven; one row fewer: dense
    w = torch.randn(N, K, requires_grad=True)
    for M, event in ((rows, True), (rows - 1, False)):
        x = (torch.rand(M, K) < 0.1).float()
        y = spike_linear(x, w)
        assert ("_SpikeLinearFnBackward" in _grad_fn_names(y)) is event, M
        torch.testing.assert_close(y, F.linear(x, w), **TOL)


def test_a_shape_mismatch_raises_the_dense_layers_error() -> None:
    with pytest.raises(RuntimeError, match="shape"):
        spike_linear(torch.zeros(3, 5), torch.zeros(4, 6))


def test_the_modules_switch_between_event_driven_and_dense() -> None:
    torch.manual_seed(0)
    lin = SpikeLinear(48, 20)
    conv = PointwiseConv2d(48, 20, bias=False)
    spikes = (torch.rand(6, 48, 3, 3) < 0.1).float().contiguous(memory_format=torch.channels_last)
    tokens = spikes.permute(0, 2, 3, 1)
    for on in (True, False):
        assert set_event_driven(torch.nn.Sequential(lin, conv), on) == 2
        y_lin, y_conv = lin(tokens), conv(spikes)
        assert ("_SpikeLinearFnBackward" in _grad_fn_names(y_lin, 2)) is on
        assert ("_SpikeLinearFnBackward" in _grad_fn_names(y_conv, 4)) is on
        torch.testing.assert_close(y_lin, F.linear(tokens, lin.weight, lin.bias), **TOL)
        torch.testing.assert_close(y_conv, F.conv2d(spikes, conv.weight), **TOL)


def test_models_are_event_driven_except_with_the_reference_backend() -> None:
    over = dict(img_size=32, num_classes=10, T=2, embed_dim=6, depths=(1, 1, 1, 1))
    fast = create_model("mlp_spe_t", backend="auto", **over)
    ref = create_model("mlp_spe_t", backend="torch", **over)

    def flags(m):  # type: ignore[no-untyped-def]
        return {type(mod).__name__: mod.event_driven for mod in m.modules() if hasattr(type(mod), "event_driven")}

    assert flags(fast) == {"SpikeLinear": True, "PointwiseConv2d": True}
    assert flags(ref) == {"SpikeLinear": False, "PointwiseConv2d": False}
    assert [n for n, _ in fast.state_dict().items()] == [n for n, _ in ref.state_dict().items()]


def test_a_models_training_step_matches_its_dense_twin() -> None:
    """Same weights and batch, event-driven vs dense synapses: the loss and every gradient agree
    to fp32 tolerance. (Another summation order could flip a spike sitting at the threshold; on
    this seed none does.)"""
    over = dict(img_size=32, num_classes=10, T=2, embed_dim=12, depths=(1, 1, 1, 1))
    torch.manual_seed(0)
    model = create_model("mlp_spe_t", backend="cpu", **over).train()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    results = []
    for on in (True, False):
        set_event_driven(model, on)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images).mean(0), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)


def test_under_torch_compile_the_kernels_are_custom_ops_without_a_graph_break() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = SpikeLinear(40, 24)
    x = (torch.rand(16, 40) < 0.1).float()
    gm_ops: list[str] = []
    backend = torch._dynamo.lookup_backend("aot_eager")

    def record(gm, example_inputs):  # type: ignore[no-untyped-def]
        gm_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return backend(gm, example_inputs)

    compiled = torch.compile(lin, backend=record, fullgraph=True, dynamic=False)  # raises on a break
    y = compiled(x)
    y.sum().backward()
    assert any("mixersnn.spike_linear" in op for op in gm_ops), gm_ops
    grads = (lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad()
    y_eager = lin(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)  # the same kernels, the same sums
    torch.testing.assert_close(grads, (lin.weight.grad, lin.bias.grad), rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.1, 0.6])
def test_the_custom_ops_pass_torch_library_opcheck(density: float) -> None:
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(70, 30, generator=gen) < density).float()
    w = torch.randn(20, 30, generator=gen, requires_grad=True)
    b = torch.randn(20, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.mixersnn.spike_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.mixersnn.spike_linear.default, (x, w, None))
    torch.library.opcheck(torch.ops.mixersnn.spike_linear_weight_grad.default, (x, torch.randn(70, 20, generator=gen)))


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The synapse kernels built without AVX-512 (as for an AVX2-only CPU, such as many cloud
    EPYCs): the scalar count/fill paths and the split vectors. The backend's flags otherwise."""
    import ctypes
    import os
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX-512 and portable builds differ only on x86-64")
    _, cmd, _ = cpu_kernels._build_recipe(os.environ.get("CXX"))
    dest = tmp_path_factory.mktemp("portable") / "spike_mm_portable.so"
    cpu_kernels._compile(cpu_kernels.SPIKE_MM_SOURCE.read_text(), [*cmd, "-mno-avx512f"], dest)
    lib = ctypes.CDLL(str(dest))
    cpu_kernels._declare_spike_mm(lib)
    return lib


@pytest.mark.parametrize("lead, K, N", [((7,), 5, 3), ((100,), 37, 70), ((4, 8, 16), 78, 234), ((40,), 300, 129)])
def test_the_build_without_avx512_gives_the_same_results(portable_library, monkeypatch, lead, K, N) -> None:
    monkeypatch.setattr(spike_linear_module, "_LIB", [portable_library])
    gen = torch.Generator().manual_seed(K + N)
    x = (torch.rand(*lead, K, generator=gen) < 0.1).float()
    x[(0,) * len(lead)][K // 2] = float("nan")  # the scalar count must see a NaN as a nonzero
    w, b = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = _both(x, w, b)
    assert "_SpikeLinearFnBackward" in _grad_fn_names(spike_linear(x, w.requires_grad_()))
    for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got, want, equal_nan=True, **TOL)
