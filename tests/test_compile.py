"""The fused LIF as a ``torch.library`` custom op, and the compiled model: same numbers as eager.

Behaviour only, never timings (benchmarks/train_step.py measures those). The fast tests trace
with the ``aot_eager`` backend (Dynamo + AOTAutograd, the op's fake and autograd rules, no
code generation); one slow test runs Inductor itself. CUDA checks are marked ``gpu`` and skip
without a device.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixersnn.kernels.custom_op import lif_backward, lif_forward, lif_op, op_supports
from mixersnn.models import create_model
from mixersnn.models.mixer_snn import CompiledModel, compile_model, compile_unavailable_reason
from mixersnn.neurons import LIF, lif_multistep, make_lif_params
from mixersnn.neurons.backends import LIFParams, available_backends

# The CPU tests need the cpu backend's library (g++); the gpu-marked ones do not.
needs_cpu_kernels = pytest.mark.skipif(
    available_backends("cpu").get("cpu") is not None, reason="the cpu LIF kernels do not build here"
)

OPTIONS = [
    make_lif_params(detach_reset=True),  # the paper's neuron
    make_lif_params(v_reset=None, surrogate="atan"),
    make_lif_params(tau=3.0, decay_input=False, detach_reset=False, v_reset=-0.2),
]
IDS = ["paper", "soft-atan", "nodecay-hard"]
TINY = dict(img_size=32, in_chans=3, num_classes=10, embed_dim=12, depths=(1, 1, 1, 1), T=2)


def _opts(p: LIFParams) -> tuple:
    return (p.tau, p.v_threshold, p.v_reset, p.decay_input, p.detach_reset, p.surrogate, p.alpha)


def _currents(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 1.5 + 0.5


@needs_cpu_kernels
@pytest.mark.parametrize("p", OPTIONS, ids=IDS)
def test_custom_ops_pass_opcheck(p: LIFParams) -> None:
    x = _currents(3, 4, 5).requires_grad_()
    torch.library.opcheck(lif_forward, (x, *_opts(p), True))
    torch.library.opcheck(lif_forward, (x.detach(), *_opts(p), False))
    u = _currents(3, 4, 5, seed=1)
    torch.library.opcheck(lif_backward, (u, torch.randn(3, 4, 5), *_opts(p)))


@needs_cpu_kernels
@pytest.mark.parametrize("p", OPTIONS, ids=IDS)
def test_custom_op_matches_the_eager_backends(p: LIFParams) -> None:
    x = _currents(4, 6, 33)
    g = torch.randn(4, 6, 33)
    grads = {}
    for name in ("torch", "cpu", "op"):
        xi = x.clone().requires_grad_()
        if name == "op":
            s = lif_op(xi, p)
        else:
            s, _ = lif_multistep(xi, backend=name, return_v_final=False, **_neuron_kwargs(p))
        (s * g).sum().backward()
        grads[name] = (s.detach(), xi.grad)
    for name in ("torch", "cpu"):
        assert torch.equal(grads["op"][0], grads[name][0])
        torch.testing.assert_close(grads["op"][1], grads[name][1], rtol=1e-5, atol=1e-5)
    assert 0 < grads["op"][0].mean() < 1  # not vacuous: some fire, some do not


def _neuron_kwargs(p: LIFParams) -> dict:
    return dict(tau=p.tau, v_threshold=p.v_threshold, v_reset=p.v_reset, decay_input=p.decay_input,
                detach_reset=p.detach_reset, surrogate=p.surrogate, alpha=p.alpha)  # fmt: skip


@needs_cpu_kernels
def test_without_grad_nothing_is_saved() -> None:
    p = OPTIONS[0]
    x = _currents(2, 10)
    spikes, u = lif_forward(x, *_opts(p), False)
    assert u.numel() == 0 and spikes.shape == x.shape
    with torch.no_grad():
        assert torch.equal(lif_op(x.clone().requires_grad_(), p), spikes)


def test_op_supports_only_what_the_kernels_take() -> None:
    assert op_supports(torch.zeros(2, dtype=torch.float32))
    assert not op_supports(torch.zeros(2, dtype=torch.float64))
    assert not op_supports(torch.zeros(2, dtype=torch.bfloat16))  # CPU kernels are fp32
    with pytest.raises(RuntimeError, match="float32"):
        lif_forward(torch.zeros(2, 3, dtype=torch.float64), *_opts(OPTIONS[0]), False)


class _BNLIF(nn.Module):
    """BN -> LIF -> residual add on [T, B, C, H, W] channels-last activations."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.lif = LIF(detach_reset=True, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        y = self.bn(x.flatten(0, 1)).unflatten(0, (T, -1))
        return self.lif(y) + y


