"""Contract tests of the LIF core (design doc section 2).

Expected values are computed here from the equations, by hand (forward sequences with the
arithmetic in comments) or by an independent numpy implementation of the forward pass and of
the BPTT equations; nothing is taken from the implementation under test.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

from mixersnn.neurons import (
    LIF,
    SURROGATES,
    available_backends,
    get_surrogate,
    lif_multistep,
    lif_reference,
    make_lif_params,
    spike_fn,
)

# --------------------------------------------------------------------------------------------
# Forward: hand-computed sequences
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One neuron, a scalar input sequence and what the equations say it must do."""

    opts: dict
    x: tuple[float, ...]
    v_init: Optional[float]
    spikes: tuple[float, ...]
    v_final: float


# Every number below is a binary fraction, so float32 and float64 give the exact values and the
# comparisons are exact (including the firing-at-equality cases).
HAND_CASES = {
    # tau=2, V_th=1, V_reset=0, decay_input: H = V + (X - V)/2.
    #   t0: H = 0     + (1.5 - 0)/2     = 0.75     < 1 -> S=0, V=0.75
    #   t1: H = 0.75  + (0.5 - 0.75)/2  = 0.625    < 1 -> S=0, V=0.625
    #   t2: H = 0.625 + (1.0 - 0.625)/2 = 0.8125   < 1 -> S=0, V=0.8125
    #   t3: H = 0.8125 + (2.0 - 0.8125)/2 = 1.40625 >= 1 -> S=1, V=V_reset=0
    #   t4: H = 0     + (0.5 - 0)/2     = 0.25     < 1 -> S=0, V=0.25
    "hard_decay_paper_neuron": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True),
        (1.5, 0.5, 1.0, 2.0, 0.5), None, (0, 0, 0, 1, 0), 0.25,
    ),
    # Same neuron, T=1, H lands exactly on the threshold: H = 0 + (2 - 0)/2 = 1.0, u = 0 -> fires.
    "hard_decay_equality_T1": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True),
        (2.0,), None, (1,), 0.0,
    ),
    # tau=4, V_th=0.5, V_reset=-0.5, v_init=0 (given, so not the rest state):
    # H = V + (X - (V + 0.5))/4.
    #   t0: H = 0     + (2.5 - 0.5)/4   = 0.5      u = 0 -> S=1, V=-0.5
    #   t1: H = -0.5  + (1.0 - 0)/4     = -0.25    S=0, V=-0.25
    #   t2: H = -0.25 + (3.0 - 0.25)/4  = 0.4375   < 0.5 -> S=0, V=0.4375
    "hard_decay_vreset_neg_tau4": Case(
        dict(tau=4.0, v_threshold=0.5, v_reset=-0.5, decay_input=True),
        (2.5, 1.0, 3.0), 0.0, (1, 0, 0), 0.4375,
    ),
    # The leak pulls toward V_reset=0.25 (not 0), tau=2, V_th=1, v_init=0 (given, below the
    # rest state): H = V + (X - (V - 0.25))/2.
    #   t0: H = 0      + (0 + 0.25)/2      = 0.125    S=0, V=0.125
    #   t1: H = 0.125  + (0 + 0.125)/2     = 0.1875   S=0, V=0.1875
    #   t2: H = 0.1875 + (2 + 0.0625)/2    = 1.21875  S=1, V=V_reset=0.25
    "hard_decay_leak_to_vreset": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=0.25, decay_input=True),
        (0.0, 0.0, 2.0), 0.0, (0, 0, 1), 0.25,
    ),
    # No v_init and a hard reset: the neuron starts at rest, V = V_reset (SpikingJelly's
    # start). tau=2, V_th=1, V_reset=-0.5: H = V + (X - (V + 0.5))/2.
    #   t0: H = -0.5  + (2.0 - 0)/2       = 0.5     S=0, V=0.5
    #   t1: H = 0.5   + (1.75 - 1.0)/2    = 0.875   S=0, V=0.875
    #   t2: H = 0.875 + (0.5 - 1.375)/2   = 0.4375  S=0, V=0.4375
    "hard_decay_vreset_neg_starts_at_rest": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=-0.5, decay_input=True),
        (2.0, 1.75, 0.5), None, (0, 0, 0), 0.4375,
    ),
    # The same neuron and input from v_init=0 instead fires (the start matters):
    #   t0: H = 0     + (2.0 - 0.5)/2     = 0.75    S=0, V=0.75
    #   t1: H = 0.75  + (1.75 - 1.25)/2   = 1.0     u = 0 -> S=1, V=-0.5
    #   t2: H = -0.5  + (0.5 - 0)/2       = -0.25   S=0, V=-0.25
    "hard_decay_vreset_neg_vinit0": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=-0.5, decay_input=True),
        (2.0, 1.75, 0.5), 0.0, (0, 1, 0), -0.25,
    ),
    # No v_init, no decay_input, V_reset=-1: starts at V = -1. tau=2, V_th=1:
    # H = V - (V + 1)/2 + X.
    #   t0: H = -1  - 0    + 1.5  = 0.5   S=0, V=0.5
    #   t1: H = 0.5 - 0.75 + 0.75 = 0.5   S=0, V=0.5
    # (from v_init=0, t0 would be H = 0 - 0.5 + 1.5 = 1.0 and fire)
    "hard_no_decay_vreset_neg_starts_at_rest": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=-1.0, decay_input=False),
        (1.5, 0.75), None, (0, 0), 0.5,
    ),
    # No decay_input, tau=2, V_th=1, V_reset=0: H = V - V/2 + X.
    #   t0: H = 0     - 0     + 0.5  = 0.5    S=0, V=0.5
    #   t1: H = 0.5   - 0.25  + 0.75 = 1.0    u = 0 -> S=1, V=0
    #   t2: H = 0     - 0     + 0.25 = 0.25   S=0, V=0.25
    #   t3: H = 0.25  - 0.125 + 1.5  = 1.625  S=1, V=0
    "hard_no_decay": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=False),
        (0.5, 0.75, 0.25, 1.5), None, (0, 1, 0, 1), 0.0,
    ),
    # No decay_input, V_reset=-1 (charge leaks toward -1), V_th=1, tau=2, v_init=-1:
    # H = V - (V + 1)/2 + X.
    #   t0: H = -1 - 0   + 1.0 = 0.0   S=0, V=0
    #   t1: H = 0  - 0.5 + 1.5 = 1.0   S=1, V=-1
    "hard_no_decay_vreset_neg_vinit": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=-1.0, decay_input=False),
        (1.0, 1.5), -1.0, (0, 1), -1.0,
    ),
    # Hard reset on the input of the soft case below, tau=2, V_th=1, V_reset=0:
    #   t0: H = 0 + (3 - 0)/2 = 1.5  S=1, V=0
    #   t1: H = 0 + (2 - 0)/2 = 1.0  S=1, V=0
    #   t2: H = 0 + (0.5 - 0)/2 = 0.25  S=0, V=0.25
    "hard_decay_same_input_as_soft": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True),
        (3.0, 2.0, 0.5), None, (1, 1, 0), 0.25,
    ),
    # Soft reset (V = H - S V_th; charge with V_reset = 0), tau=2, V_th=1: H = V + (X - V)/2.
    #   t0: H = 0    + (3.0 - 0)/2    = 1.5    S=1, V=1.5 - 1 = 0.5
    #   t1: H = 0.5  + (2.0 - 0.5)/2  = 1.25   S=1, V=0.25
    #   t2: H = 0.25 + (0.5 - 0.25)/2 = 0.375  S=0, V=0.375
    "soft_decay": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=None, decay_input=True),
        (3.0, 2.0, 0.5), None, (1, 1, 0), 0.375,
    ),
    # Soft reset, no decay_input, tau=4, V_th=2, v_init=1: H = V - V/4 + X.
    #   t0: H = 1      - 0.25     + 2.5 = 3.25      S=1, V=3.25 - 2 = 1.25
    #   t1: H = 1.25   - 0.3125   + 1.0 = 1.9375    S=0, V=1.9375
    #   t2: H = 1.9375 - 0.484375 + 0.0 = 1.453125  S=0, V=1.453125
    "soft_no_decay_vth2_vinit": Case(
        dict(tau=4.0, v_threshold=2.0, v_reset=None, decay_input=False),
        (2.5, 1.0, 0.0), 1.0, (1, 0, 0), 1.453125,
    ),
    # Soft reset at equality, T=1, V_th=0.75: H = 0 + 1.5/2 = 0.75 -> S=1, V=0.75 - 0.75 = 0.
    "soft_decay_equality_T1": Case(
        dict(tau=2.0, v_threshold=0.75, v_reset=None, decay_input=True),
        (1.5,), None, (1,), 0.0,
    ),
    # v_init given, T=1, paper neuron: H = 0.5 + (1.5 - 0.5)/2 = 1.0 -> S=1, V=0.
    "hard_vinit_equality_T1": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True),
        (1.5,), 0.5, (1,), 0.0,
    ),
    # v_init given, T=1, below threshold: H = 0.5 + (1.25 - 0.5)/2 = 0.875 -> S=0, V=0.875.
    "hard_vinit_below_T1": Case(
        dict(tau=2.0, v_threshold=1.0, v_reset=0.0, decay_input=True),
        (1.25,), 0.5, (0,), 0.875,
    ),
}


