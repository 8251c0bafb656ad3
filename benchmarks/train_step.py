"""Training-step cost of MLP-SPE-T per LIF backend: the kernels inside a real model.

Measured, not asserted. On the CPU: forward + backward milliseconds of
``create_model("mlp_spe_t", img_size=32, num_classes=10, backend=b)`` on a batch of 8 at T=4,
for every CPU backend (the "torch" reference loop and the fused "cpu" kernels), with the same
weights and input, plus the loss difference between backends (a sanity check, not a test),
with the cpu backend's output pool off ("fresh") and on ("pool", the default).
With CUDA: images/s of a full training step (forward, backward, SGD) at 224 px under bf16
autocast, per CUDA backend.

    .venv/bin/python benchmarks/train_step.py
    .venv/bin/python benchmarks/train_step.py --json out.json
    .venv/bin/python benchmarks/train_step.py --smoke      # one repeat, for CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_medians, median_seconds, pool_mode, pool_modes  # noqa: E402

from mixersnn.models import create_model  # noqa: E402
from mixersnn.neurons import available_backends  # noqa: E402


def cpu_rows(args: argparse.Namespace) -> list[dict]:
    """Forward + backward ms on the CPU for each CPU backend (same weights, same batch).

    For each output-pool mode of the cpu backend, the reference and the fused model are timed
    in interleaved rounds (``interleaved_medians``), so each ratio compares steps that ran
    under the same load; the reference row's time is the median over every round.
    """
    device = torch.device("cpu")
    backends = [b for b, r in available_backends("cpu").items() if r is None]
    backends.sort(key=lambda b: (b != "torch", b))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (args.batch,), generator=gen)

    def make_step(backend: str) -> Callable[[], float]:
        torch.manual_seed(0)  # identical weights for every backend
        model = create_model("mlp_spe_t", img_size=32, num_classes=10, T=args.steps, backend=backend)
        model.train()

        def step() -> float:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images).mean(0), labels)
            loss.backward()
            return float(loss.detach())

        return step

    steps = {b: make_step(b) for b in backends}
    losses = {b: fn() for b, fn in steps.items()}
    ref_loss = losses.get("torch")
    fused = [b for b in backends if b != "torch"]
    # The output pool is the cpu backend's; other fused backends are timed once, at "-".
    blocks = [(m, fused) for m in pool_modes(args.pool)] if "cpu" in fused else [(None, fused)]
    rows: list[dict] = []
    ref_times: list[float] = []

    def row(backend: str, label: str, secs: float, ref_s: float | None) -> dict:
        return {
            "device": "cpu",
            "backend": backend,
            "pool": label,
            "img_size": 32,
            "batch": args.batch,
            "ms_fwd_bwd": secs * 1e3,
            "images_per_s": args.batch / secs,
            "vs_reference": None if ref_s is None else ref_s / secs,
            "reference_ms_same_rounds": None if ref_s is None else ref_s * 1e3,
            "loss": losses[backend],
            "loss_diff_vs_reference": None if ref_loss is None else abs(losses[backend] - ref_loss),
        }

    for mode, names in blocks:
        with pool_mode(mode) as label:
            timed = {b: steps[b] for b in ["torch", *names] if b in steps}
            med = interleaved_medians(timed, device, args.warmup, args.repeats)
        ref_s = med.get("torch")
        if ref_s is not None:
            ref_times.append(ref_s)
        rows += [row(b, label if b == "cpu" else "-", med[b], ref_s) for b in names]
    if "torch" in steps:  # timed in every block above
        ref = statistics.median(ref_times)
        rows.insert(0, row("torch", "-", ref, ref))
    return rows


def cuda_rows(args: argparse.Namespace) -> list[dict]:
    """Images/s of a full bf16-autocast training step at 224 px for each CUDA backend."""
    device = torch.device("cuda")
    backends = [b for b, r in available_backends("cuda").items() if r is None]
    backends.sort(key=lambda b: (b != "torch", b))
    images = torch.randn(args.cuda_batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.cuda_batch,), device=device)
    rows: list[dict] = []
    ref_ips = None
    for backend in backends:
        torch.manual_seed(0)
        model = create_model("mlp_spe_t", T=args.steps, backend=backend).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images).mean(0).float(), labels)
            loss.backward()
            opt.step()

        torch.cuda.reset_peak_memory_stats(device)
        secs = median_seconds(step, device, args.warmup, args.repeats)
        ips = args.cuda_batch / secs
        if backend == "torch":
            ref_ips = ips
        rows.append(
            {
                "device": "cuda",
                "backend": backend,
                "img_size": 224,
                "batch": args.cuda_batch,
                "ms_step": secs * 1e3,
                "images_per_s": ips,
                "vs_reference": None if ref_ips is None else ips / ref_ips,
                "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
            }
        )
        del model, opt
        torch.cuda.empty_cache()
    return rows


def print_table(result: dict) -> None:
    print(f"MLP-SPE-T training step, T={result['meta']['steps']} (torch {result['meta']['torch']}, "
          f"{result['meta']['threads']} CPU threads)")  # fmt: skip
    for dev, status in result["meta"]["backends"].items():
        for b, reason in status.items():
            if reason is not None:
                print(f"  {dev}: backend {b!r} skipped: {reason}")
    cpu = [r for r in result["rows"] if r["device"] == "cpu"]
    if cpu:
        print(f"\nCPU, 32 px, batch {cpu[0]['batch']}, forward + backward")
        print(f"{'backend':8} {'pool':6} {'ms':>9} {'img/s':>8} {'vs ref':>7} {'|loss - ref|':>13}")
        for r in cpu:
            ratio = "" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}x"
            diff = "" if r["loss_diff_vs_reference"] is None else f"{r['loss_diff_vs_reference']:.2e}"
            print(f"{r['backend']:8} {r['pool']:6} {r['ms_fwd_bwd']:9.1f} {r['images_per_s']:8.1f} {ratio:>7} {diff:>13}")
        print("vs ref: against the reference timed in the same interleaved rounds (torch's row: the "
              "median over all of them).")
    gpu = [r for r in result["rows"] if r["device"] == "cuda"]
    if gpu:
        print(f"\nCUDA, 224 px, batch {gpu[0]['batch']}, bf16 autocast, forward + backward + SGD")
        print(f"{'backend':8} {'ms':>9} {'img/s':>9} {'vs ref':>7} {'peak GiB':>9}")
        for r in gpu:
            ratio = "" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}x"
            print(f"{r['backend']:8} {r['ms_step']:9.1f} {r['images_per_s']:9.1f} {ratio:>7} {r['peak_mem_GiB']:9.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="time steps T (default 4)")
    ap.add_argument("--batch", type=int, default=8, help="CPU batch (default 8)")
    ap.add_argument("--cuda-batch", type=int, default=64, help="CUDA batch at 224 px (default 64)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is shown")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--cpu-only", action="store_true", help="skip CUDA even if present")
    ap.add_argument(
        "--pool", choices=["both", "fresh", "pool"], default="both",
        help="the cpu backend's output pool: off (fresh), on (pool, the default), or both side by side",
    )  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="batch 2, one repeat (CI)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.cuda_batch, args.repeats, args.warmup = 2, 2, 1, 1
    meta = {
        "steps": args.steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backends": {"cpu": available_backends("cpu")},
    }
    rows = cpu_rows(args)
    if torch.cuda.is_available() and not args.cpu_only:
        meta["backends"]["cuda"] = available_backends("cuda")
        rows += cuda_rows(args)
    result = {"meta": meta, "rows": rows}
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
