"""Training-step throughput against a fixed baseline, the two rows of issue 24, measured side by side.

Measured, not asserted. The baseline is our plain-torch reference: the "torch" LIF backend
(the per-step loop), eager, with torch's default (per-parameter) optimiser; every figure is a
ratio to that reference timed in the same interleaved rounds (``_common.interleaved_medians``),
which cancels the drift of a shared machine. With ``--authors DIR`` (a checkout of the
authors' repository, EMI-Group/mixer-snn, with ``spikingjelly==0.0.0.0.14`` and ``einops``
importable) their own model is timed in the same rounds too, sized like ours for each row (the
parameter counts are printed side by side), and each row says how much faster ours is.

CPU (32 px, same weights and batch for every variant):

- row "spe_t": ``create_model("mlp_spe_t", img_size=32, num_classes=10, T=4)``, batch 8,
  forward + backward (ms); the fused "cpu" backend with its output pool off ("fresh") and on
  ("pool", the default), the same with dense synapses ("dense-synapses": ``F.linear`` where
  the model's event-driven synapses run, so the row shows what ``spike_linear`` adds), plus
  with ``--compile`` the compiled model (one graph) and its blocks compiled one by one
  ("compiled-blocks": a fraction of the compile time).
- row "small": C=24, depths 1-1-2-1, T=2, batch 64, forward + backward + AdamW step
  (images/s); the optimised variant is what ``mixersnn train`` runs (the auto backend and
  ``trainers.loop.build_optimizer``: fused AdamW), plus the compiled variants with ``--compile``.

CUDA (when present): images/s of a full step (forward, backward, SGD) of MLP-SPE-T at 224 px
under bf16 autocast: the reference, the cupy backend eager, and (``--cuda-variants``) the
compiled model as one graph ("compiled") or block by block ("compiled-blocks"), and CUDA
graphs ("reduce-overhead", static shapes) per block ("cudagraphs") or whole
("cudagraphs-model"). A variant whose first steps fail is reported with its error, not fatal.

    .venv/bin/python benchmarks/train_step.py                 # both CPU rows, eager
    .venv/bin/python benchmarks/train_step.py --compile       # plus the compiled model
    .venv/bin/python benchmarks/train_step.py --rows small --repeats 15
    .venv/bin/python benchmarks/train_step.py --smoke         # one repeat, tiny batches (CI)
    .venv/bin/python benchmarks/train_step.py --authors ~/src/mixer-snn   # against the authors' code
    .venv/bin/python benchmarks/train_step.py --cuda-only --compile --json out.json  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, interleaved_medians, pool_mode, pool_modes, write_json  # noqa: E402

from mixersnn.kernels import keep_heap_pages  # noqa: E402
from mixersnn.kernels.spike_linear import set_event_driven  # noqa: E402
from mixersnn.models import create_model  # noqa: E402
from mixersnn.models.mixer_snn import compile_model, compile_unavailable_reason  # noqa: E402
from mixersnn.neurons import available_backends  # noqa: E402

# The two CPU rows: model overrides, batch, whether the step includes the optimiser.
ROWS = {
    "spe_t": dict(overrides=dict(img_size=32, num_classes=10, T=4), batch=8, optimizer=False),
    "small": dict(overrides=dict(img_size=32, num_classes=10, T=2, embed_dim=24, depths=(1, 1, 2, 1)),
                  batch=64, optimizer=True),
}  # fmt: skip


def _train_config(lr: float):  # type: ignore[no-untyped-def]
    """What ``mixersnn train`` would build its optimiser from (AdamW, fused where torch has it)."""
    from trainers.config import TrainConfig

    return TrainConfig(optimizer="adamw", lr=lr)


def make_step(row: str, backend: str, *, fast: bool, compiled: Optional[str], images: torch.Tensor,
              labels: torch.Tensor, T: Optional[int] = None,
              event_driven: bool = True) -> tuple[Callable[[], float], torch.nn.Module]:  # fmt: skip
    """A closure running one training step of ``row``'s model; returns (step, model).

    ``fast`` picks the loop's fused optimiser (else torch's default AdamW); ``compiled`` (a
    scope, "model" or "blocks") wraps the model in :func:`compile_model` (a failure raises);
    ``event_driven`` False gives a fused-backend model dense synapses (``F.linear``).
    """
    spec = ROWS[row]
    over = dict(spec["overrides"])
    if T is not None:
        over["T"] = T
    torch.manual_seed(0)  # identical weights for every variant
    model = create_model("mlp_spe_t", backend=backend, **over).train()
    if not event_driven:
        set_event_driven(model, False)
    opt = None
    if spec["optimizer"]:
        from trainers.loop import build_optimizer

        opt = build_optimizer(model, _train_config(1e-3)) if fast else torch.optim.AdamW(model.parameters(), lr=1e-3)
    fwd = compile_model(model, device_type="cpu", scope=compiled) if compiled else model

    def step() -> float:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(images).mean(0), labels)
        loss.backward()
        if opt is not None:
            opt.step()
        return float(loss.detach())

    return step, model


#: The authors' multi-step Mixer-SNN in their repository (EMI-Group/mixer-snn), the variant built
#: from SpikingJelly's multi-step layers (their ``mixers_sparse_patchcell.py`` uses torch's
#: BatchNorm on 5-D input and does not run in multi-step mode).
AUTHORS_MODULE = "models.mixers_sparse_patchcell_origin"


def make_authors_step(row: str, authors_dir: Path, *, images: torch.Tensor, labels: torch.Tensor,
                      T: Optional[int] = None) -> tuple[Callable[[], float], torch.nn.Module]:  # fmt: skip
    """The authors' code for ``row``: their ``sMLPNet`` from a checkout of their repository at
    ``authors_dir`` (SpikingJelly and einops importable), sized like our model for the row, in
    SpikingJelly's multi-step mode, stepped as their training script does (the batch repeated
    over T, the T-averaged output, torch's default AdamW, ``functional.reset_net`` after)."""
    import importlib

    if str(authors_dir) not in sys.path:
        sys.path.insert(0, str(authors_dir))
    try:
        from spikingjelly.activation_based import functional
        net_cls = importlib.import_module(AUTHORS_MODULE).sMLPNet
    except ImportError as err:
        raise SystemExit(f"--authors {authors_dir}: cannot import the authors' model ({err}); it needs a checkout of "
                         f"EMI-Group/mixer-snn holding {AUTHORS_MODULE.replace('.', '/')}.py, and "
                         "`pip install spikingjelly==0.0.0.0.14 einops`") from None
    over = dict(ROWS[row]["overrides"], **({"T": T} if T is not None else {}))
    c = create_model("mlp_spe_t", **over).config
    torch.manual_seed(0)
    if not float(c.mlp_ratio).is_integer():
        raise SystemExit(f"--authors: their sMLPNet takes an integer MLP ratio; row {row!r} has {c.mlp_ratio}")
    net = net_cls(in_channels=3, dim=c.embed_dim, alpha=int(c.mlp_ratio), num_classes=c.num_classes,
                  patch_size=c.patch_size, image_size=c.img_size, depths=list(c.depths)).train()
    functional.set_step_mode(net, "m")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3) if ROWS[row]["optimizer"] else None

    def step() -> float:
        (opt or net).zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(images.unsqueeze(0).repeat(c.T, 1, 1, 1, 1)).mean(0), labels)
        loss.backward()
        if opt is not None:
            opt.step()
        functional.reset_net(net)
        return float(loss.detach())

    return step, net


