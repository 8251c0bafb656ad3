"""Surrogate gradients of the Heaviside spike function.

One definition per surrogate serves every backend: the torch reference uses ``derivative``
directly, and the CUDA/C kernels are generated from ``cuda_derivative`` (see
``mixersnn.kernels``) and tested against ``derivative``.

Each surrogate is the derivative of a smooth "primitive" g(u) that approximates the step
H(u) (forward spikes stay exactly binary; only the backward pass uses g'):

- sigmoid (alpha = 4): g(u) = sig(alpha u),          g'(u) = alpha sig(alpha u) (1 - sig(alpha u))
- atan    (alpha = 2): g(u) = atan(pi/2 alpha u)/pi + 1/2,
                       g'(u) = (alpha / 2) / (1 + (pi/2 alpha u)^2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Surrogate", "SURROGATES", "get_surrogate", "spike_fn"]


@dataclass(frozen=True)
class Surrogate:
    """A surrogate gradient: its name, default alpha, primitive, derivative and CUDA source.

    Attributes:
        name: registry key ("sigmoid", "atan").
        default_alpha: the alpha used when the caller passes ``alpha=None``.
        primitive: smooth g(u, alpha) whose derivative is the surrogate (used by tests to
            check the backward pass with ``gradcheck`` on a differentiable forward).
        derivative: g'(u, alpha), elementwise on tensors.
        cuda_derivative: the body of a C function ``float f(float u, float alpha)`` that
            returns g'(u): statements ending in ``return``, valid CUDA and host C++ alike
            (arithmetic, ``fabsf`` and ``lif_exp2_neg(a)``, 2^-a for a >= 0, which the kernel
            shim supplies for both: ``exp2f`` on CUDA, a vectorisable one on the host).
    """

    name: str
    default_alpha: float
    primitive: Callable[[torch.Tensor, float], torch.Tensor]
    derivative: Callable[[torch.Tensor, float], torch.Tensor]
    cuda_derivative: str


def _sigmoid_primitive(u: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.sigmoid(alpha * u)


def _sigmoid_derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:
    s = torch.sigmoid(alpha * u)
    return alpha * s * (1.0 - s)


def _atan_primitive(u: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.atan(math.pi / 2.0 * alpha * u) / math.pi + 0.5


def _atan_derivative(u: torch.Tensor, alpha: float) -> torch.Tensor:
    return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * u) ** 2)


SURROGATES: dict[str, Surrogate] = {
    "sigmoid": Surrogate(
        name="sigmoid",
        default_alpha=4.0,
        primitive=_sigmoid_primitive,
        derivative=_sigmoid_derivative,
        # alpha sig (1 - sig) = alpha e / (1 + e)^2 with e = exp(-|alpha u|): one division,
        # not two (the CPU backward is bound by this arithmetic), and sig' is even, so e is
        # in (0, 1] and nothing overflows. e = 2^-|alpha log2(e) u|: base 2 is cheaper.
        cuda_derivative=(
            "const float e = lif_exp2_neg(fabsf((alpha * 1.44269504088896341f) * u));\n"
            "const float d = 1.0f + e;\n"
            "return alpha * e / (d * d);"
        ),
    ),
    "atan": Surrogate(
        name="atan",
        default_alpha=2.0,
        primitive=_atan_primitive,
        derivative=_atan_derivative,
        cuda_derivative=(
            "const float z = 1.57079632679489662f * alpha * u;\n"
            "return (alpha * 0.5f) / (1.0f + z * z);"
        ),
    ),
}


def get_surrogate(name: str) -> Surrogate:
    """Look up a surrogate by name, with an error that lists the valid names."""
    try:
        return SURROGATES[name]
    except KeyError:
        raise ValueError(
            f"surrogate={name!r} is not known; choose one of {sorted(SURROGATES)}"
        ) from None


class _SpikeFn(torch.autograd.Function):
    """Heaviside forward (u >= 0 fires), surrogate derivative backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, name: str, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        ctx.name = name
        ctx.alpha = alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_s: torch.Tensor):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        return grad_s * SURROGATES[ctx.name].derivative(u, ctx.alpha), None, None


def spike_fn(u: torch.Tensor, surrogate: str = "sigmoid", alpha: float | None = None) -> torch.Tensor:
    """Binary spikes ``(u >= 0)`` with the named surrogate gradient.

    Args:
        u: membrane minus threshold, any shape.
        surrogate: "sigmoid" or "atan".
        alpha: surrogate sharpness; ``None`` takes the surrogate's default.
    """
    sg = get_surrogate(surrogate)
    return _SpikeFn.apply(u, sg.name, sg.default_alpha if alpha is None else float(alpha))
