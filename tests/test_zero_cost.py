"""SNASNet's sparsity-aware Hamming-kernel zero-cost score (mixersnn.accounting.zero_cost)."""

from __future__ import annotations

import math

import pytest
import torch

from mixersnn.accounting.zero_cost import (
    SPARSITY_EPS,
    hamming_kernel,
    hamming_score,
    rank_correlation,
    score_config,
)
from mixersnn.models import MixerSNN, model_config
from mixersnn.neurons import LIF

TINY = dict(img_size=16, in_chans=1, num_classes=5, embed_dim=6, depths=(1, 1), T=2)


@pytest.fixture
def cfg():
    return model_config("mlp_spe_t", **TINY)


@pytest.fixture
def images():
    return torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return MixerSNN(cfg)


def _reference_kernel(model, images, *, per_step=True, layers=None):
    """The kernel from hooked spikes with explicit per-pair Hamming distances, in Python."""
    outs = {}
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o.detach().clone()))
        for n, m in model.named_modules()
        if isinstance(m, LIF) and (layers is None or n in layers)
    ]
    model.train()
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    B = images.shape[0]
    codes = []  # list of [B] lists of bool tensors
    for out in outs.values():
        T = out.shape[0]
        if per_step:
            codes += [[out[t, i].flatten() > 0 for i in range(B)] for t in range(T)]
        else:
            codes.append([out[:, i].flatten() > 0 for i in range(B)])
    K = torch.zeros(B, B, dtype=torch.float64)
    for c in codes:
        N = c[0].numel()
        rate = [float(ci.sum()) / N for ci in c]
        for i in range(B):
            for j in range(B):
                d = int((c[i] != c[j]).sum())  # explicit Hamming distance
                e = rate[i] * (1 - rate[j]) + (1 - rate[i]) * rate[j]
                K[i, j] += N - d * 0.5 / (e + SPARSITY_EPS)
    return K / len(codes), len(codes)


@pytest.mark.parametrize("per_step", [True, False])
def test_kernel_matches_brute_force(cfg, images, per_step):
    model = _model(cfg)
    K, M = hamming_kernel(model, images, per_step=per_step)
    ref, m_ref = _reference_kernel(model, images, per_step=per_step)
    n_lif = sum(isinstance(m, LIF) for m in model.modules())
    assert M == m_ref == (n_lif * cfg.T if per_step else n_lif)
    assert K.dtype == torch.float64 and K.shape == (16, 16)
    # the spikes must be informative for the check to mean anything
    assert not torch.allclose(ref, ref[0, 0].expand_as(ref))
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-9)
    assert torch.allclose(K, K.T)
    score = hamming_score(model, images, per_step=per_step)
    assert score == pytest.approx(float(torch.linalg.slogdet(ref)[1]), rel=1e-9)


def test_layer_subset(cfg, images):
    model = _model(cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, LIF)][:2]
    K, M = hamming_kernel(model, images, layers=names)
    ref, _ = _reference_kernel(model, images, layers=names)
    assert M == 2 * cfg.T
    torch.testing.assert_close(K, ref, rtol=1e-12, atol=1e-9)
    # modules are accepted too
    K2, _ = hamming_kernel(model, images, layers=[model.get_submodule(n) for n in names])
    torch.testing.assert_close(K, K2)


def test_deterministic_restores_mode_buffers_hooks_and_rng(cfg, images):
    s1 = score_config(cfg, images, seed=3)
    rng = torch.get_rng_state()
    s2 = score_config(cfg, images, seed=3)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert s1 == s2 and math.isfinite(s1)
    assert score_config(cfg, images, seed=4) != s1
    two = score_config(cfg, images, seed=3, repeats=2)
    assert two == pytest.approx((s1 + score_config(cfg, images, seed=4)) / 2)

    for training in (False, True):
        model = _model(cfg).train(training)
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        assert hamming_score(model, images) == hamming_score(model, images)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
        for k, b in model.named_buffers():
            assert torch.equal(b, buffers[k]), k
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_after_failure(cfg, images):
    model = _model(cfg)

    def boom(*a):
        raise RuntimeError("boom")

    h = model.head.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        hamming_score(model, images)
    h.remove()
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training is True


