"""Contract tests of every registered Mixer-SNN variant (design doc sections 1, 3-6).

Parametrized over ``list_models()`` (house style habit 9), so a new variant is tested by
registering it. Expected parameter counts are recomputed here from the design doc's closed form
in the doc's own symbols, independently of ``MixerSNNConfig.closed_form_num_params``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mixersnn.models import MixerSNN, create_model, list_models, model_config
from mixersnn.neurons import LIF

MODELS = list_models()

# Paper figures, design doc section 1: (uses SPE, stage-1 width C, params in millions).
PAPER = {
    "mlp_s": (False, 96, 34),
    "mlp_spe_t": (True, 78, 25),
    "mlp_spe_s": (True, 96, 38),
    "mlp_spe_b": (True, 108, 66),
}

# Tiny, fast configurations: T=2, one block per stage, narrow (multiple of 3 for SPE).
SMALL = {
    "rgb32": dict(img_size=32, in_chans=3, num_classes=10),
    "gray28": dict(img_size=28, in_chans=1, num_classes=10),
}
TINY = dict(embed_dim=12, depths=(1, 1, 1, 1), T=2, backend="torch")


def tiny_model(name: str, small: str = "rgb32", **over) -> MixerSNN:
    return create_model(name, **{**SMALL[small], **TINY, **over})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def doc_closed_form(*, C: int, depths, spe: bool, img: int = 224, K: int = 1000, alpha: int = 3) -> int:
    """Design doc section 5, written again with the doc's symbols (3 channels, patch 4).

    Per stage s: width C_s = C * 2^s, grid H_s (H_1 = img/4, then halved), N = H_s^2.
    """
    total = 48 * C + 2 * C  # stage-1 embed
    H = img // 4
    for s, depth in enumerate(depths):
        Cs = C * 2**s
        if s > 0:
            H = math.ceil(H / 2)
            if spe:
                n = Cs // 3
                total += 27 * (Cs // 2) * n + 18 * n**2 + 10 * n
            else:
                total += 2 * Cs**2 + 2 * Cs
        N = H * H
        token = 2 * H**2 + 6 * H + 3 * Cs**2 + 2 * Cs + (0 if spe else 2 * Cs)
        channel = 2 * alpha * Cs**2 + (alpha + 1) * Cs + 4 * N
        total += depth * (token + channel)
    C4 = C * 2 ** (len(depths) - 1)
    total += 2 * C4  # final BN
    total += C4 * K + K  # head
    return total


def test_registry_holds_the_paper_variants():
    assert set(PAPER) <= set(MODELS)
    assert MODELS == sorted(MODELS)


@pytest.fixture(scope="module")
def full_models():
    """Each variant at its paper size (224 px, 1000 classes), built once for this module."""
    cache: dict[str, MixerSNN] = {}

    def get(name: str) -> MixerSNN:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = create_model(name, backend="torch")
        return cache[name]

    yield get
    cache.clear()


# --------------------------------------------------------------------------------------------
# Parameter counts and structure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_param_count_equals_closed_form(name, full_models):
    cfg = model_config(name)
    assert (cfg.img_size, cfg.in_chans, cfg.num_classes, cfg.patch_size) == (224, 3, 1000, 4)
    count = n_params(full_models(name))
    assert count == cfg.closed_form_num_params()
    assert count == doc_closed_form(C=cfg.embed_dim, depths=cfg.depths, spe=cfg.spe)


@pytest.mark.parametrize("name", list(PAPER))
def test_param_count_rounds_to_paper(name, full_models):
    spe, C, paper_m = PAPER[name]
    cfg = model_config(name)
    assert (cfg.spe, cfg.embed_dim) == (spe, C)
    # The paper quotes whole millions: 25.23 -> 25, 37.98 -> 38, 65.61 -> 66, but MLP-S's
    # 34,507,408 (the design doc's closed form, identity BN included) is quoted as 34, i.e.
    # truncated. So the check is "within the paper's rounding", not one rounding rule.
    assert abs(n_params(full_models(name)) / 1e6 - paper_m) < 0.51


def test_mlp_spe_b_alternative_config_is_65m():
    # The docstring's other candidate, C=126 with [2, 8, 14, 2]: 65.0M (design doc section 1).
    cfg = model_config("mlp_spe_b", embed_dim=126, depths=(2, 8, 14, 2))
    assert cfg.closed_form_num_params() == doc_closed_form(C=126, depths=(2, 8, 14, 2), spe=True)
    assert round(cfg.closed_form_num_params() / 1e5) == 650


def expected_lif_count(spe: bool, depths) -> int:
    # Per block: token (x_h, x_w) + channel MLP (1) + the block's two = 5, plus MLP-S's identity
    # LIF = 6. Per stage: the stage LIF. Per SPE (stages 2..S): two.
    per_block = 5 if spe else 6
    S = len(depths)
    return per_block * sum(depths) + S + (2 * (S - 1) if spe else 0)


@pytest.mark.parametrize("name", MODELS)
def test_lif_module_count(name, full_models):
    cfg = model_config(name)
    m = full_models(name)
    lifs = [mod for mod in m.modules() if isinstance(mod, LIF)]
    assert len(lifs) == expected_lif_count(cfg.spe, cfg.depths)
    if name == "mlp_spe_t":
        assert len(lifs) == 140
    # Every LIF is the paper neuron (design doc section 2).
    for lif in lifs:
        p = lif.params
        assert (p.tau, p.v_threshold, p.v_reset, p.decay_input, p.detach_reset) == (2.0, 1.0, 0.0, True, True)
        assert (p.surrogate, p.alpha) == ("sigmoid", 4.0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("small", sorted(SMALL))
def test_small_config_param_count_matches_closed_form(name, small):
    # Generalised closed form (any in_chans, odd grids with padded downsampling).
    m = tiny_model(name, small)
    assert n_params(m) == m.config.closed_form_num_params()


# Independent stage widths (``stage_dims``): SPE stages after the first take multiples of 3.
STAGE_DIMS = {True: (12, 30, 42, 96), False: (8, 20, 20, 40)}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("small", sorted(SMALL))
def test_stage_dims_model_builds_runs_matches_closed_form_and_is_mfi(name, small):
    dims = STAGE_DIMS[model_config(name).spe]
    m = tiny_model(name, small, stage_dims=dims).train()
    cfg = m.config
    assert cfg.widths == dims and cfg.embed_dim == dims[0]
    assert n_params(m) == cfg.closed_form_num_params()
    for s in range(1, cfg.num_stages):  # each stage downsamples from the previous stage's width
        conv = m.stages[s].embed.down.conv if cfg.spe else m.stages[s].embed.conv
        assert (conv.in_channels, conv.out_channels) == (dims[s - 1], dims[s])
    spec = SMALL[small]
    img = torch.randn(2, spec["in_chans"], spec["img_size"], spec["img_size"])
    logits = m(img)
    assert logits.shape == (2, 2, spec["num_classes"]) and torch.isfinite(logits).all()
    logits.mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    check_mfi(m, img)


# --------------------------------------------------------------------------------------------
# Forward / backward contract on small configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("small", sorted(SMALL))
def test_forward_shape_finite_and_every_param_gets_gradient(name, small):
    m = tiny_model(name, small).train()
    spec = SMALL[small]
    B = 4
    img = torch.randn(B, spec["in_chans"], spec["img_size"], spec["img_size"])
    logits = m(img)
    assert logits.shape == (2, B, spec["num_classes"])
    assert torch.isfinite(logits).all()
    loss = nn.functional.cross_entropy(logits.mean(0), torch.arange(B) % spec["num_classes"])
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    zero = [n for n, p in m.named_parameters() if not (p.grad.abs().sum() > 0)]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    bad = [n for n, p in m.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("T", [1, 3])
def test_T_override_changes_output_steps(name, T):
    m = tiny_model(name, T=T)
    assert m.T == T
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (T, 2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_backend_override_reaches_every_neuron(name):
    m = tiny_model(name, backend="torch")
    assert {mod.backend for mod in m.modules() if isinstance(mod, LIF)} == {"torch"}


@pytest.mark.parametrize("name", MODELS)
def test_train_and_eval_modes_keep_shapes(name):
    m = tiny_model(name)
    for B in (1, 3):
        img = torch.randn(B, 3, 32, 32)
        m.train()
        out_train = m(img)
        m.eval()
        with torch.no_grad():
            out_eval = m(img)
        assert out_train.shape == out_eval.shape == (2, B, 10)
        assert torch.isfinite(out_train).all() and torch.isfinite(out_eval).all()


# --------------------------------------------------------------------------------------------
# No state survives a forward
# --------------------------------------------------------------------------------------------


def calibrate_bn(m: MixerSNN, img: torch.Tensor) -> None:
    """Set every BN's running statistics to those of one batch (as after training) and switch
    to eval mode. With the default init statistics (mean 0, var 1) the tiny models barely fire
    in eval mode, and their output would not depend on the input at all."""
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average: after one batch, exactly its statistics
    m.train()
    with torch.no_grad():
        m(img)
    m.eval()


@pytest.mark.parametrize("name", MODELS)
def test_no_state_between_calls(name):
    m = tiny_model(name)
    calibrate_bn(m, torch.randn(4, 3, 32, 32))
    fresh = copy.deepcopy(m)
    a, b = torch.randn(2, 3, 32, 32) * 2, torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        b1 = m(b)
        b2 = m(b)
        m(a)
        b_after_a = m(b)
        b_fresh = fresh(b)
    assert torch.equal(b1, b2)
    assert torch.equal(b_after_a, b_fresh)
    with torch.no_grad():
        assert not torch.equal(m(a), b_fresh)  # the check is not vacuous: inputs matter


@pytest.mark.parametrize("name", MODELS)
def test_no_state_between_calls_train_mode(name):
    # In train mode BN uses batch statistics, so the output for B still cannot depend on A.
    m = tiny_model(name).train()
    fresh = copy.deepcopy(m)
    a, b = torch.randn(2, 3, 32, 32) * 2, torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_a = m(a)
        out = m(b)
        ref = fresh(b)
    assert torch.equal(out, ref)
    assert not torch.equal(out_a, out)  # not vacuous: inputs matter


# --------------------------------------------------------------------------------------------
# Multiplication-free inference: every Conv/Linear but the first conv and the classifier sees
# only {0, 1} inputs (design doc section 6)
# --------------------------------------------------------------------------------------------

REAL_INPUT_LAYERS = {"stages.0.embed.conv", "head.fc"}


def check_mfi(m: MixerSNN, img: torch.Tensor) -> torch.Tensor:
    """Run one forward with hooks on every Conv2d/Linear; assert the MFI property; return the
    logits."""
    seen: dict[str, tuple[bool, float]] = {}
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):

            def hook(mod, inputs, output, name=name):
                x = inputs[0]
                binary = bool(((x == 0) | (x == 1)).all())
                seen[name] = (binary, float(x.float().mean()))

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = m(img)
    finally:
        for h in hooks:
            h.remove()
    layers = {n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert set(seen) == layers, f"layers never called: {sorted(layers - set(seen))}"
    assert REAL_INPUT_LAYERS <= layers
    non_binary = sorted(n for n, (binary, _) in seen.items() if not binary and n not in REAL_INPUT_LAYERS)
    assert not non_binary, f"layers with non-binary input (breaks MFI): {non_binary}"
    # The two exceptions really do see real values (pixels, BN-normalised spike means).
    for n in REAL_INPUT_LAYERS:
        assert not seen[n][0], f"{n} was expected to receive real values"
    # Not vacuous: spikes do occur.
    assert sum(rate for n, (_, rate) in seen.items() if n not in REAL_INPUT_LAYERS) > 0
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("small", sorted(SMALL))
def test_mfi_small(name, small):
    spec = SMALL[small]
    m = tiny_model(name, small).train()
    check_mfi(m, torch.randn(2, spec["in_chans"], spec["img_size"], spec["img_size"]))


@pytest.mark.parametrize("name", MODELS)
def test_mfi_and_forward_at_real_width_32px(name):
    # Each variant at its real width and depth (only img_size/num_classes changed), one forward.
    # Batch 1 keeps it cheap; train-mode BN still has T*B*H*W >= 2 values per channel.
    m = create_model(name, img_size=32, num_classes=10, T=2, backend="torch").train()
    if name in PAPER:
        assert m.config.embed_dim == PAPER[name][1]
    out = check_mfi(m, torch.randn(1, 3, 32, 32))
    assert out.shape == (2, 1, 10) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 28, 28), (2, 1, 32, 32), (3, 32, 32), (2, 3, 32, 28), (1, 2, 3, 32, 32)],
)
def test_bad_input_shape_names_expected_shape(name, shape):
    m = tiny_model(name)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]") as info:
        m(torch.randn(*shape))
    assert str(tuple(shape)) in str(info.value)


# --------------------------------------------------------------------------------------------
# Memory layout: channels-last activations and 1x1 convs as matmuls compute the NCHW model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 6, 4, 4), (3, 6, 1, 1), (3, 6, 1, 7), (3, 6, 7, 1), (3, 6, 2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_is_the_1x1_conv(bias, shape, channels_last):
    from mixersnn.layers import PointwiseConv2d

    conv = PointwiseConv2d(6, 5, bias=bias)
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (5, 6, 1, 1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    conv = conv.double()
    ref = nn.functional.conv2d(xin, conv.weight, conv.bias)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, *conv.parameters()], g)
    out = conv(xin)
    got = torch.autograd.grad(out, [x, *conv.parameters()], g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _nchw_reference_forward(m: MixerSNN, img: torch.Tensor) -> torch.Tensor:
    """The model's function written plainly in NCHW with nn.functional 1x1 convs (the layout
    the layers used before they went channels-last), reusing m's parameters and LIFs."""
    from mixersnn.layers.common import fold, unfold

    def convbn(mod, x):
        T = x.shape[0]
        return unfold(mod.bn(nn.functional.conv2d(fold(x).contiguous(), mod.conv.weight, None, mod.conv.stride,
                                                  mod.conv.padding)), T)  # fmt: skip

    def conv1(conv, x):
        return nn.functional.conv2d(x.contiguous(), conv.weight, conv.bias)

    def lif(mod, x):
        return mod(x.contiguous())

    def token(tb, x):
        T = x.shape[0]
        xf = fold(x)
        x_h = lif(tb.lif_h, unfold(tb.bn_h(conv1(tb.proj_h, xf.transpose(1, 2))), T)).transpose(2, 3)
        x_w = lif(tb.lif_w, unfold(tb.bn_w(conv1(tb.proj_w, xf.permute(0, 3, 2, 1))), T)).permute(0, 1, 4, 3, 2)
        ident = lif(tb.identity_lif, unfold(tb.identity_bn(xf.contiguous()), T)) if tb.identity_bn_on else x
        cat = torch.cat((fold(ident), fold(x_h), fold(x_w)), dim=1)
        return unfold(tb.bn(conv1(tb.fuse, cat)), T)

    def channel(cb, x):
        T, B, C, H, W = x.shape
        tok = fold(x).flatten(2).transpose(1, 2).contiguous()
        y = lif(cb.lif, unfold(cb.bn1(cb.fc1(tok)), T))
        y = cb.bn2(cb.fc2(fold(y)))
        return unfold(y.transpose(1, 2).reshape(T * B, C, H, W), T)

    T = m.config.T
    x = None
    for s, stage in enumerate(m.stages):
        if s == 0:
            y = stage.embed.bn(stage.embed.conv(img))
            h = y.unsqueeze(0).expand(T, *y.shape)
        elif m.config.spe:
            e = stage.embed
            a1, a2, a3 = convbn(e.down, x).split(e.n, dim=2)
            a2 = a2 + convbn(e.conv12, lif(e.lif1, a1))
            a3 = a3 + a1 + convbn(e.conv23, lif(e.lif2, a2))
            h = torch.cat((a1, a2, a3), dim=2)
        else:
            h = convbn(stage.embed, x)
        x = lif(stage.lif, h)
        for blk in stage.blocks:
            u = h + token(blk.token, x)
            x = lif(blk.lif_token, u)
            x = lif(blk.lif_channel, u + channel(blk.channel, x))
    hd = m.head
    return unfold(hd.fc(hd.bn(fold(x).contiguous()).mean(dim=(2, 3))), T)


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_layers_compute_the_nchw_model(name):
    # float64 and the reference neuron: the two layouts must agree to rounding, spikes exactly.
    m = tiny_model(name, embed_dim=12).double().train()
    img = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    out = m(img)
    grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    ref = _nchw_reference_forward(m, img)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for (n, _), a, b in zip(m.named_parameters(), grads, ref_grads):
        # (biases before a BatchNorm have a zero gradient: only rounding noise there)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=n)


def test_activations_stay_channels_last():
    m = tiny_model("mlp_spe_t").train()
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n, mod in m.named_modules() if isinstance(mod, LIF) and n.endswith(("lif_token", "lif_channel"))]  # fmt: skip
    try:
        m(torch.randn(2, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert seen
    for n, s in seen.items():
        assert s.permute(0, 1, 3, 4, 2).is_contiguous(), n  # memory [T, B, H, W, C]