@pytest.mark.parametrize("name", sorted(HAND_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate", ["sigmoid", "atan"])
def test_forward_matches_hand_computed(name, dtype, detach_reset, surrogate):
    # detach_reset and the surrogate only change the backward pass: the forward must not move.
    c = HAND_CASES[name]
    x = torch.tensor(c.x, dtype=dtype).unsqueeze(1)  # [T, 1]
    v_init = None if c.v_init is None else torch.tensor([c.v_init], dtype=dtype)
    s, v = lif_multistep(
        x, v_init, **c.opts, detach_reset=detach_reset, surrogate=surrogate, backend="torch"
    )
    assert s.dtype == dtype and v.dtype == dtype
    assert s.shape == (len(c.x), 1) and v.shape == (1,)
    assert s.squeeze(1).tolist() == [float(k) for k in c.spikes]
    assert v.item() == c.v_final


def test_lif_module_matches_hand_computed():
    c = HAND_CASES["hard_decay_paper_neuron"]
    m = LIF(**c.opts, backend="torch")
    s = m(torch.tensor(c.x).unsqueeze(1))
    assert s.squeeze(1).tolist() == [float(k) for k in c.spikes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fires_exactly_at_threshold_equality(dtype):
    # Paper neuron, T=1, v0=0: H = X/2, so X=2 gives H = V_th exactly (u = 0, fires) and the
    # next representable value below 2 gives H just under V_th (does not fire).
    two = torch.tensor(2.0, dtype=dtype)
    below = torch.nextafter(two, torch.tensor(0.0, dtype=dtype))
    above = torch.nextafter(two, torch.tensor(4.0, dtype=dtype))
    x = torch.stack([below, two, above]).reshape(1, 3)
    s, _ = lif_multistep(x, backend="torch")
    assert s.tolist() == [[0.0, 1.0, 1.0]]
    # And spike_fn itself: Heaviside with H(0) = 1.
    u = torch.tensor([-1e-30, 0.0, 1e-30], dtype=dtype)
    assert spike_fn(u).tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("v_reset", [0.0, None])
def test_spikes_are_exactly_binary(v_reset):
    x = torch.randn(8, 4, 5) * 3
    s, v = lif_multistep(x, v_reset=v_reset, backend="torch")
    vals = set(torch.unique(s).tolist())
    assert vals == {0.0, 1.0}  # both occur with this input, and nothing else does
    assert s.dtype == x.dtype and s.shape == x.shape and v.shape == x.shape[1:]


def _numpy_forward(x, v0, *, tau, vth, vr, decay):
    """The section-2 forward, independently, in numpy. Returns H, S and V_final."""
    vr_c = 0.0 if vr is None else vr
    v = np.array(v0, dtype=np.float64)
    H, S = np.zeros_like(x), np.zeros_like(x)
    for t in range(x.shape[0]):
        if decay:
            h = v + (x[t] - (v - vr_c)) / tau
        else:
            h = v - (v - vr_c) / tau + x[t]
        s = (h - vth >= 0).astype(np.float64)
        v = s * vr_c + (1 - s) * h if vr is not None else h - s * vth
        H[t], S[t] = h, s
    return H, S, v


def test_elementwise_and_random_forward_matches_numpy():
    # Many neurons at once must behave like independent scalar neurons; random data exercises
    # mixed histories the hand cases do not.
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 4, size=(7, 2, 3))
    v0 = rng.uniform(-0.5, 0.9, size=(2, 3))
    for vr in (0.0, -0.25, None):
        for decay in (True, False):
            _, S_np, v_np = _numpy_forward(x, v0, tau=3.0, vth=1.0, vr=vr, decay=decay)
            s, v = lif_multistep(
                torch.from_numpy(x), torch.from_numpy(v0), tau=3.0, v_reset=vr,
                decay_input=decay, backend="torch",
            )
            np.testing.assert_array_equal(s.numpy(), S_np)
            np.testing.assert_allclose(v.numpy(), v_np, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Surrogate derivatives
# --------------------------------------------------------------------------------------------


def _sigmoid_closed(u, a):
    sg = 1.0 / (1.0 + np.exp(-a * u))
    return a * sg * (1.0 - sg)


def _atan_closed(u, a):
    return (a / 2.0) / (1.0 + (math.pi / 2.0 * a * u) ** 2)


CLOSED = {"sigmoid": _sigmoid_closed, "atan": _atan_closed}


def _spike_grad(u: torch.Tensor, name: str, alpha) -> torch.Tensor:
    u = u.clone().requires_grad_(True)
    spike_fn(u, name, alpha).sum().backward()
    return u.grad


@pytest.mark.parametrize(
    "name,alpha,u,expected",
    [
        # sigmoid alpha=4 at u=0: 4 * 1/2 * 1/2 = 1
        ("sigmoid", None, 0.0, 1.0),
        # sigmoid alpha=4 at u=ln(3)/4: sig(ln 3) = 3/4, so 4 * 3/4 * 1/4 = 0.75
        ("sigmoid", None, math.log(3) / 4, 0.75),
        # custom alpha=2 at u=0: 2 * 1/4 = 0.5
        ("sigmoid", 2.0, 0.0, 0.5),
        # atan alpha=2 at u=0: (2/2) / 1 = 1
        ("atan", None, 0.0, 1.0),
        # atan alpha=2 at u=1/pi: pi/2 * 2 * 1/pi = 1, so 1 / (1 + 1) = 0.5
        ("atan", None, 1 / math.pi, 0.5),
        # custom alpha=1 at u=-2/pi: pi/2 * 1 * 2/pi = 1, so (1/2) / 2 = 0.25
        ("atan", 1.0, -2 / math.pi, 0.25),
    ],
)
def test_surrogate_derivative_hand_values(name, alpha, u, expected):
    g = _spike_grad(torch.tensor([u], dtype=torch.float64), name, alpha)
    assert g.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name,default_alpha", [("sigmoid", 4.0), ("atan", 2.0)])
@pytest.mark.parametrize("alpha", [None, 0.5, 3.0, 7.0])
def test_surrogate_derivative_closed_form(name, default_alpha, alpha):
    u = torch.linspace(-3, 3, 61, dtype=torch.float64)
    a = default_alpha if alpha is None else alpha
    expected = CLOSED[name](u.numpy(), a)
    np.testing.assert_allclose(_spike_grad(u, name, alpha).numpy(), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(SURROGATES[name].derivative(u, a).numpy(), expected, rtol=1e-12, atol=1e-15)
    assert get_surrogate(name).default_alpha == default_alpha
    assert make_lif_params(surrogate=name, alpha=alpha).alpha == a


def test_surrogate_scales_upstream_gradient():
    # Chain rule: dL/du = g_S * sigma'(u), not sigma'(u) alone.
    u = torch.tensor([0.0, 0.3], dtype=torch.float64, requires_grad=True)
    gs = torch.tensor([2.0, -3.0], dtype=torch.float64)
    (spike_fn(u, "sigmoid") * gs).sum().backward()
    np.testing.assert_allclose(u.grad.numpy(), gs.numpy() * _sigmoid_closed(np.array([0.0, 0.3]), 4.0))


class _PrimitiveWithSurrogateBackward(torch.autograd.Function):
    """Forward: the smooth primitive g(u). Backward: the registered derivative g'(u).

    gradcheck compares the analytic backward (the derivative) with finite differences of the
    forward (the primitive), so it passes only if derivative == d primitive / du."""

    @staticmethod
    def forward(ctx, u, name, alpha):
        ctx.save_for_backward(u)
        ctx.name, ctx.alpha = name, alpha
        return SURROGATES[name].primitive(u, alpha)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g * SURROGATES[ctx.name].derivative(u, ctx.alpha), None, None


@pytest.mark.parametrize("name", ["sigmoid", "atan"])
@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
def test_surrogate_derivative_is_derivative_of_primitive(name, alpha):
    u = torch.linspace(-2, 2, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: _PrimitiveWithSurrogateBackward.apply(t, name, alpha), (u,)
    )
    # The primitive approximates the step: g(-inf) = 0, g(0) = 1/2, g(+inf) = 1.
    big = torch.tensor([-1e6, 0.0, 1e6], dtype=torch.float64)
    np.testing.assert_allclose(SURROGATES[name].primitive(big, alpha).numpy(), [0, 0.5, 1], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Gradients: independent BPTT of section 2 vs autograd through the reference backend
# --------------------------------------------------------------------------------------------


def _numpy_bptt(x, v0, gS, gVT, *, tau, vth, vr, decay, detach, dsg):
    """Design doc section 2 backward, written out independently.

    g_H[t] = g_S[t] sigma'(u) + (g_V[t] + g_H[t+1] (1 - 1/tau)) dV/dH
    dV/dH  = 1 - S + (V_reset - H) sigma'(u)  (hard),  1 - V_th sigma'(u)  (soft);
             the sigma' terms vanish with detach_reset
    g_X[t] = g_H[t] / tau (decay_input) or g_H[t];   g_V0 = g_H[0] (1 - 1/tau)
    g_V[t] is the upstream gradient of V[t]: g_V_final at the last step, 0 elsewhere.
    """
    H, S, v_final = _numpy_forward(x, v0, tau=tau, vth=vth, vr=vr, decay=decay)
    vr_c = 0.0 if vr is None else vr
    T = x.shape[0]
    gX = np.zeros_like(x)
    gH_next = np.zeros_like(v0)
    for t in reversed(range(T)):
        sp = dsg(H[t] - vth)
        g_v = (gVT if t == T - 1 else 0.0) + gH_next * (1 - 1 / tau)
        if vr is not None:
            dVdH = 1 - S[t] + (0.0 if detach else (vr_c - H[t]) * sp)
        else:
            dVdH = 1 - (0.0 if detach else vth * sp)
        gH = gS[t] * sp + g_v * dVdH
        gX[t] = gH / tau if decay else gH
        gH_next = gH
    gV0 = gH_next * (1 - 1 / tau)
    return S, v_final, gX, gV0


SURR_TAU = [("sigmoid", None, 2.0), ("atan", None, 2.0), ("sigmoid", 2.5, 3.0), ("atan", 1.0, 1.5)]


@pytest.mark.parametrize("v_reset", [0.0, -0.25, None], ids=["hard0", "hard_neg", "soft"])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("surrogate,alpha,tau", SURR_TAU)
def test_autograd_matches_independent_bptt(v_reset, detach_reset, decay_input, surrogate, alpha, tau):
    rng = np.random.default_rng(7)
    T, N, vth = 6, 9, 1.0
    x = rng.uniform(-1.0, 4.0, size=(T, N))
    v0 = rng.uniform(-0.5, 0.9, size=(N,))
    gS = rng.normal(size=(T, N))
    gVT = rng.normal(size=(N,))
    a = get_surrogate(surrogate).default_alpha if alpha is None else alpha
    S_np, v_np, gX_np, gV0_np = _numpy_bptt(
        x, v0, gS, gVT, tau=tau, vth=vth, vr=v_reset, decay=decay_input, detach=detach_reset,
        dsg=lambda u: CLOSED[surrogate](u, a),
    )
    # Non-vacuous: both firing and silent steps occur, so the reset terms are exercised.
    assert 0 < S_np.sum() < S_np.size

    xt = torch.tensor(x, requires_grad=True)
    v0t = torch.tensor(v0, requires_grad=True)
    s, v = lif_multistep(
        xt, v0t, tau=tau, v_threshold=vth, v_reset=v_reset, decay_input=decay_input,
        detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, backend="torch",
    )
    ((s * torch.from_numpy(gS)).sum() + (v * torch.from_numpy(gVT)).sum()).backward()
    np.testing.assert_array_equal(s.detach().numpy(), S_np)
    np.testing.assert_allclose(v.detach().numpy(), v_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), gX_np, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(v0t.grad.numpy(), gV0_np, rtol=1e-10, atol=1e-12)


def test_detach_reset_changes_the_gradient():
    # Guards the BPTT test against an implementation that ignores detach_reset.
    x = torch.tensor([[3.0], [0.5], [2.5]], dtype=torch.float64)
    grads = []
    for detach in (False, True):
        xt = x.clone().requires_grad_(True)
        s, v = lif_multistep(xt, detach_reset=detach, backend="torch")
        (s.sum() + v.sum()).backward()
        grads.append(xt.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("v_reset", [0.0, -0.25, None], ids=["hard0", "hard_neg", "soft"])
@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("surrogate,alpha,tau", SURR_TAU)
def test_gradcheck_smooth_reference(v_reset, decay_input, surrogate, alpha, tau):
    # With smooth=True the forward is differentiable, so finite differences check that the loop's
    # autograd (BPTT) composes correctly. Only detach_reset=False can be checked this way: a
    # detach changes the analytic gradient but not the forward that finite differences see
    # (detach_reset=True is covered by test_autograd_matches_independent_bptt).
    p = make_lif_params(
        tau=tau, v_reset=v_reset, decay_input=decay_input, detach_reset=False,
        surrogate=surrogate, alpha=alpha,
    )
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(5, 3, generator=g, dtype=torch.float64) * 4 - 1).requires_grad_(True)
    v0 = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lif_reference(a, b, p, smooth=True), (x, v0))


def test_smooth_reference_uses_the_primitive():
    # smooth=True at T=1, v0=0: S = g(X/tau - V_th) (the primitive, not a step).
    p = make_lif_params()
    x = torch.tensor([[1.0]], dtype=torch.float64)
    s, _ = lif_reference(x, torch.zeros(1, dtype=torch.float64), p, smooth=True)
    # H = 0 + (1 - 0)/2 = 1/2, u = 1/2 - 1 = -1/2, sigmoid(4 * -1/2) = 1 / (1 + e^2)
    assert s.item() == pytest.approx(1 / (1 + math.e**2), rel=1e-12)
    # the non-smooth reference gives the step instead
    s_step, _ = lif_reference(x, torch.zeros(1, dtype=torch.float64), p)
    assert s_step.item() == 0.0


# --------------------------------------------------------------------------------------------
# Statelessness
# --------------------------------------------------------------------------------------------


def test_two_calls_identical_and_input_untouched():
    x = torch.randn(5, 3, 4) * 2
    x_copy = x.clone()
    s1, v1 = lif_multistep(x, backend="torch")
    s2, v2 = lif_multistep(x, backend="torch")
    assert torch.equal(s1, s2) and torch.equal(v1, v2)
    assert torch.equal(x, x_copy)


@pytest.mark.parametrize("v_reset", [0.0, None])
def test_v_init_none_means_zeros(v_reset):
    x = torch.randn(6, 10) * 2
    s1, v1 = lif_multistep(x, None, v_reset=v_reset, backend="torch")
    s2, v2 = lif_multistep(x, torch.zeros(10), v_reset=v_reset, backend="torch")
    assert torch.equal(s1, s2) and torch.equal(v1, v2)
    # and a non-zero v_init does change the result (the argument is not ignored)
    s3, v3 = lif_multistep(x, torch.full((10,), 0.9), v_reset=v_reset, backend="torch")
    assert not torch.equal(v1, v3)


# The CPU-runnable backends; "cpu" runs the fused kernel (lif.cu) on fp32 tensors.
CPU_BACKENDS = ["torch", "cpu"]


def _spikes_vfinal_grad(backend, x, v_init, gs, **opts):
    """``(spikes, v_final or None, grad_x)`` of one ``lif_multistep`` call, with the upstream
    gradient ``gs`` on the spikes and 1 on the final membrane (when it is returned)."""
    xx = x.clone().requires_grad_()
    s, v = lif_multistep(xx, v_init, backend=backend, **opts)
    loss = (s * gs).sum() + (0.0 if v is None else v.sum())
    (gx,) = torch.autograd.grad(loss, xx)
    return s, v, gx


@pytest.mark.parametrize("return_v_final", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hard_reset_without_v_init_starts_at_v_reset(backend, return_v_final):
    # SpikingJelly's rest state: a hard-reset neuron without v_init starts at v_reset, bit for
    # bit as if v_init were v_reset everywhere; return_v_final=False is the models' call (the
    # fused kernel then reads no v0 and writes no v_final).
    g = torch.Generator().manual_seed(21)
    T, N, vr = 6, 400, -0.3
    x = torch.randn(T, N, generator=g) * 1.5 + 0.7
    gs = torch.randn(T, N, generator=g)
    opts = dict(v_reset=vr, detach_reset=False, return_v_final=return_v_final)
    none = _spikes_vfinal_grad(backend, x, None, gs, **opts)
    rest = _spikes_vfinal_grad(backend, x, torch.full((N,), vr), gs, **opts)
    zero = _spikes_vfinal_grad(backend, x, torch.zeros(N), gs, **opts)
    assert (none[1] is None) == (not return_v_final)
    for a, b in zip(none, rest):
        assert (a is None and b is None) or torch.equal(a, b)
    # Non-vacuous: starting from 0 instead gives other spikes and gradients.
    assert not torch.equal(none[0], zero[0])
    assert not torch.equal(none[2], zero[2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lif_module_starts_at_v_reset(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 40, generator=g) * 1.5 + 0.7
    vr = -0.3
    s = LIF(v_reset=vr, backend=backend)(x)
    s_rest, _ = lif_multistep(x, torch.full((3, 40), vr), v_reset=vr, backend="torch")
    s_zero, _ = lif_multistep(x, torch.zeros(3, 40), v_reset=vr, backend="torch")
    assert torch.equal(s, s_rest)
    assert not torch.equal(s, s_zero)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_reset_without_v_init_starts_at_zero(backend):
    # A soft reset charges towards 0, so 0 is its rest state, whatever else is set.
    g = torch.Generator().manual_seed(8)
    T, N = 6, 400
    x = torch.randn(T, N, generator=g) * 1.5 + 0.7
    gs = torch.randn(T, N, generator=g)
    opts = dict(v_reset=None, v_threshold=0.8, detach_reset=False)
    none = _spikes_vfinal_grad(backend, x, None, gs, **opts)
    zero = _spikes_vfinal_grad(backend, x, torch.zeros(N), gs, **opts)
    other = _spikes_vfinal_grad(backend, x, torch.full((N,), -0.3), gs, **opts)
    for a, b in zip(none, zero):
        assert torch.equal(a, b)
    assert not torch.equal(none[1], other[1])


def _spikingjelly_lif(x, *, tau, v_threshold, v_reset, decay_input):
    """SpikingJelly's multi-step LIFNode forward with a hard reset, written out here in numpy
    (SpikingJelly is not installed): the membrane is registered as ``v = v_reset``, then per
    step neuronal_charge, neuronal_fire (Heaviside, H(0) = 1) and the hard reset."""
    v = np.full(x.shape[1:], v_reset, dtype=x.dtype)
    spikes = []
    for t in range(x.shape[0]):
        if decay_input:
            h = v + (x[t] - (v - v_reset)) / tau
        else:
            h = v - (v - v_reset) / tau + x[t]
        s = (h - v_threshold >= 0).astype(x.dtype)
        v = (1.0 - s) * h + s * v_reset
        spikes.append(s)
    return np.stack(spikes), v


@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rest_start_matches_spikingjelly_equations(backend, decay_input):
    # fp32 throughout, tau = 2 (dividing by 2 and multiplying by 1/2 round alike, and neither
    # side fuses a multiply-add), so the loop and the backends agree bit for bit.
    rng = np.random.default_rng(21)
    T, N = 8, 500
    x = (rng.standard_normal((T, N)) * 1.5 + 0.7).astype(np.float32)
    f32 = np.float32
    S, V = _spikingjelly_lif(x, tau=f32(2.0), v_threshold=f32(1.0), v_reset=f32(-0.3),
                             decay_input=decay_input)
    assert 0.05 < S.mean() < 0.95
    s, v = lif_multistep(torch.from_numpy(x), None, tau=2.0, v_threshold=1.0, v_reset=-0.3,
                         decay_input=decay_input, backend=backend)
    np.testing.assert_array_equal(s.numpy(), S)
    np.testing.assert_array_equal(v.numpy(), V)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_return_v_final_false_gives_none_and_the_same_spikes_and_gradients(backend):
    x = torch.randn(5, 3, 8) * 2
    outs = []
    for keep in (True, False):
        xx = x.clone().requires_grad_()
        s, v = lif_multistep(xx, None, backend=backend, return_v_final=keep)
        assert (v is None) == (not keep)
        s.sum().backward()
        outs.append((s, xx.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_lif_module_is_stateless():
    m = LIF(backend="torch")
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    a, b = torch.randn(4, 2, 8) * 3, torch.randn(4, 2, 8) * 3
    m(a)
    after_a = m(b)
    fresh = LIF(backend="torch")(b)
    assert torch.equal(after_a, fresh)
    assert torch.equal(m(b), after_a)


# --------------------------------------------------------------------------------------------
# Backends: checked at construction
# --------------------------------------------------------------------------------------------


def test_torch_backend_always_available():
    assert available_backends()["torch"] is None
    assert available_backends("cpu")["torch"] is None
    LIF(backend="torch")
    LIF(backend="auto")


def test_unknown_backend_raises_at_construction():
    with pytest.raises(ValueError, match=r"backend='nope'.*'torch'"):
        LIF(backend="nope")


def test_unavailable_backends_raise_with_their_reason():
    for name, reason in available_backends().items():
        if reason is None:
            LIF(backend=name)  # must construct
        else:
            with pytest.raises(RuntimeError, match=re.escape(reason)) as info:
                LIF(backend=name)
            assert repr(name) in str(info.value)


def test_cupy_backend_raises_with_reason_when_it_cannot_run():
    reasons = available_backends()
    if "cupy" not in reasons:
        pytest.skip("the 'cupy' backend is not registered (mixersnn.kernels does not provide it)")
    if reasons["cupy"] is None:
        pytest.skip("CuPy can run here")
    assert reasons["cupy"].strip(), "the reason must say something"
    with pytest.raises(RuntimeError, match=re.escape(reasons["cupy"])):
        LIF(backend="cupy")


# --------------------------------------------------------------------------------------------
# Bad options and inputs
# --------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(tau=0.5), r"tau=0\.5"),
    (dict(tau=-2.0), r"tau=-2\.0"),
    (dict(alpha=0.0), r"alpha=0\.0"),
    (dict(alpha=-1.0), r"alpha=-1\.0"),
    (dict(surrogate="atan", alpha=0), r"alpha=0"),
    (dict(v_reset=1.0, v_threshold=1.0), r"v_reset=1\.0"),
    (dict(v_reset=2.0, v_threshold=1.0), r"v_reset=2\.0"),
    (dict(surrogate="relu"), r"'relu'.*atan.*sigmoid"),
]


@pytest.mark.parametrize("opts,pattern", BAD_OPTIONS)
def test_bad_options_raise_naming_the_value(opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_lif_params(**opts)
    with pytest.raises(ValueError, match=pattern):
        LIF(**opts, backend="torch")
    with pytest.raises(ValueError, match=pattern):
        lif_multistep(torch.zeros(2, 3), **opts, backend="torch")


def test_boundary_options_are_accepted():
    # tau = 1 (no leak memory) and v_reset just below v_threshold are legal.
    s, v = lif_multistep(torch.tensor([[0.5], [0.5]]), tau=1.0, v_threshold=0.5, v_reset=0.25, backend="torch")
    # tau=1: H = V + (X - (V - 0.25)) = X + 0.25 = 0.75 >= 0.5 at both steps, V = 0.25
    assert s.squeeze(1).tolist() == [1.0, 1.0] and v.item() == 0.25


def test_wrong_v_init_shape_raises():
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 4\)"):
        lif_multistep(torch.zeros(5, 2, 4), torch.zeros(3), backend="torch")


def test_empty_time_axis_raises():
    with pytest.raises(ValueError, match=r"T >= 1.*\(0, 3\)"):
        lif_multistep(torch.zeros(0, 3), backend="torch")
    with pytest.raises(ValueError, match=r"T >= 1"):
        lif_multistep(torch.tensor(1.0), backend="torch")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_raises(dtype):
    with pytest.raises(TypeError, match=re.escape(str(dtype))):
        lif_multistep(torch.zeros(3, 2, dtype=dtype), backend="torch")


# ------------------------------------------------------------------ memory layout
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,  # contiguous
        lambda x: x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3),  # channels-last
        lambda x: x[:, :, :3],  # a channel slice (not dense)
        lambda x: x[:1].expand(x.shape[0], *x.shape[1:]),  # broadcast over T (stride 0)
    ],
    ids=["contiguous", "channels-last", "slice", "broadcast"],
)
def test_lif_module_keeps_the_layout_and_the_values(backend, make) -> None:
    from mixersnn.neurons.modules import time_major

    lif = LIF(detach_reset=True, backend=backend)
    base = (torch.randn(3, 2, 5, 4, 4) * 2).requires_grad_()
    x = make(base)
    y, inverse = time_major(x)
    assert y.is_contiguous() and torch.equal(y if inverse is None else y.permute(inverse), x)
    s = lif(x)
    ref = lif(x.contiguous())
    assert torch.equal(s, ref)
    if x.stride(0) > 0 and sorted(x.stride()) == sorted(x.contiguous().stride()):  # dense
        assert s.stride() == x.stride()  # a dense layout comes back unchanged: no copies
    g = torch.randn_like(ref)
    (ga,) = torch.autograd.grad(s, base, g)
    (gb,) = torch.autograd.grad(ref, base, g)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)
