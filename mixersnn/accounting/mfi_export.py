"""Export to a multiplication-free inference (MFI) model: every BatchNorm folded away.

Folding (design doc section 6), with ``BN(y) = a * y + b``, ``a = gamma / sqrt(var + eps)``,
``b = beta - a * mean`` from the running statistics:

* conv/linear + per-output-channel BN (stage-1 patch conv, SPE ``down``/``conv12``/``conv23``,
  MLP-S downsampling, ``proj_h``/``proj_w`` whose BN runs over their output channels = the H or
  W positions, ``fuse``): ``W' = a W`` per output channel, ``bias' = a * bias + b``;
* channel-MLP BN1d over the N token positions: the linear's weight is shared by all tokens, so
  the per-token factor cannot enter it; it stays as a per-token scale and shift
  (:class:`TokenAffine`, N scales and N shifts, design doc: "a per-token scale and bias");
* MLP-S identity BN on spikes: ``a x + b`` with x in {0, 1} is a per-channel choice between
  two constants (:class:`SpikeSelect`), no multiply;
* head BN + spatial mean of P = H*W positions: ``logits = (W a / P) sum_p x + (W b + bias)``,
  a classifier on spike counts.

Exactness. The folded network computes the same real-number function, but in floating point
``sum(a W x)`` and ``a * sum(W x)`` round differently, so a membrane within rounding error of
the threshold can fire in one model and not the other. Folding is therefore done in float64,
and the MFI model runs in float64 by default: compared with the eval-mode model cast to
float64, both are within ~1e-16 of the exact values and every spike agrees (tested on real
Fashion-MNIST batches). In float32 the logits agree to float tolerance while a handful of
spikes per million can flip; :func:`compare_spikes` measures that.

Module paths of the Conv/Linear layers and the LIF neurons are the same as in
:class:`~mixersnn.models.MixerSNN`, so the accounting tables and spike hooks line up.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from mixersnn._atomic import atomic_path
from mixersnn.layers.common import NeuronFactory, fold, unfold
from mixersnn.layers.spiking_patch_encoding import SpikingPatchEncoding
from mixersnn.models.config import MixerSNNConfig
from mixersnn.models.mixer_snn import MixerSNN, build_stages
from mixersnn.neurons import LIF

__all__ = [
    "MFI_FORMAT",
    "FoldedConv",
    "TokenAffine",
    "SpikeSelect",
    "MFIPatchEmbed",
    "MFISpikingPatchEncoding",
    "MFITokenBlock",
    "MFIChannelBlock",
    "MFIClassifierHead",
    "MFIMixerSNN",
    "fold_mfi",
    "save_mfi",
    "load_mfi",
    "compare_spikes",
]

MFI_FORMAT = "mixersnn-mfi/1"


# ============================================================================ modules
class FoldedConv(nn.Module):
    """Conv2d with bias (a conv + BN pair after folding) on ``[T, B, C, H, W]``, T folded.

    Keeps the ``.conv`` attribute so module paths match :class:`~mixersnn.layers.ConvBN`.
    """

    def __init__(self, in_ch: int, out_ch: int, *, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unfold(self.conv(fold(x)), x.shape[0])


class TokenAffine(nn.Module):
    """Per-token scale and shift, ``y[m, n, :] * scale[n] + shift[n]`` on ``[M, N, F]``.

    What a BatchNorm1d over token positions becomes at inference: its factor differs per
    token while the preceding linear's weight is shared by all tokens, so it cannot fold into
    the weight without N copies of it.

    Args:
        num_tokens: N.
    """

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_tokens), requires_grad=False)
        self.shift = nn.Parameter(torch.zeros(num_tokens), requires_grad=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale[:, None] + self.shift[:, None]


class SpikeSelect(nn.Module):
    """Per-channel affine of binary input as a choice: ``on[c]`` where x = 1, else ``off[c]``.

    What MLP-S's identity BatchNorm on spikes becomes: no multiply at inference.

    Args:
        dim: channels C (axis 1 of the input ``[M, C, H, W]``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.on = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.off = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.where(x != 0, self.on.view(shape), self.off.view(shape))


class MFIPatchEmbed(nn.Module):
    """Stage-1 patch conv with folded BN; runs once per image and is broadcast over T."""

    def __init__(self, *, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=True)

    def forward(self, img: torch.Tensor, T: int) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> ``[T, B, C, H/p, W/p]`` (a broadcast view)."""
        y = self.conv(img)
        return y.unsqueeze(0).expand(T, *y.shape)


def MFISpikingPatchEncoding(*, in_dim: int, out_dim: int, neuron: NeuronFactory) -> SpikingPatchEncoding:
    """SPE with its three ConvBN units folded: :class:`~mixersnn.layers.SpikingPatchEncoding`
    built on :class:`FoldedConv`."""
    return SpikingPatchEncoding(in_dim=in_dim, out_dim=out_dim, neuron=neuron, conv=FoldedConv)


class MFITokenBlock(nn.Module):
    """Token block with ``bn_h``/``bn_w``/``bn`` folded into ``proj_h``/``proj_w``/``fuse``."""

    def __init__(self, *, dim: int, grid: int, neuron: NeuronFactory, identity_bn: bool = False) -> None:
        super().__init__()
        self.proj_h = nn.Conv2d(grid, grid, 1, bias=True)
        self.lif_h = neuron()
        self.proj_w = nn.Conv2d(grid, grid, 1, bias=True)
        self.lif_w = neuron()
        self.identity_bn_on = identity_bn
        if identity_bn:
            self.identity_select = SpikeSelect(dim)
            self.identity_lif = neuron()
        self.fuse = nn.Conv2d(3 * dim, dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` spikes -> ``[T, B, C, H, W]`` real."""
        T = x.shape[0]
        xf = fold(x)
        x_h = self.lif_h(unfold(self.proj_h(xf.transpose(1, 2)), T)).transpose(2, 3)
        x_w = self.lif_w(unfold(self.proj_w(xf.permute(0, 3, 2, 1)), T)).permute(0, 1, 4, 3, 2)
        ident = self.identity_lif(unfold(self.identity_select(xf), T)) if self.identity_bn_on else x
        cat = torch.cat((fold(ident), fold(x_h), fold(x_w)), dim=1)
        return unfold(self.fuse(cat), T)


class MFIChannelBlock(nn.Module):
    """Channel MLP with its token-position BN1d layers as :class:`TokenAffine`."""

    def __init__(self, *, dim: int, hidden: int, num_tokens: int, neuron: NeuronFactory) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.affine1 = TokenAffine(num_tokens)
        self.lif = neuron()
        self.fc2 = nn.Linear(hidden, dim)
        self.affine2 = TokenAffine(num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        tok = fold(x).flatten(2).transpose(1, 2)  # [T*B, N, C]
        y = self.lif(unfold(self.affine1(self.fc1(tok)), T))
        y = self.affine2(self.fc2(fold(y)))
        return unfold(y.transpose(1, 2).reshape(T * B, C, H, W), T)


class MFIClassifierHead(nn.Module):
    """Classifier on per-channel spike counts (head BN and the 1/HW mean folded into ``fc``)."""

    def __init__(self, *, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` spikes -> ``[T, B, K]``."""
        return unfold(self.fc(fold(x).sum(dim=(2, 3))), x.shape[0])


class MFIMixerSNN(nn.Module):
    """The inference-only Mixer-SNN: no BatchNorm, same LIF/Conv/Linear module paths.

    Built empty from a config; :func:`fold_mfi` fills it from a trained model and
    :func:`load_mfi` from a file. Images ``[B, C, H, W]`` -> per-step logits ``[T, B, K]``.

    Args:
        config: the architecture of the model it was folded from.
    """

    def __init__(self, config: MixerSNNConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config

        self.stages = build_stages(
            config, neuron=functools.partial(LIF, **config.neuron.to_dict()), token_block=MFITokenBlock,
            channel_block=MFIChannelBlock, patch_embed=MFIPatchEmbed, spe_embed=MFISpikingPatchEncoding,
            downsample=lambda in_dim, out_dim, grid: FoldedConv(in_dim, out_dim, kernel_size=2, stride=2,
                                                                padding=grid % 2))
        self.head = MFIClassifierHead(dim=config.widths[-1], num_classes=config.num_classes)
        self.requires_grad_(False)

    @property
    def T(self) -> int:
        return self.config.T

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if img.dim() != 4 or tuple(img.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(
                f"expected images [B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}], got "
                f"{tuple(img.shape)}; an MFI model is tied to the resolution it was folded at"
            )
        x = self.stages[0](img, cfg.T)
        for stage in self.stages[1:]:
            x = stage(x)
        return self.head(x)


# ============================================================================ folding
def _bn_affine(bn: nn.modules.batchnorm._BatchNorm, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` in float64 with ``BN_eval(y) = a * y + b``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{name} has no running statistics (track_running_stats=False), so it normalises "
            f"with batch statistics at inference and cannot be folded; train with running stats"
        )
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - a * mean


def _fold_into(dst: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.Module, name: str) -> None:
    """``dst.weight = a W`` (per output channel, axis 0), ``dst.bias = a * bias + b``."""
    a, b = _bn_affine(bn, name)
    w = weight.detach().double()
    dst.weight.data = (w * a.view(-1, *([1] * (w.dim() - 1)))).to(dst.weight.dtype)
    b0 = bias.detach().double() if bias is not None else torch.zeros_like(a)
    dst.bias.data = (a * b0 + b).to(dst.bias.dtype)


@torch.no_grad()
def fold_mfi(model: MixerSNN, *, dtype: torch.dtype = torch.float64) -> MFIMixerSNN:
    """Fold every BatchNorm of ``model`` (eval-mode statistics) into an :class:`MFIMixerSNN`.

    Args:
        model: a :class:`~mixersnn.models.MixerSNN` with the default block types; left unchanged.
        dtype: dtype of the returned model. The arithmetic is float64 either way; float64
            (default) keeps every spike identical to the eval-mode model's (see module doc).

    Returns:
        The folded model in eval mode, on the CPU, with no BatchNorm module.
    """
    if not isinstance(model, MixerSNN):
        raise TypeError(f"fold_mfi needs a mixersnn MixerSNN, got {type(model).__name__}")
    cfg = model.config
    out = MFIMixerSNN(cfg).to(torch.float64)
    for s, (src, dst) in enumerate(zip(model.stages, out.stages)):
        pre = f"stages.{s}"
        if s == 0:
            _fold_into(dst.embed.conv, src.embed.conv.weight, None, src.embed.bn, f"{pre}.embed.bn")
        elif cfg.spe:
            for unit in ("down", "conv12", "conv23"):
                u_src, u_dst = getattr(src.embed, unit), getattr(dst.embed, unit)
                _fold_into(u_dst.conv, u_src.conv.weight, None, u_src.bn, f"{pre}.embed.{unit}.bn")
        else:
            _fold_into(dst.embed.conv, src.embed.conv.weight, None, src.embed.bn, f"{pre}.embed.bn")
        for b, (bs, bd) in enumerate(zip(src.blocks, dst.blocks)):
            blk = f"{pre}.blocks.{b}"
            ts, td = bs.token, bd.token
            _fold_into(td.proj_h, ts.proj_h.weight, ts.proj_h.bias, ts.bn_h, f"{blk}.token.bn_h")
            _fold_into(td.proj_w, ts.proj_w.weight, ts.proj_w.bias, ts.bn_w, f"{blk}.token.bn_w")
            _fold_into(td.fuse, ts.fuse.weight, None, ts.bn, f"{blk}.token.bn")
            if ts.identity_bn_on:
                a, c = _bn_affine(ts.identity_bn, f"{blk}.token.identity_bn")
                td.identity_select.on.data = a + c  # BN(1)
                td.identity_select.off.data = c  # BN(0)
            cs, cd = bs.channel, bd.channel
            for fc, bn, aff in (("fc1", "bn1", "affine1"), ("fc2", "bn2", "affine2")):
                getattr(cd, fc).weight.data = getattr(cs, fc).weight.detach().double()
                getattr(cd, fc).bias.data = getattr(cs, fc).bias.detach().double()
                a, c = _bn_affine(getattr(cs, bn), f"{blk}.channel.{bn}")
                getattr(cd, aff).scale.data = a
                getattr(cd, aff).shift.data = c
    # Head: logits = W (a * mean_p x + b) + bias = (W a / P) sum_p x + (W b + bias).
    a, c = _bn_affine(model.head.bn, "head.bn")
    P = cfg.grids[-1] ** 2
    W = model.head.fc.weight.detach().double()
    out.head.fc.weight.data = W * (a / P)[None, :]
    out.head.fc.bias.data = model.head.fc.bias.detach().double() + W @ c
    return out.to(dtype).eval()


# ============================================================================ files
def save_mfi(path: Union[str, Path], model: MFIMixerSNN, *, overwrite: bool = False, **meta: str) -> Path:
    """Write ``model`` as safetensors with its config in the metadata, atomically.

    Args:
        path: output file (conventionally ``*.safetensors``).
        model: the folded model.
        overwrite: replace an existing file; without it an existing ``path`` is an error.
        **meta: extra string metadata (e.g. ``source="ckpt.pt"``).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": MFI_FORMAT, "config": json.dumps(model.config.to_dict())}
    metadata.update({k: str(v) for k, v in meta.items()})
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} appeared while writing; pass overwrite=True to replace it")
    return path


def load_mfi(path: Union[str, Path], **neuron_overrides: Any) -> MFIMixerSNN:
    """Rebuild an :class:`MFIMixerSNN` from :func:`save_mfi`'s file (no pickle involved).

    Args:
        path: the safetensors file.
        **neuron_overrides: e.g. ``backend="torch"``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MFI model {path} does not exist; write one with `mixersnn export --mfi`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MFI_FORMAT or "config" not in meta:
        raise ValueError(
            f"{path} is not a mixersnn MFI export (metadata format {meta.get('format')!r}, "
            f"expected {MFI_FORMAT!r}); write it with mixersnn.accounting.save_mfi"
        )
    cfg = MixerSNNConfig.from_dict(json.loads(meta["config"])).replace(**neuron_overrides)
    state = load_file(str(path))
    dtype = next(iter(state.values())).dtype
    model = MFIMixerSNN(cfg).to(dtype)
    model.load_state_dict(state)
    return model.eval()


# ============================================================================ checks
@torch.no_grad()
def compare_spikes(a: nn.Module, b: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Run two models with the same LIF module paths and compare every LIF's output spikes.

    Args:
        a, b: e.g. the eval-mode model and its folded MFI model (each in its own dtype).
        images: ``[B, C, H, W]``; cast to each model's dtype.

    Returns:
        ``{"layers": n, "spikes": total spike-tensor elements, "mismatched": elements that
        differ, "per_layer": {name: mismatches}, "fired": {name: spikes emitted by ``a``},
        "logits_max_abs_diff": float,
        "logits_a": [T, B, K], "logits_b": [T, B, K]}``.
    """

    def record(model: nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        spikes: dict[str, torch.Tensor] = {}
        handles = [
            m.register_forward_hook(lambda mod, inp, out, n=n: spikes.__setitem__(n, out.detach().clone()))
            for n, m in model.named_modules()
            if isinstance(m, LIF)
        ]
        was = model.training
        model.eval()
        try:
            p = next(model.parameters())
            logits = model(images.to(device=p.device, dtype=p.dtype))
        finally:
            model.train(was)
            for h in handles:
                h.remove()
        return spikes, logits

    sa, la = record(a)
    sb, lb = record(b)
    if sa.keys() != sb.keys():
        missing = sorted(set(sa) ^ set(sb))
        raise ValueError(f"the two models' LIF layers differ: {missing[:5]} ... are not in both")
    per_layer = {n: int((sa[n].double() != sb[n].double()).sum().item()) for n in sa}
    return {
        "layers": len(sa),
        "spikes": sum(v.numel() for v in sa.values()),
        "mismatched": sum(per_layer.values()),
        "per_layer": per_layer,
        "fired": {n: int(sa[n].sum().item()) for n in sa},
        "logits_max_abs_diff": float((la.double() - lb.double()).abs().max().item()),
        "logits_a": la,
        "logits_b": lb,
    }