def _row_dict(row: str, variant: str, backend: str, pool: str, secs: float, ref_s: Optional[float],
              batch: int, loss: float, ref_loss: Optional[float], first_s: Optional[float] = None) -> dict:  # fmt: skip
    return {
        "device": "cpu",
        "row": row,
        "variant": variant,
        "backend": backend,
        "pool": pool,
        "img_size": 32,
        "batch": batch,
        "ms_step": secs * 1e3,
        "ms_fwd_bwd": secs * 1e3,  # the older key (row spe_t has no optimiser step)
        "images_per_s": batch / secs,
        "vs_reference": None if ref_s is None else ref_s / secs,
        "reference_ms_same_rounds": None if ref_s is None else ref_s * 1e3,
        "loss": loss,
        "loss_diff_vs_reference": None if ref_loss is None else abs(loss - ref_loss),
        "first_step_s": first_s,
    }


def cpu_rows(args: argparse.Namespace) -> list[dict]:
    """Every requested CPU row: the reference and the optimised variants, interleaved."""
    rows: list[dict] = []
    fused_ok = available_backends("cpu").get("cpu") is None
    compile_reason = compile_unavailable_reason("cpu") if args.compile else None
    if compile_reason is not None:
        print(f"  --compile skipped on cpu: {compile_reason}")
    for row in args.rows:
        batch = args.batch if args.batch is not None else ROWS[row]["batch"]
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 10, (batch,), generator=gen)
        T = args.steps
        # name -> (backend, fast optimiser, compile scope or None, event-driven synapses)
        variants: dict[str, tuple[str, bool, Optional[str], bool]] = {"reference": ("torch", False, None, False)}
        if fused_ok:
            variants["eager"] = ("cpu", True, None, True)
            variants["dense-synapses"] = ("cpu", True, None, False)  # what the synapse kernels add
            if args.compile and compile_reason is None:
                variants["compiled"] = ("cpu", True, "model", True)
                variants["compiled-blocks"] = ("cpu", True, "blocks", True)
        makers = {name: partial(make_step, row, backend, fast=fast, compiled=compiled, event_driven=event)
                  for name, (backend, fast, compiled, event) in variants.items()}
        if args.authors is not None:
            variants["authors"] = ("sj", False, None, False)
            makers["authors"] = partial(make_authors_step, row, args.authors)
        steps, losses, first, params = {}, {}, {}, {}
        for name, make in makers.items():
            fn, model = make(images=images, labels=labels, T=T)
            t0 = time.perf_counter()
            losses[name] = fn()  # the first step (compiles when compiled), then the timed ones
            first[name] = time.perf_counter() - t0
            steps[name], params[name] = fn, sum(p.numel() for p in model.parameters())
        # The first losses are all taken before any optimiser step: same weights, same batch.
        ref_loss = losses["reference"]
        ref_times: list[float] = []
        out: list[dict] = []
        timed_pools = pool_modes(args.pool) if "eager" in steps else [None]
        for mode in timed_pools:
            with pool_mode(mode) as label:
                # The compiled variants are timed with the pool at its default only.
                names = [n for n in steps if mode in (None, "pool") or n in ("reference", "eager")]
                med = interleaved_medians({n: steps[n] for n in names}, torch.device("cpu"), args.warmup, args.repeats)
            ref_times.append(med["reference"])
            # The authors' model has its own initialisation: no loss to compare with the reference's.
            out += [_row_dict(row, n, variants[n][0], label, med[n], med["reference"], batch, losses[n],
                              None if n == "authors" else ref_loss, first[n]) | {"num_params": params[n]}
                    for n in names if n != "reference"]  # fmt: skip
            if "authors" in med:
                for d in out[-(len(names) - 1):]:
                    d["vs_authors"] = med["authors"] / med[d["variant"]]
        ref = statistics.median(ref_times)
        rows.append(_row_dict(row, "reference", "torch", "-", ref, ref, batch, ref_loss, ref_loss, first["reference"])
                    | {"num_params": params["reference"]})
        rows += out
    return rows