@needs_cpu_kernels
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_the_neuron_compiles_without_a_graph_break(backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _BNLIF(backend)
    x = torch.randn(2, 3, 8, 4, 4).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # raises on a graph break
    out_c = compiled(x)
    (gx_c,) = torch.autograd.grad(out_c.square().sum(), x)
    out_e = m(x)
    (gx_e,) = torch.autograd.grad(out_e.square().sum(), x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model: nn.Module, params: nn.Module, img: torch.Tensor, labels: torch.Tensor):
    params.zero_grad(set_to_none=True)
    logits = model(img)
    F.cross_entropy(logits.mean(0), labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in params.named_parameters()}


def _compare(model_c: nn.Module, model_e: nn.Module, *, rtol: float, atol: float) -> None:
    g = torch.Generator().manual_seed(1)
    img, labels = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    out_c, grads_c = _loss_and_grads(model_c, model_e, img, labels)
    out_e, grads_e = _loss_and_grads(model_e, model_e, img, labels)
    torch.testing.assert_close(out_c, out_e, rtol=rtol, atol=atol)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", ["mlp_spe_t", "mlp_s"])
def test_traced_model_matches_eager_in_one_graph(name: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = create_model(name, **TINY).train()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    _compare(compiled, m, rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
@pytest.mark.slow
def test_inductor_compiled_model_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = create_model("mlp_spe_t", **TINY).train()
    compiled = compile_model(m, device_type="cpu")
    assert isinstance(compiled, CompiledModel)
    # Inductor reorders the BatchNorm reductions: a membrane within rounding of the threshold
    # could flip; on this seed none does, so the outputs agree to float tolerance.
    _compare(compiled, m, rtol=1e-4, atol=1e-4)
    assert compiled.fell_back is None


def test_compile_model_validates_the_mode_and_scope() -> None:
    m = create_model("mlp_spe_t", **TINY)
    with pytest.raises(ValueError, match="reduce-overhead"):
        compile_model(m, mode="fastest")
    with pytest.raises(ValueError, match="'blocks'"):
        compile_model(m, scope="stages")


@needs_cpu_kernels
def test_block_scope_compiles_in_place_and_undoes_on_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from mixersnn.models import MixerBlock

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = create_model("mlp_spe_t", **TINY).train()
    blocks = [b for b in m.modules() if isinstance(b, MixerBlock)]
    # Trace with aot_eager (no code generation): the scope's wiring, not Inductor.
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(
        self, "_compiled_call_impl", torch.compile(self._call_impl, backend="aot_eager", dynamic=False)))
    wrapped = compile_model(m, device_type="cpu", scope="blocks", required=False)
    assert isinstance(wrapped, CompiledModel) and wrapped.eager is m
    assert all(b._compiled_call_impl is not None for b in blocks)
    ref = create_model("mlp_spe_t", **TINY).train()
    ref.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(1)
    img, labels = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    out_c, grads_c = _loss_and_grads(wrapped, m, img, labels)
    out_e, grads_e = _loss_and_grads(ref, ref, img, labels)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-5, msg=name)
    wrapped._undo()
    assert all(b._compiled_call_impl is None for b in blocks)


def test_compile_without_a_cxx_compiler_raises_or_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import mixersnn.models.mixer_snn as mod

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(mod.shutil, "which", lambda name: None)
    assert "g++" in (compile_unavailable_reason("cpu") or "")
    m = create_model("mlp_spe_t", **TINY)
    with pytest.raises(RuntimeError, match="apt-get install g\\+\\+"):
        compile_model(m, device_type="cpu")
    with pytest.warns(RuntimeWarning, match="running eager"):
        assert compile_model(m, device_type="cpu", required=False) is m


def test_a_failing_first_compiled_call_falls_back_or_raises() -> None:
    m = create_model("mlp_spe_t", **TINY).eval()

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    img = torch.randn(2, 3, 32, 32)
    lenient = CompiledModel(m, broken, required=False)  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match="inductor exploded"):
        out = lenient(img)
    torch.testing.assert_close(out, m(img))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        lenient(img)
    strict = CompiledModel(m, broken, required=True)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="compile: false"):
        strict(img)


