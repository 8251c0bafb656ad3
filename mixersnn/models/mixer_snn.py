"""The Mixer-SNN network: stages of spiking token/channel blocks (design doc section 4)."""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import warnings
from typing import Callable, Optional, Type, Union

import torch
from torch import nn

from mixersnn.kernels.spike_linear import set_event_driven
from mixersnn.layers import (
    ClassifierHead,
    ConvDownsample,
    NeuronFactory,
    PatchEmbed,
    SpikingChannelBlock,
    SpikingPatchEncoding,
    SpikingTokenBlock,
)
from mixersnn.models.config import MixerSNNConfig
from mixersnn.neurons import LIF

__all__ = ["MixerSNN", "MixerBlock", "Stage", "build_stages", "CompiledModel", "compile_model", "compile_unavailable_reason"]

#: ``torch.compile`` modes ``compile_model`` accepts (True means "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class MixerBlock(nn.Module):
    """One block; blocks chain only through spikes and re-use the stage input ``h``.

        u = TokenBlock(x);  x = LIF(h + u);  x = LIF(h + u + ChannelBlock(x))
    """

    def __init__(self, *, token: nn.Module, channel: nn.Module, neuron: NeuronFactory) -> None:
        super().__init__()
        self.token = token
        self.lif_token = neuron()
        self.channel = channel
        self.lif_channel = neuron()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        u = h + self.token(x)
        x = self.lif_token(u)
        return self.lif_channel(u + self.channel(x))


class Stage(nn.Module):
    """``h = Embed(x_in); x = LIF(h); x = block(x, h) for each block``."""

    def __init__(self, *, embed: nn.Module, blocks: list[MixerBlock], neuron: NeuronFactory) -> None:
        super().__init__()
        self.embed = embed
        self.lif = neuron()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x_in: torch.Tensor, T: Optional[int] = None) -> torch.Tensor:
        h = self.embed(x_in) if T is None else self.embed(x_in, T)
        x = self.lif(h)
        for blk in self.blocks:
            x = blk(x, h)
        return x


def build_stages(
    config: MixerSNNConfig,
    *,
    neuron: NeuronFactory,
    token_block: Callable[..., nn.Module],
    channel_block: Callable[..., nn.Module],
    patch_embed: Callable[..., nn.Module],
    spe_embed: Callable[..., nn.Module],
    downsample: Callable[..., nn.Module],
) -> nn.ModuleList:
    """The stages of ``config`` from the given layer classes (or factories): stage 0 embeds
    patches (``in_chans, dim, patch_size``), later stages halve the grid with SPE
    (``in_dim, out_dim, neuron``) or a strided conv (``in_dim, out_dim, grid``), and each stage
    holds ``depth`` blocks of ``token_block(dim, grid, neuron, identity_bn)`` and
    ``channel_block(dim, hidden, num_tokens, neuron)``. The trained model and its folded
    inference twin (``mixersnn.accounting.MFIMixerSNN``) are both built here, so their module
    paths match."""
    stages = []
    for s, (C, H, depth) in enumerate(zip(config.widths, config.grids, config.depths)):
        if s == 0:
            embed = patch_embed(in_chans=config.in_chans, dim=C, patch_size=config.patch_size)
        elif config.spe:
            embed = spe_embed(in_dim=config.widths[s - 1], out_dim=C, neuron=neuron)
        else:
            embed = downsample(in_dim=config.widths[s - 1], out_dim=C, grid=config.grids[s - 1])
        blocks = [
            MixerBlock(
                token=token_block(dim=C, grid=H, neuron=neuron, identity_bn=not config.spe),
                channel=channel_block(dim=C, hidden=config.hidden_dim(C), num_tokens=H * H, neuron=neuron),
                neuron=neuron,
            )
            for _ in range(depth)
        ]
        stages.append(Stage(embed=embed, blocks=blocks, neuron=neuron))
    return nn.ModuleList(stages)