def test_silent_network_scores_lower(cfg, images):
    normal = score_config(cfg, images)
    silent = score_config(cfg.replace(v_threshold=1e9), images)
    assert math.isfinite(normal)
    assert silent == -math.inf  # identical (all-zero) codes: K is N * ones, rank 1
    # a sparser (threshold 2) network still scores, far below the normal one (measured 32 vs 59)
    sparse = score_config(cfg.replace(v_threshold=2.0), images)
    assert math.isfinite(sparse) and sparse < normal - 10


def test_rank_correlation_known_values():
    up = [0.1, 0.5, 0.7, 0.9, 1.3]
    r = rank_correlation(up, [1, 2, 3, 4, 5])
    assert r["kendall_tau"] == pytest.approx(1.0) and r["spearman_rho"] == pytest.approx(1.0) and r["n"] == 5
    r = rank_correlation(up, [5, 4, 3, 2, 1])
    assert r["kendall_tau"] == pytest.approx(-1.0) and r["spearman_rho"] == pytest.approx(-1.0)
    # by hand: pairs (1,2)+ (1,3)+ (1,4)+ (2,3)- (2,4)+ (3,4)+ -> C=5, D=1, tau = 4/6;
    # rank differences 0,1,1,0 -> rho = 1 - 6*2/(4*15) = 0.8
    for use_scipy in (True, False):
        r = rank_correlation([1, 2, 3, 4], [1, 3, 2, 4], use_scipy=use_scipy)
        assert r["kendall_tau"] == pytest.approx(4 / 6) and r["spearman_rho"] == pytest.approx(0.8)
    # ties: tau-b; the pure-Python path agrees with scipy's
    a, b = [1, 1, 2, 3, 3, 4], [2, 1, 2, 3, 5, 4]
    r1, r2 = rank_correlation(a, b), rank_correlation(a, b, use_scipy=False)
    assert r1["kendall_tau"] == pytest.approx(r2["kendall_tau"])
    assert r1["spearman_rho"] == pytest.approx(r2["spearman_rho"])
    # by hand: C=11, D=1, ties only in a: 2, only in b: 1 -> (11-1)/sqrt((15-2)(15-1))
    assert r2["kendall_tau"] == pytest.approx(10 / math.sqrt(13 * 14))


def test_rank_correlation_nan_safe():
    r = rank_correlation([1, float("nan"), 2, -math.inf, 3, 4], [1, 5, 2, 3, float("nan"), 4])
    assert r["n"] == 3 and r["kendall_tau"] == pytest.approx(1.0)
    r = rank_correlation([1, 2, float("nan")], [1, 2, 3])
    assert r["n"] == 2 and math.isnan(r["kendall_tau"]) and math.isnan(r["spearman_rho"])
    r = rank_correlation([], [])
    assert r["n"] == 0 and math.isnan(r["kendall_tau"])
    r = rank_correlation([1, 1, 1], [1, 2, 3])  # constant side: undefined
    assert r["n"] == 3 and math.isnan(r["kendall_tau"])
    with pytest.raises(ValueError, match="same length"):
        rank_correlation([1, 2], [1])


def test_errors(cfg, images):
    model = _model(cfg)
    with pytest.raises(ValueError, match=r"B >= 2"):
        hamming_score(model, images[:1])
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        hamming_score(model, torch.randn(4, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        hamming_score(model, torch.randn(4, 16, 16))
    with pytest.raises(ValueError, match="not a LIF module path"):
        hamming_score(model, images, layers=["stages.0.nope"])
    with pytest.raises(ValueError, match="no mixersnn.neurons.LIF"):
        hamming_score(torch.nn.Linear(3, 3), torch.randn(4, 1, 2, 2))
    with pytest.raises(ValueError, match="repeats"):
        score_config(cfg, images, repeats=0)
