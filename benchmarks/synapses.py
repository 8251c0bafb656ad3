"""Event-driven synapses against the dense layer: ``spike_linear`` vs ``F.linear`` by density.

Measured, not asserted. For each layer shape of MLP-SPE-T at 32 px (T=4, batch 8: the
``spe_t`` row of ``train_step.py``; rows M = T*B*tokens, in K, out N) and each input density,
times a forward alone and a forward + backward (gradients of input, weight and bias) of both,
in the same interleaved rounds (``_common.interleaved_medians``), on random 0/1 spikes, with
freed memory kept mapped as ``mixersnn train`` keeps it (``keep_heap_pages``).
"fwd x" and "step x" are the dense time over the event-driven one (above 1: the kernels pay);
"path" says whether ``spike_linear`` took its kernels ("event") or ``F.linear`` ("dense":
above ``MAX_DENSITY``, or below ``MIN_MACS`` multiply-adds).
The densities where the step ratio falls under 1 are what ``spike_linear.MAX_DENSITY`` (the
switch back to the dense GEMM) is set from; the models' own firing rates are printed by
``--rates`` (at initialisation, from one forward pass).

    .venv/bin/python benchmarks/synapses.py                    # spe_t's shapes, 5 densities
    .venv/bin/python benchmarks/synapses.py --densities 0.05 0.1 --repeats 21
    .venv/bin/python benchmarks/synapses.py --rates            # plus the model's firing rates
    .venv/bin/python benchmarks/synapses.py --smoke            # seconds, for CI
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_medians, write_json  # noqa: E402

from mixersnn.kernels import keep_heap_pages  # noqa: E402
from mixersnn.kernels.spike_linear import (  # noqa: E402
    MAX_DENSITY,
    MIN_MACS,
    SpikeLinear,
    sparse_linear_available,
    spike_linear,
)
from mixersnn.models import create_model  # noqa: E402

#: (M, K, N) of MLP-SPE-T's synapses at 32 px, T=4, batch 8 (channel fc1, fc2, fuse per stage).
SHAPES = [(2048, 78, 234), (2048, 234, 78), (512, 156, 468), (512, 468, 156), (128, 312, 936),
          (128, 936, 312), (32, 624, 1872), (32, 1872, 624)]  # fmt: skip


def firing_rates() -> dict[str, float]:
    """Nonzero fraction of each event-driven layer's input in the ``spe_t`` model at init."""
    torch.manual_seed(0)
    model = create_model("mlp_spe_t", img_size=32, num_classes=10, T=4)
    rates: dict[str, float] = {}
    for name, mod in model.named_modules():
        if hasattr(type(mod), "event_driven") and (isinstance(mod, SpikeLinear) or name.endswith("fuse")):
            def record(m, inp, n=name):  # type: ignore[no-untyped-def]
                rates[n] = float((inp[0] != 0).float().mean())

            mod.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    return rates


def measure(M: int, K: int, N: int, density: float, warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(M * K + N)
    x = (torch.rand(M, K, generator=gen) < density).float()
    w = torch.randn(N, K, generator=gen, requires_grad=True)
    b = torch.randn(N, generator=gen, requires_grad=True)
    xg = x.clone().requires_grad_()
    g = torch.randn(M, N, generator=gen)

    def fwd(fn):  # type: ignore[no-untyped-def]
        return lambda: fn(x, w.detach(), b.detach())

    def step(fn):  # type: ignore[no-untyped-def]
        def run() -> None:
            w.grad = b.grad = xg.grad = None
            fn(xg, w, b).backward(g)
        return run

    event = "_SpikeLinearFnBackward" in type(spike_linear(xg, w, b).grad_fn.next_functions[0][0]).__name__
    med = interleaved_medians({"fwd_sparse": fwd(spike_linear), "fwd_dense": fwd(F.linear),
                               "step_sparse": step(spike_linear), "step_dense": step(F.linear)},
                              torch.device("cpu"), warmup, repeats)  # fmt: skip
    return {"M": M, "K": K, "N": N, "density": density, "measured_density": float(x.mean()), "event_driven": event,
            **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            "fwd_speedup": med["fwd_dense"] / med["fwd_sparse"], "step_speedup": med["step_dense"] / med["step_sparse"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rates", action="store_true", help="also print the spe_t model's firing rates at init")
    ap.add_argument("--smoke", action="store_true", help="two small shapes, two densities, one repeat")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    keep_heap_pages()  # as the training loop does: freed scratch stays mapped between calls
    if not sparse_linear_available():
        raise SystemExit("the cpu kernel library does not load here (see mixersnn.kernels.cpu_unavailable_reason())")
    shapes, densities = SHAPES, args.densities
    if args.smoke:
        shapes, densities, args.repeats, args.warmup = [(512, 64, 256), (128, 260, 260)], [0.1, 0.5], 1, 1
    print(f"threads {torch.get_num_threads()}, MAX_DENSITY {MAX_DENSITY}, MIN_MACS {MIN_MACS}")
    print(f"{'M':>5} {'K':>5} {'N':>5} {'dens':>5} {'fwd dense':>10} {'fwd event':>10} {'fwd x':>6} "
          f"{'step dense':>11} {'step event':>11} {'step x':>7} path")  # fmt: skip
    rows = []
    for M, K, N in shapes:
        for d in densities:
            r = measure(M, K, N, d, args.warmup, args.repeats)
            rows.append(r)
            print(f"{M:5d} {K:5d} {N:5d} {d:5.2f} {r['fwd_dense_ms']:10.3f} {r['fwd_sparse_ms']:10.3f} "
                  f"{r['fwd_speedup']:6.2f} {r['step_dense_ms']:11.3f} {r['step_sparse_ms']:11.3f} {r['step_speedup']:7.2f} "
                  f"{'event' if r['event_driven'] else 'dense'}")  # fmt: skip
    result: dict = {"meta": {"threads": torch.get_num_threads(), "max_density": MAX_DENSITY, "min_macs": MIN_MACS},
                    "rows": rows}  # fmt: skip
    if args.rates:
        rates = firing_rates()
        result["firing_rates"] = rates
        vals = sorted(rates.values())
        print(f"spe_t firing rates at init over {len(vals)} layers: min {vals[0]:.3f}, "
              f"median {vals[len(vals) // 2]:.3f}, max {vals[-1]:.3f}")  # fmt: skip
    write_json(args.json, result)


if __name__ == "__main__":
    main()