class MixerSNN(nn.Module):
    """Mixer-SNN: images ``[B, C, H, W]`` -> per-step logits ``[T, B, K]``.

    The input is encoded directly (the normalised image at every step). Every membrane starts
    at 0 on each call, so no state survives between batches. Loss and accuracy should use the
    mean over T (``logits.mean(0)``).

    Args:
        config: architecture; validated on construction.
        neuron: factory of the spiking nonlinearity; default LIF from ``config.neuron``.
        token_block: token-mixing block class (``dim, grid, neuron, identity_bn`` kwargs).
        channel_block: channel-MLP block class (``dim, hidden, num_tokens, neuron`` kwargs).
        patch_embed, spe_embed, downsample, head: the embedding, SPE, non-SPE downsampling and
            classifier classes (see :func:`build_stages`; ``head(dim, num_classes)``).
    """

    def __init__(
        self,
        config: MixerSNNConfig,
        *,
        neuron: Optional[NeuronFactory] = None,
        token_block: Type[nn.Module] = SpikingTokenBlock,
        channel_block: Type[nn.Module] = SpikingChannelBlock,
        patch_embed: Callable[..., nn.Module] = PatchEmbed,
        spe_embed: Callable[..., nn.Module] = SpikingPatchEncoding,
        downsample: Callable[..., nn.Module] = ConvDownsample,
        head: Callable[..., nn.Module] = ClassifierHead,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        if neuron is None:
            neuron = functools.partial(LIF, **config.neuron.to_dict())
        self.stages = build_stages(config, neuron=neuron, token_block=token_block, channel_block=channel_block,
                                   patch_embed=patch_embed, spe_embed=spe_embed, downsample=downsample)
        self.head = head(dim=config.widths[-1], num_classes=config.num_classes)
        # The plain-torch reference backend stays plain torch in its synapses too.
        set_event_driven(self, config.neuron.backend != "torch")

    @property
    def T(self) -> int:
        return self.config.T

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> final spikes ``[T, B, C4, H4, W4]``."""
        cfg = self.config
        if img.dim() != 4 or img.shape[1] != cfg.in_chans or img.shape[2] != cfg.img_size or img.shape[3] != cfg.img_size:
            raise ValueError(
                f"expected images [B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}], got "
                f"{tuple(img.shape)}; the token-mixing weights and token-position BatchNorm fix "
                f"the resolution, so resize the input or build the model with a matching "
                f"img_size/in_chans"
            )
        x = self.stages[0](img, cfg.T)
        for stage in self.stages[1:]:
            x = stage(x)
        return x

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(img))


# ----------------------------------------------------------------------------- compilation
def compile_unavailable_reason(device_type: str) -> Optional[str]:
    """``None`` when ``torch.compile`` (Inductor) can build this model for ``device_type``,
    else why not. Never raises.

    Inductor generates C++ for the CPU and Triton for CUDA, and compiles it at run time: a
    CPU run needs a C++ compiler on PATH (``$CXX``, else g++/c++/clang++; a fresh machine may
    lack one: ``apt-get install g++``), a CUDA run needs Triton.
    """
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        importlib.import_module("torch._dynamo")
    except Exception as err:  # noqa: BLE001 - any failure is a reason
        return f"TorchDynamo does not import here ({err})"
    if device_type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return (f"Inductor compiles C++ for the CPU and no compiler is on PATH (looked for "
                    f"{', '.join(names)}); install g++ (apt-get install g++) or set CXX")  # fmt: skip
        return None
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Inductor needs Triton for CUDA and it is not usable here (pip install triton)"
        except Exception as err:  # noqa: BLE001
            return f"cannot check for Triton ({err})"
        return None
    return f"compile_model supports cpu and cuda devices, not {device_type!r}"


class CompiledModel(nn.Module):
    """A model and its ``torch.compile``d twin (same parameters), called like the model.

    Calls go to the compiled module. If its first call fails (a compiler error: Dynamo,
    Inductor or a missing toolchain), ``required=False`` warns once and keeps using the eager
    model; ``required=True`` raises. Later failures always raise: by then the compiled path
    has run, and a silent switch would hide a real error.

    ``eager`` is the wrapped module (for evaluation, whose eval-mode graph would cost a second
    compile, and for checkpoints: this wrapper's own state-dict keys carry an ``eager.``
    prefix, so save ``eager``'s).
    """

    def __init__(self, model: nn.Module, compiled: nn.Module, *, required: bool,
                 undo: Optional[Callable[[], None]] = None) -> None:  # fmt: skip
        super().__init__()
        self.eager = model
        self._compiled = [compiled]  # a list: not registered twice as a submodule
        self.required = required
        self.fell_back: Optional[str] = None
        self._calls = 0
        self._undo = undo  # turns an in-place (per-block) compilation back into eager

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.fell_back is not None:
            return self.eager(*args, **kwargs)
        if self._calls > 0:
            return self._compiled[0](*args, **kwargs)
        try:
            out = self._compiled[0](*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the first call is where compilers fail
            if self.required:
                raise RuntimeError(
                    f"torch.compile of the model failed on its first call: {type(err).__name__}: "
                    f"{str(err)[:500]}; train without compile (compile: false) or fix the toolchain"
                ) from err
            self.fell_back = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            if self._undo is not None:
                self._undo()
            warnings.warn(f"torch.compile failed ({self.fell_back}); running eager", RuntimeWarning, stacklevel=2)
            return self.eager(*args, **kwargs)
        self._calls += 1
        return out


def compile_model(
    model: nn.Module,
    *,
    mode: Union[bool, str] = "default",
    device_type: Optional[str] = None,
    required: bool = True,
    scope: str = "model",
) -> nn.Module:
    """``torch.compile`` a Mixer-SNN (or its DDP wrapper) for training, with an eager fallback.

    The fused LIF runs inside the graph as the ``mixersnn::lif_forward`` custom op
    (:mod:`mixersnn.kernels.custom_op`), so the graph does not break at the neurons and
    Inductor fuses the BatchNorms, adds and reshapes around them. Shapes are compiled static
    (``dynamic=False``): a training run has one batch shape, and a last, smaller batch
    recompiles once. Measured gains are in docs/benchmarks.md ("Training step").

    Args:
        model: the module to compile (its parameters are shared, not copied).
        mode: a ``torch.compile`` mode, one of :data:`COMPILE_MODES` ("reduce-overhead": CUDA
            graphs, for static shapes on CUDA), or True for "default".
        device_type: where the model will run ("cpu", "cuda"); default: its parameters'.
        required: True: raise if compilation cannot work here (the reason says why); False:
            warn in one line and return ``model`` unchanged (also on a failed first call).
        scope: "model": one graph for the whole network; "blocks": each :class:`MixerBlock`
            compiled in place (``nn.Module.compile``), the rest eager. Blocks of one stage
            share their compiled code, so compilation takes a few graphs instead of one per
            block (MLP-SPE-T at 32 px on 2 CPU cores: 31 s instead of 193 s), at the price of
            no fusion across block boundaries. In place: ``model`` itself then runs compiled
            blocks, also in evaluation (which compiles its own eval-mode graphs once).

    Returns:
        A :class:`CompiledModel`, or ``model`` itself when falling back.

    Raises:
        ValueError: an unknown mode.
        RuntimeError: ``required`` and compilation cannot work here.
    """
    if mode is True:
        mode = "default"
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES} (or True for 'default')")
    if scope not in ("model", "blocks"):
        raise ValueError(f"compile scope {scope!r} must be 'model' (one graph) or 'blocks' (each MixerBlock)")
    if device_type is None:
        first = next(iter(model.parameters()), None)
        device_type = first.device.type if first is not None else "cpu"
    reason = compile_unavailable_reason(device_type)
    if reason is not None:
        if required:
            raise RuntimeError(f"cannot compile the model for {device_type}: {reason}; or train eagerly (compile: false)")
        warnings.warn(f"not compiling the model: {reason}; running eager", RuntimeWarning, stacklevel=2)
        return model
    torch_mode = None if mode == "default" else mode
    if scope == "blocks":
        blocks = [m for m in model.modules() if isinstance(m, MixerBlock)]
        for blk in blocks:
            blk.compile(mode=torch_mode, dynamic=False)

        def undo() -> None:
            for blk in blocks:
                blk._compiled_call_impl = None  # what nn.Module.compile set

        return CompiledModel(model, model, required=required, undo=undo)
    compiled = torch.compile(model, mode=torch_mode, dynamic=False)
    return CompiledModel(model, compiled, required=required)