def cuda_rows(args: argparse.Namespace) -> list[dict]:
    """Images/s of a full bf16-autocast training step at 224 px: reference, eager, compiled."""
    device = torch.device("cuda")
    status = available_backends("cuda")
    images = torch.randn(args.cuda_batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.cuda_batch,), device=device)
    # name -> (backend, torch.compile mode or None, scope)
    variants: dict[str, tuple[str, Optional[str], str]] = {}
    if "reference" in args.cuda_variants:
        variants["reference"] = ("torch", None, "model")
    fused = "cupy" if status.get("cupy") is None else None
    if fused is None:
        print(f"  cuda: backend 'cupy' unavailable: {status.get('cupy')}; optimised rows use 'auto'")
    compiled_kinds = {  # variant -> (mode, scope); CUDA graphs per block: the quick compile
        "compiled": ("default", "model"),
        "compiled-blocks": ("default", "blocks"),
        "cudagraphs": ("reduce-overhead", "blocks"),
        "cudagraphs-model": ("reduce-overhead", "model"),
    }
    for v in args.cuda_variants:
        if v == "eager":
            variants[v] = (fused or "auto", None, "model")
        elif v in compiled_kinds:
            reason = compile_unavailable_reason("cuda")
            if reason is not None:
                print(f"  cuda: {v} skipped: {reason}")
                continue
            variants[v] = (fused or "auto", *compiled_kinds[v])
    steps: dict[str, Callable[[], None]] = {}
    rows: list[dict] = []
    for name, (backend, mode, scope) in variants.items():
        torch.manual_seed(0)
        model = create_model("mlp_spe_t", T=args.steps, backend=backend).to(device).train()
        fast = name != "reference"
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, **({"fused": True} if fast else {}))
        fwd = compile_model(model, mode=mode, device_type="cuda", scope=scope) if mode else model

        def step(model=model, opt=opt, fwd=fwd, graphs=mode == "reduce-overhead") -> None:  # type: ignore[no-untyped-def]
            if graphs:  # a new training iteration: CUDA graph outputs of the last one are free
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(fwd(images).mean(0).float(), labels)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        try:
            for _ in range(3 if mode == "reduce-overhead" else 1):  # CUDA graphs record on the 3rd
                step()
            torch.cuda.synchronize(device)
        except Exception as err:  # noqa: BLE001 - report the variant's failure, keep the others
            traceback.print_exc()
            rows.append({"device": "cuda", "variant": name, "backend": backend, "error": f"{type(err).__name__}: {err}"[:2000]})
            continue
        first = time.perf_counter() - t0
        steps[name] = step
        rows.append({"device": "cuda", "variant": name, "backend": backend, "mode": mode or "eager", "scope": scope,
                     "img_size": 224, "batch": args.cuda_batch, "first_steps_s": first})  # fmt: skip
    if not steps:
        return rows
    torch.cuda.reset_peak_memory_stats(device)
    med = interleaved_medians(steps, device, args.warmup, args.repeats)
    ref_s = med.get("reference")
    for r in rows:
        if r["variant"] in med:
            s = med[r["variant"]]
            r.update(ms_step=s * 1e3, images_per_s=args.cuda_batch / s,
                     vs_reference=None if ref_s is None else ref_s / s)  # fmt: skip
    rows.append({"device": "cuda", "variant": "-", "peak_mem_GiB_all_variants": torch.cuda.max_memory_allocated(device) / 2**30})
    return rows


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"Training step (torch {meta['torch']}, {meta['threads']} CPU threads); baseline: the 'torch' "
          f"LIF backend, eager, default optimiser, timed in the same interleaved rounds; freed host memory "
          + ("kept mapped (keep_heap_pages)" if meta.get("heap_kept") else "returned as glibc decides"))  # fmt: skip
    cpu = [r for r in result["rows"] if r["device"] == "cpu"]
    for row in dict.fromkeys(r["row"] for r in cpu):
        rs = [r for r in cpu if r["row"] == row]
        what = "forward + backward" if not ROWS[row]["optimizer"] else "forward + backward + AdamW"
        print(f"\nCPU row {row!r}: 32 px, batch {rs[0]['batch']}, {what}")
        print(f"{'variant':15} {'backend':8} {'pool':6} {'ms':>9} {'img/s':>8} {'vs ref':>7} {'|loss-ref|':>11} {'1st step s':>10}")
        for r in rs:
            ratio = "" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}x"
            diff = "" if r["loss_diff_vs_reference"] is None else f"{r['loss_diff_vs_reference']:.1e}"
            first = "" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}"
            print(f"{r['variant']:15} {r['backend']:8} {r['pool']:6} {r['ms_step']:9.1f} {r['images_per_s']:8.1f} "
                  f"{ratio:>7} {diff:>11} {first:>10}")  # fmt: skip
        for r in rs:
            if r.get("vs_authors") is not None and r["variant"] != "authors":
                print(f"  {r['variant']} ({r['pool']}) vs the authors' code (sj, same rounds): {r['vs_authors']:.2f}x")
        auth = [r for r in rs if r["variant"] == "authors"]
        if auth:
            print(f"  parameters: authors' {auth[0]['num_params']:,}, ours {rs[0]['num_params']:,}")
    gpu = [r for r in result["rows"] if r["device"] == "cuda" and r.get("variant") != "-"]
    if gpu:
        print("\nCUDA, 224 px, MLP-SPE-T, bf16 autocast, forward + backward + SGD")
        print(f"{'variant':16} {'backend':8} {'ms':>9} {'img/s':>9} {'vs ref':>7} {'first s':>8}")
        for r in gpu:
            if "error" in r:
                print(f"{r['variant']:16} {r['backend']:8} failed: {r['error'][:200]}")
                continue
            if "ms_step" not in r:
                continue
            ratio = "" if r.get("vs_reference") is None else f"{r['vs_reference']:.2f}x"
            print(f"{r['variant']:16} {r['backend']:8} {r['ms_step']:9.1f} {r['images_per_s']:9.1f} {ratio:>7} {r['first_steps_s']:8.1f}")
        peak = [r for r in result["rows"] if r.get("variant") == "-"]
        if peak:
            print(f"peak GPU memory over all variants: {peak[0]['peak_mem_GiB_all_variants']:.1f} GiB")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="CPU rows (default both)")
    ap.add_argument("--steps", type=int, default=None, help="time steps T (default: each row's own, 4 and 2)")
    ap.add_argument("--batch", type=int, default=None, help="CPU batch (default: each row's own, 8 and 64)")
    ap.add_argument("--cuda-batch", type=int, default=64, help="CUDA batch at 224 px (default 64)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is shown")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd model")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--cpu-only", action="store_true", help="skip CUDA even if present")
    ap.add_argument("--cuda-only", action="store_true", help="skip the CPU rows")
    ap.add_argument("--cuda-variants", nargs="+",
                    choices=["reference", "eager", "compiled", "compiled-blocks", "cudagraphs", "cudagraphs-model"],
                    default=None, help="CUDA variants (default: reference eager, plus compiled-blocks and "
                    "cudagraphs (per block) with --compile)")  # fmt: skip
    ap.add_argument("--authors", type=Path, default=None, metavar="DIR",
                    help="also time the authors' code in the same rounds: a checkout of EMI-Group/mixer-snn (needs "
                    "spikingjelly==0.0.0.0.14 and einops); each row then says how much faster ours is")
    ap.add_argument("--heap", choices=["keep", "default"], default="keep",
                    help="keep freed host memory mapped, as mixersnn train does on the CPU (keep_heap_pages), or "
                    "leave glibc's malloc at its defaults (the process-wide setting applies to every variant)")
    add_common_args(ap, smoke_help="batch 2, one repeat (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.cuda_batch, args.repeats, args.warmup = 2, 2, 1, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cuda_variants is None:
        args.cuda_variants = ["reference", "eager"] + (["compiled-blocks", "cudagraphs"] if args.compile else [])
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "heap_kept": keep_heap_pages() if args.heap == "keep" else False,
        "steps": args.steps,
        "backends": {"cpu": available_backends("cpu")},
    }
    rows = [] if args.cuda_only else cpu_rows(args)
    if torch.cuda.is_available() and not args.cpu_only:
        meta["backends"]["cuda"] = available_backends("cuda")
        meta["steps"] = args.steps or 4
        args.steps = args.steps or 4
        rows += cuda_rows(args)
    result = {"meta": meta, "rows": rows}
    print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
