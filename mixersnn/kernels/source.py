"""Assemble the one LIF kernel source for NVRTC (CUDA) or g++ (host C++).

``lif.cu`` holds the kernels; ``lif_shim.h`` the per-target vocabulary. The surrogate
derivatives are generated here from ``SURROGATES[name].cuda_derivative``, the same definitions
the torch reference uses, so a new surrogate needs no kernel edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path

from mixersnn.neurons.backends import LIFParams
from mixersnn.neurons.surrogate import SURROGATES

__all__ = [
    "KernelVariant",
    "SURROGATE_NAMES",
    "DTYPES",
    "HOST_DTYPES",
    "kernel_source",
    "forward_variants",
    "backward_variants",
    "forward_variant",
    "backward_variant",
]

_DIR = Path(__file__).resolve().parent

#: Surrogate order fixes the ``kSurrogate`` template index.
SURROGATE_NAMES: tuple[str, ...] = tuple(sorted(SURROGATES))

#: CUDA storage types by short name.
DTYPES: dict[str, str] = {
    "float32": "float",
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
}

#: Host storage types by short name. The cpu backend builds "float32" alone; the tests also
#: build the 16-bit ones (host types with CUDA's rounding, see lif_shim.h) to run the 16-bit
#: instantiations on a CPU.
HOST_DTYPES: dict[str, str] = {
    "float32": "float",
    "float16": "lif_host_half",
    "bfloat16": "lif_host_bf16",
}


@dataclass(frozen=True)
class KernelVariant:
    """One template instantiation of ``lif_forward`` or ``lif_backward``.

    Attributes:
        kind: "forward" or "backward".
        dtype: a key of :data:`DTYPES`.
        hard: hard (True) or soft reset.
        decay_input: input divided by tau in the charge step.
        save: forward only, store u for the backward pass.
        detach_reset: backward only.
        surrogate: backward only, a name in :data:`SURROGATE_NAMES`.
    """

    kind: str
    dtype: str
    hard: bool
    decay_input: bool
    save: bool = False
    detach_reset: bool = False
    surrogate: str = ""

    @property
    def template_name(self) -> str:
        """The C++ name expression, e.g. ``lif_forward<float, 1, 1, 1>``."""
        return self._template(DTYPES[self.dtype])

    @property
    def host_template_name(self) -> str:
        """The same for the host build (its storage types are :data:`HOST_DTYPES`)."""
        return self._template(HOST_DTYPES[self.dtype])

    def _template(self, ctype: str) -> str:
        h, d = int(self.hard), int(self.decay_input)
        if self.kind == "forward":
            return f"lif_forward<{ctype}, {h}, {d}, {int(self.save)}>"
        s = SURROGATE_NAMES.index(self.surrogate)
        return f"lif_backward<{ctype}, {h}, {d}, {int(self.detach_reset)}, {s}>"

    @property
    def c_symbol(self) -> str:
        """A plain ``extern "C"`` name for the host build, e.g. ``lif_fwd_float32_h1_d1_s1``."""
        base = f"{self.dtype}_h{int(self.hard)}_d{int(self.decay_input)}"
        if self.kind == "forward":
            return f"lif_fwd_{base}_s{int(self.save)}"
        return f"lif_bwd_{base}_r{int(self.detach_reset)}_{self.surrogate}"


def forward_variant(p: LIFParams, dtype: str, save: bool) -> KernelVariant:
    """The forward kernel for neuron options ``p``."""
    return KernelVariant("forward", dtype, p.hard_reset, p.decay_input, save=save)


def backward_variant(p: LIFParams, dtype: str) -> KernelVariant:
    """The backward kernel for neuron options ``p``."""
    return KernelVariant(
        "backward",
        dtype,
        p.hard_reset,
        p.decay_input,
        detach_reset=p.detach_reset,
        surrogate=p.surrogate,
    )


def forward_variants(dtypes: tuple[str, ...] = tuple(DTYPES)) -> list[KernelVariant]:
    """Every forward instantiation (reset x decay_input x save) for ``dtypes``."""
    return [
        KernelVariant("forward", dt, h, d, save=s)
        for dt, h, d, s in product(dtypes, (True, False), (True, False), (True, False))
    ]


def backward_variants(dtypes: tuple[str, ...] = tuple(DTYPES)) -> list[KernelVariant]:
    """Every backward instantiation (reset x decay_input x detach x surrogate) for ``dtypes``."""
    return [
        KernelVariant("backward", dt, h, d, detach_reset=r, surrogate=sg)
        for dt, h, d, r, sg in product(
            dtypes, (True, False), (True, False), (True, False), SURROGATE_NAMES
        )
    ]


def _surrogate_block() -> str:
    lines = [
        "// Generated from mixersnn.neurons.surrogate.SURROGATES[...].cuda_derivative.",
        "template <int kSurrogate>",
        "LIF_DEVICE float lif_surrogate(float u, float alpha) {",
    ]
    for index, name in enumerate(SURROGATE_NAMES):
        body = SURROGATES[name].cuda_derivative
        lines.append(f"  if (kSurrogate == {index}) {{  // {name}")
        lines.extend(f"    {line}" for line in body.splitlines())
        lines.append("  }")
    lines.append("  return 0.0f;")
    lines.append("}")
    return "\n".join(lines)


#: Each kernel's arguments after the tensors' element type is known: its tensors (``const``
#: when read only), then ``n`` and ``steps``, then its fp32 scalars.
_HOST_ARGS = {
    "forward": (("const x", "const v0", "spikes", "u_saved", "v_final"), ("inv_tau", "v_reset", "v_threshold")),
    "backward": (("const u_saved", "const grad_spikes", "const grad_vfinal", "grad_x", "grad_v0"),
                 ("inv_tau", "v_reset", "v_threshold", "alpha")),
}


def _host_entry_points(dtypes: tuple[str, ...]) -> str:
    """``extern "C"`` wrappers so ctypes can call each instantiation for ``dtypes`` by name."""
    out = ["", "// ---- host entry points (generated by mixersnn/kernels/source.py)"]
    for v in forward_variants(dtypes) + backward_variants(dtypes):
        t = HOST_DTYPES[v.dtype]
        tensors, scalars = _HOST_ARGS[v.kind]
        names = [a.split()[-1] for a in tensors] + ["n", "steps", *scalars]
        params = [f"const {t}* {a.split()[-1]}" if a.startswith("const ") else f"{t}* {a}" for a in tensors]
        params += ["long long n", "int steps", *(f"float {s}" for s in scalars), "int threads"]
        out.append(
            f'extern "C" void {v.c_symbol}({", ".join(params)}) {{\n'
            "  omp_set_num_threads(threads);\n"
            f'  {v.host_template_name}({", ".join(names)});\n}}'
        )
    return "\n".join(out) + "\n"


@lru_cache(maxsize=None)
def kernel_source(target: str, host_dtypes: tuple[str, ...] = ("float32",)) -> str:
    """The complete, self-contained translation unit for ``target``.

    Args:
        target: "cuda" (for NVRTC; instantiate kernels by their ``template_name``) or
            "host" (C++ for g++, with ``extern "C"`` entry points named ``c_symbol``).
        host_dtypes: the dtypes the host build gets entry points for (keys of
            :data:`HOST_DTYPES`); the cpu backend's library has fp32 alone.
    """
    if target not in ("cuda", "host"):
        raise ValueError(f"target={target!r} must be 'cuda' or 'host'")
    unknown = [d for d in host_dtypes if d not in HOST_DTYPES]
    if unknown:
        raise ValueError(f"host_dtypes={host_dtypes!r}: {unknown} unknown; choose from {list(HOST_DTYPES)}")
    shim = (_DIR / "lif_shim.h").read_text()
    body = (_DIR / "lif.cu").read_text()
    body = body.replace('#include "lif_shim.h"', shim, 1)
    marker = "// @SURROGATES@"
    start = body.index(marker)
    end = body.index("\n", start)
    body = body[:start] + _surrogate_block() + body[end:]
    if target == "host":
        head = "#define LIF_HOST 1\n"
        if any(d != "float32" for d in host_dtypes):
            head += "#define LIF_HOST_16BIT 1\n"  # the 16-bit host types (lif_shim.h)
        return head + body + _host_entry_points(tuple(host_dtypes))
    return body