def test_cuda_reason_is_given_without_cuda() -> None:
    # Says why (no Triton, or fine); never raises. The CUDA path itself is tested under -m gpu.
    reason = compile_unavailable_reason("cuda")
    assert reason is None or isinstance(reason, str)
    assert "supports cpu and cuda" in (compile_unavailable_reason("mps") or "")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_op_on_cuda_matches_the_cupy_backend(dtype: torch.dtype) -> None:
    if available_backends("cuda").get("cupy") is not None:
        pytest.skip(available_backends("cuda")["cupy"])
    p = OPTIONS[0]
    x = _currents(4, 6, 1000).cuda().to(dtype)
    g = torch.randn(4, 6, 1000, device="cuda", dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sa = lif_op(xa, p)
    sb, _ = lif_multistep(xb, backend="cupy", return_v_final=False, **_neuron_kwargs(p))
    (sa * g).sum().backward()
    (sb * g).sum().backward()
    assert torch.equal(sa, sb)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    torch.library.opcheck(lif_forward, (x.detach().requires_grad_(), *_opts(p), True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_traced_model_on_cuda_under_bf16_autocast_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = create_model("mlp_spe_t", **TINY).cuda().train()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    img = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_c, out_e = compiled(img).float(), m(img).float()
    torch.testing.assert_close(out_c, out_e, rtol=2e-2, atol=2e-2)


def test_train_config_takes_compile_modes_and_names_bad_ones() -> None:
    from mixersnn.models import ConfigError
    from trainers.config import TrainConfig

    assert TrainConfig().compile is False  # eager by default: on CPUs compiling rarely pays
    for ok in (True, False, "default", "reduce-overhead"):
        TrainConfig(compile=ok)
    with pytest.raises(ConfigError, match="reduce-overhead"):
        TrainConfig(compile="fastest")


def test_the_training_optimiser_is_the_fused_one() -> None:
    from trainers.config import TrainConfig
    from trainers.loop import build_optimizer

    m = create_model("mlp_spe_t", **TINY)
    for name in ("adamw", "sgd"):
        opt = build_optimizer(m, TrainConfig(optimizer=name, lr=0.01))
        assert opt.defaults.get("fused") or opt.defaults.get("foreach"), opt.defaults


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_fused_optimiser_updates_like_the_default_one(name: str) -> None:
    from trainers.config import TrainConfig
    from trainers.loop import build_optimizer

    cfg = TrainConfig(optimizer=name, lr=0.01, weight_decay=0.05)
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        m = create_model("mlp_spe_t", **TINY).train()
        opt = build_optimizer(m, cfg)
        if not fused:  # the same groups and options, torch's per-parameter loop
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            options = {k: v for k, v in opt.defaults.items() if k not in ("fused", "foreach", "decoupled_weight_decay")}
            opt = type(opt)(groups, **options)
            assert not opt.param_groups[0]["fused"] and not opt.param_groups[0]["foreach"]
        g = torch.Generator().manual_seed(1)
        img, labels = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(img).mean(0), labels).backward()
            opt.step()
        models.append(m)
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if n.endswith(("proj_h.bias", "proj_w.bias")) or (n.endswith(("proj_h.weight", "proj_w.weight")) and a.numel() == 1):
            # A bias right before a BatchNorm over the same channels has gradient 0, and so has
            # a 1x1 grid's scalar mixing weight (BatchNorm undoes its scale); what arrives is
            # rounding noise, which Adam scales up to full-size steps.
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
