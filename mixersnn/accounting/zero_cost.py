"""SNASNet's sparsity-aware Hamming-kernel score: a zero-cost proxy for untrained Mixer-SNNs.

Kim et al., "Neural Architecture Search for Spiking Neural Networks" (SNASNet, ECCV 2022)
rank candidate SNNs without training: one forward pass of a mini-batch through the randomly
initialised network, the spike pattern of every LIF layer binarised into one code per sample,
and the log-determinant of a kernel that counts how many neurons two samples' codes agree on.
A network whose spikes tell the inputs apart gets a kernel far from rank one and a high score;
one whose neurons are silent (or all fire) gets a near-singular kernel and a low score.

The formula implemented (the one in the authors' search code, which the paper's
"sparsity-aware Hamming distance" describes). Each *code* m is one LIF layer at one time step
(SNASNet hooks single-step neurons, so each hook call is one layer at one step; ours are
multi-step ``[T, B, ...]`` and are split into their T steps, unless ``per_step=False``):

    c_i in {0, 1}^N            sample i's spikes (out > 0), flattened over the layer's neurons
    r_i   = |c_i| / N          its firing rate
    d_ij  = d_H(c_i, c_j) = |c_i| + |c_j| - 2 c_i.c_j
    e_ij  = r_i (1 - r_j) + (1 - r_i) r_j            expected normalised Hamming distance of two
                                                     independent codes with rates r_i, r_j
    K_m[i, j] = N - d_ij * 0.5 / (e_ij + 1e-3)        (the 1e-3 keeps silent pairs finite)
    K = (1 / M) * sum_m K_m                           M = number of codes (layers x steps)
    score = log |det K|                               (numpy/torch slogdet's logabsdet)

The plain SNASNet kernel is ``N - d_ij``; dividing the distance by its expectation under the
two codes' firing rates is the sparsity-aware part: a sparse layer, whose codes differ in few
positions simply because few neurons fire, is not scored as less discriminative than a dense
one (its raw Hamming distances are small, but so is their expectation). The average over M
codes (SNASNet's ``K / num_actfun``) subtracts ``B log M`` from the score, which the authors'
code does; it matters when candidates have different numbers of LIF layers.

Differences from the authors' setup, all deliberate: their repeats draw new mini-batches for one
initialisation, :func:`score_config` draws new initialisations for one batch (a fixed batch
makes candidates comparable); the kernel is accumulated in float64 on the model's device.

Use::

    from mixersnn.accounting.zero_cost import hamming_score, score_config, rank_correlation
    s = score_config(config, images, seed=0, repeats=2)       # higher = predicted better
    rank_correlation(scores, accuracies)                    # {"kendall_tau": ..., ...}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from mixersnn.neurons import LIF

__all__ = ["SPARSITY_EPS", "hamming_kernel", "hamming_score", "score_config", "rank_correlation"]

#: SNASNet's additive constant in the sparsity normaliser (``norm_K + 1e-3``).
SPARSITY_EPS = 1e-3

# Counts in a float32 matmul are exact below 2**24; longer codes use float64.
_FLOAT32_EXACT = 2**24


def _lif_modules(model: nn.Module, layers: Optional[Sequence[Union[str, nn.Module]]]) -> dict[str, nn.Module]:
    """The LIF modules to hook, by module path, in module order."""
    all_lifs = {name: m for name, m in model.named_modules() if isinstance(m, LIF)}
    if not all_lifs:
        raise ValueError(
            f"{type(model).__name__} has no mixersnn.neurons.LIF modules: the Hamming kernel is "
            f"built from LIF spike outputs"
        )
    if layers is None:
        return all_lifs
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_id = {id(m): n for n, m in all_lifs.items()}
    chosen: dict[str, nn.Module] = {}
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"layers: module {type(item).__name__} is not a LIF of this model")
            name = by_id[id(item)]
        else:
            name = str(item)
            if name not in all_lifs:
                known = list(all_lifs)
                raise ValueError(
                    f"layers: {name!r} is not a LIF module path of this model; valid paths "
                    f"({len(known)}) include {known[:6]}"
                )
        chosen[name] = all_lifs[name]
    if not chosen:
        raise ValueError("layers is empty: give at least one LIF module path, or None for all")
    return chosen


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    cfg = getattr(model, "config", None)
    known = cfg is not None and all(hasattr(cfg, k) for k in ("in_chans", "img_size"))
    expected = f"[B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}]" if known else "[B, C, H, W]"
    if images.dim() != 4:
        raise ValueError(f"images must be {expected} with B >= 2, got shape {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(
            f"images has batch size {images.shape[0]}: the Hamming kernel compares samples "
            f"pairwise and needs B >= 2 (SNASNet scores with a mini-batch, e.g. 64-256)"
        )
    if known:
        if tuple(images.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(
                f"images must be {expected} for this model, got shape {tuple(images.shape)}; "
                f"resize the input or build the model with a matching img_size/in_chans"
            )


def _code_kernel(x: torch.Tensor) -> torch.Tensor:
    """Sum over the leading axis of SNASNet's per-code kernels.

    Args:
        x: ``[S, B, N]`` binary codes (S codes of B samples with N neurons each).

    Returns:
        ``[B, B]`` float64: ``sum_s (N - d_H * 0.5 / (e + eps))``.
    """
    S, B, N = x.shape
    dot = torch.bmm(x, x.transpose(1, 2)).double()  # [S, B, B] coincident spikes
    n = x.sum(-1, dtype=torch.float64)  # [S, B] spikes per sample
    d = n.unsqueeze(2) + n.unsqueeze(1) - 2.0 * dot  # Hamming distances
    r = n / N
    e = r.unsqueeze(2) * (1.0 - r.unsqueeze(1)) + (1.0 - r.unsqueeze(2)) * r.unsqueeze(1)
    return (N - d * (0.5 / (e + SPARSITY_EPS))).sum(0)


@torch.no_grad()
def hamming_kernel(
    model: nn.Module,
    images: torch.Tensor,
    *,
    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    per_step: bool = True,
) -> tuple[torch.Tensor, int]:
    """SNASNet's sparsity-aware Hamming kernel of ``model`` on one batch (module docstring).

    One no-grad forward in train mode (BatchNorm on batch statistics, as for an untrained net);
    the model's mode and every buffer (BatchNorm running statistics) are restored afterwards,
    and the hooks are removed even if the forward fails. Each hooked call's spikes are folded
    into the kernel at once, so no more than one layer's codes exist at a time.

    Args:
        model: a network with :class:`mixersnn.neurons.LIF` modules whose outputs are
            ``[T, B, ...]`` (possibly permuted views; only the logical shape matters).
        images: ``[B, C, H, W]``, B >= 2; moved to the model's device and dtype.
        layers: LIF module paths (or the modules) to use; None: every LIF.
        per_step: True (SNASNet): each layer's time step is its own code; False: a layer's
            spike train over all T steps is one code of ``T * N`` bits.

    Returns:
        ``(K, M)``: the ``[B, B]`` float64 kernel, already divided by M, on the model's device,
        and M, the number of codes averaged.

    Raises:
        ValueError: B < 2, images of the wrong shape, no LIF (or an unknown ``layers`` path),
            a hooked output whose dim 1 is not the batch, or no hooked LIF ran.
    """
    _check_images(model, images)
    lifs = _lif_modules(model, layers)
    B = images.shape[0]
    p = next(iter(model.parameters()), None)
    if p is not None:
        images = images.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else images.dtype)
    state = {"K": torch.zeros(B, B, dtype=torch.float64, device=images.device), "M": 0}

    def make_hook(name: str):
        def hook(module: nn.Module, inp: Any, out: Any) -> None:
            if isinstance(out, tuple):
                out = out[0]
            if out.dim() < 2 or out.shape[1] != B:
                raise ValueError(
                    f"LIF {name!r} returned shape {tuple(out.shape)}; expected [T, B={B}, ...] "
                    f"with the batch on dim 1"
                )
            T = out.shape[0]
            spikes = out.detach().movedim(1, 0)  # [B, T, ...]
            if per_step:
                codes = spikes.reshape(B, T, -1).transpose(0, 1)  # [T, B, N]
            else:
                codes = spikes.reshape(1, B, -1)  # [1, B, T*N]
            dtype = torch.float32 if codes.shape[-1] < _FLOAT32_EXACT else torch.float64
            x = (codes > 0).to(dtype)
            state["K"] += _code_kernel(x).to(state["K"].device)
            state["M"] += x.shape[0]

        return hook

    was_training = model.training
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    handles = [m.register_forward_hook(make_hook(n)) for n, m in lifs.items()]
    try:
        model.train()
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for k, b in model.named_buffers():
            if k in saved:
                b.copy_(saved[k])
    if state["M"] == 0:
        raise ValueError(f"none of the hooked LIF modules ran in the forward pass: {list(lifs)[:6]}")
    return state["K"] / state["M"], state["M"]


def hamming_score(
    model: nn.Module,
    images: torch.Tensor,
    *,
    layers: Optional[Sequence[Union[str, nn.Module]]] = None,
    per_step: bool = True,
) -> float:
    """SNASNet's score ``log |det K|`` of ``model`` on ``images`` (higher: better predicted).

    See :func:`hamming_kernel` for ``K`` and the arguments. The log-determinant comes from
    ``torch.linalg.slogdet`` in float64; only the magnitude is used (K is not guaranteed
    positive definite after the sparsity rescaling; SNASNet also keeps only ``logabsdet``).

    Returns:
        The score, or ``-inf`` when K is exactly singular (slogdet's sign is 0: e.g. every
        sample gives identical codes in every layer, as when no neuron ever fires). A nearly
        singular K gives a large negative finite value instead.
    """
    K, _ = hamming_kernel(model, images, layers=layers, per_step=per_step)
    sign, logabsdet = torch.linalg.slogdet(K.cpu())
    value = float(logabsdet)
    if float(sign) == 0.0 or not math.isfinite(value):
        return -math.inf
    return value


def score_config(
    config: Any,
    images: torch.Tensor,
    *,
    seed: int = 0,
    repeats: int = 1,
    per_step: bool = True,
) -> float:
    """Score a candidate :class:`~mixersnn.models.MixerSNNConfig` at random initialisation.

    Builds ``MixerSNN(config)`` ``repeats`` times, initialisation r seeded with ``seed + r``
    (inside :func:`torch.random.fork_rng`, so the caller's RNG state is untouched), scores each
    on the same ``images`` with :func:`hamming_score` and returns the mean (SNASNet averages 2
    repeats). ``-inf`` if any repeat is singular. The model is built on ``images.device``.
    """
    from mixersnn.models import MixerSNN

    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be an integer >= 1")
    if isinstance(config, dict):
        from mixersnn.models import MixerSNNConfig

        config = MixerSNNConfig.from_dict(config)
    scores = []
    for r in range(repeats):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + r)
            model = MixerSNN(config).to(images.device)
        scores.append(hamming_score(model, images, per_step=per_step))
        del model
    return float(sum(scores) / len(scores))


# ---------------------------------------------------------------------------- rank correlation
def _average_ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def _kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b, O(n^2): (C - D) / sqrt((n0 - n1)(n0 - n2))."""
    n = len(a)
    conc = disc = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                ties_a += 1
                ties_b += 1
            elif da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    n0 = n * (n - 1) // 2
    denom = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return (conc - disc) / denom if denom > 0 else math.nan


def rank_correlation(scores: Sequence[float], accuracies: Sequence[float], *, use_scipy: bool = True) -> dict[str, Any]:
    """Kendall's tau-b and Spearman's rho between proxy scores and trained accuracies.

    Pairs where either value is NaN or infinite are dropped first (a singular kernel scores
    ``-inf``; a diverged run has no accuracy). With fewer than 3 pairs left, or when one side is
    constant, the coefficients are NaN.

    Args:
        scores, accuracies: equal-length sequences (one entry per candidate).
        use_scipy: use ``scipy.stats`` when importable (also gives p-values); else (or False) a
            pure-Python tau-b and average-rank Spearman, which agree with scipy's.

    Returns:
        ``{"kendall_tau": float, "spearman_rho": float, "n": int, "kendall_p": float,
        "spearman_p": float}`` (p-values NaN without scipy).
    """
    a = [float(x) for x in scores]
    b = [float(y) for y in accuracies]
    if len(a) != len(b):
        raise ValueError(f"scores ({len(a)}) and accuracies ({len(b)}) must have the same length")
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    out: dict[str, Any] = {"kendall_tau": math.nan, "spearman_rho": math.nan, "n": n,
                           "kendall_p": math.nan, "spearman_p": math.nan}  # fmt: skip
    if n < 3:
        return out
    xs = [p[0] for p in pairs]
    ys = [p[1] for p in pairs]
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return out
    stats = None
    if use_scipy:
        try:
            from scipy import stats  # type: ignore[no-redef]
        except ImportError:
            stats = None
    if stats is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kt = stats.kendalltau(xs, ys)  # tau-b
            sr = stats.spearmanr(xs, ys)
        out.update(kendall_tau=float(kt.statistic), kendall_p=float(kt.pvalue),
                   spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))  # fmt: skip
    else:
        out.update(kendall_tau=_kendall_tau_b(xs, ys), spearman_rho=_pearson(_average_ranks(xs), _average_ranks(ys)))
    return out
