"""A weight-sharing Mixer-SNN supernet for one-shot architecture search.

One ordinary :class:`~mixersnn.models.mixer_snn.MixerSNN`, built at the largest configuration
of a :class:`SupernetSpace`, holds every parameter and BatchNorm buffer. A subnet
(:class:`SubnetSpec`: stage-1 width, blocks per stage, channel-MLP ratio, time steps) runs on
slices of those tensors:

- **width**: stage ``s`` of a subnet with stage-1 width ``c`` has ``c_s = c * 2**s`` channels
  (as in :class:`~mixersnn.models.config.MixerSNNConfig`); or, in a space of per-stage
  ``widths``, each stage's width ``c_s`` is chosen on its own (the subnet's config then sets
  ``stage_dims``, and the largest model has each stage's widest choice). Stage 0 and every
  stage of a non-SPE model use the first ``c_s`` channels of the largest model. An SPE stage's output is
  ``concat(a1, a2, a3)`` of three branches, so a subnet uses the first ``c_s / 3`` channels
  *of each branch* (positions ``[0, n) + [N, N + n) + [2N, 2N + n)`` with ``N`` the largest
  branch width); every later tensor of the stage follows that layout.
- **channel MLP**: a ratio ``r`` uses the first ``round(r * c_s)`` hidden units.
- **depth**: ``k`` blocks in a stage are blocks ``0 .. k-1`` of the largest model's stage.
- **time steps**: no parameter depends on T; any T of the space runs on the same weights.
- **fixed per supernet**: image size, input channels, classes, patch size, SPE on/off and the
  neuron (all from ``base``), so the token grids, the token-mixing weights and the
  token-position BatchNorms (``proj_h``, ``proj_w``, ``bn_h``, ``bn_w``, ``bn1``, ``bn2``)
  are shared whole by every subnet.

The forward pass calls a stand-alone ``MixerSNN`` of the subnet's config, built once on the
meta device (no memory, no initialisation), through :func:`torch.func.functional_call` with
the sliced tensors: the very same layer code as the extracted model, so
``supernet(img, spec)`` and ``supernet.extract(spec)(img)`` are bit for bit equal, in eval and
in train mode. Slices are ``index_select`` copies (or the tensor itself when the whole of it is
used), so gradients flow back into exactly the used entries of the shared weights. In train
mode the BatchNorm running statistics a subnet updates are written back into its slice of the
supernet's buffers; other entries are untouched.

Shared BN statistics are a compromise across subnets; evaluate a subnet after re-estimating
them on a few training batches (:meth:`MixerSNNSupernet.extract_calibrated`, or
:func:`recalibrate_bn` on any model).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from mixersnn.models.config import ConfigError, MixerSNNConfig, check_spe_width
from mixersnn.models.mixer_snn import MixerSNN

__all__ = ["SubnetSpec", "SupernetSpace", "MixerSNNSupernet", "recalibrate_bn"]

#: Upper bound on T, as in :meth:`MixerSNNConfig.validate`.
MAX_T = 64


# ----------------------------------------------------------------------------- specs and space
@dataclass(frozen=True)
class SubnetSpec:
    """One architecture inside a supernet; hashable, so usable as a dict key.

    Attributes:
        embed_dim: stage-1 width c (stage s has c * 2**s channels unless ``widths`` is set).
        depths: blocks per stage.
        mlp_ratio: channel-MLP hidden ratio.
        T: time steps.
        widths: per-stage widths (a space of per-stage ``widths``), or None (doubling widths);
            when set, ``embed_dim`` must equal ``widths[0]``.
    """

    embed_dim: int
    depths: tuple[int, ...]
    mlp_ratio: float
    T: int
    widths: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.depths, tuple):
            object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        if self.widths is not None:
            object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
            if not self.widths or self.embed_dim != self.widths[0]:
                raise ConfigError(f"subnet embed_dim={self.embed_dim} must equal widths[0] (widths="
                                  f"{list(self.widths)}): the stage-1 width is the first stage width")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = {"embed_dim": self.embed_dim, "depths": list(self.depths), "mlp_ratio": self.mlp_ratio, "T": self.T}
        if self.widths is not None:
            d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubnetSpec":
        _check_keys(d, {"embed_dim", "depths", "mlp_ratio", "T"}, "subnet spec", optional={"widths"})
        widths = d.get("widths")
        return cls(embed_dim=int(d["embed_dim"]), depths=tuple(d["depths"]), mlp_ratio=d["mlp_ratio"], T=int(d["T"]),
                   widths=None if widths is None else tuple(widths))  # fmt: skip


def _check_keys(d: dict[str, Any], known: set[str], what: str, optional: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` unless ``d`` has exactly the keys ``known``, plus any of
    ``optional``."""
    unknown = sorted(set(d) - known - set(optional))
    missing = sorted(known - set(d))
    if unknown or missing:
        opt = f" (optional {sorted(optional)})" if optional else ""
        raise ConfigError(f"{what} keys must be {sorted(known)}{opt}; unknown {unknown}, missing {missing}")


def _as_tuple(values: Any) -> tuple:
    return tuple(values) if not isinstance(values, tuple) else values


@dataclass(frozen=True)
class SupernetSpace:
    """The choices of a supernet; every combination is a subnet.

    Widths are chosen one of two ways (exactly one is given): ``embed_dims`` (the stage-1
    width; every stage doubles it) or ``widths`` (each stage's width chosen on its own).

    Attributes:
        embed_dims: stage-1 widths; stage s has width ``embed_dim * 2**s``. With SPE each must
            be a multiple of 3. Empty when ``widths`` is given.
        depths: per stage, the allowed block counts, e.g. ``((1, 2), (1, 2), (1, 2, 3, 4),
            (1, 2))``; the number of stages is ``len(depths)`` (the base config's depths are
            ignored).
        mlp_ratios: channel-MLP ratios; ``ratio * width`` must be whole for every width.
        Ts: time steps (1 to 64).
        widths: per stage, the allowed widths of that stage, e.g. ``((6, 12), (12, 18, 24),
            (24, 36, 48), (48, 96))`` (one entry per stage of ``depths``); with SPE every stage
            after the first takes multiples of 3. Empty when ``embed_dims`` is given.
    """

    embed_dims: tuple[int, ...] = ()
    depths: tuple[tuple[int, ...], ...] = ()
    mlp_ratios: tuple[float, ...] = ()
    Ts: tuple[int, ...] = ()
    widths: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        # Normalise lists from YAML/JSON; validation itself needs the base config (SPE).
        object.__setattr__(self, "embed_dims", _as_tuple(self.embed_dims or ()))
        object.__setattr__(self, "depths", tuple(_as_tuple(d) for d in _as_tuple(self.depths)))
        object.__setattr__(self, "mlp_ratios", tuple(float(r) if isinstance(r, (int, float)) and not isinstance(r, bool)
                                                     else r for r in _as_tuple(self.mlp_ratios)))  # fmt: skip
        object.__setattr__(self, "Ts", _as_tuple(self.Ts))
        object.__setattr__(self, "widths", tuple(_as_tuple(w) for w in _as_tuple(self.widths or ())))

    # ------------------------------------------------------------------ subnets
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def per_stage_widths(self) -> bool:
        """Whether widths are chosen per stage (``widths``) rather than as a stage-1 width."""
        return bool(self.widths)

    def _spec(self, width: Any, depths: Iterable[int], mlp_ratio: float, T: int) -> SubnetSpec:
        """A spec from a width choice: a stage-1 width, or a tuple of stage widths."""
        if self.per_stage_widths:
            return SubnetSpec(width[0], tuple(depths), mlp_ratio, T, widths=tuple(width))
        return SubnetSpec(width, tuple(depths), mlp_ratio, T)

    def largest(self) -> SubnetSpec:
        """The largest choice in every dimension (the supernet's own shape)."""
        width = tuple(max(w) for w in self.widths) if self.per_stage_widths else max(self.embed_dims)
        return self._spec(width, (max(d) for d in self.depths), max(self.mlp_ratios), max(self.Ts))

    def smallest(self) -> SubnetSpec:
        """The smallest choice in every dimension."""
        width = tuple(min(w) for w in self.widths) if self.per_stage_widths else min(self.embed_dims)
        return self._spec(width, (min(d) for d in self.depths), min(self.mlp_ratios), min(self.Ts))

    def sample(self, rng: random.Random) -> SubnetSpec:
        """A subnet drawn uniformly and independently in each dimension (and each stage)."""
        if self.per_stage_widths:
            width: Any = tuple(rng.choice(w) for w in self.widths)
        else:
            width = rng.choice(self.embed_dims)
        depths = tuple(rng.choice(d) for d in self.depths)
        return self._spec(width, depths, rng.choice(self.mlp_ratios), rng.choice(self.Ts))

    def _width_choices(self) -> list[Any]:
        """Every width choice: stage-1 widths, or tuples of stage widths."""
        import itertools

        return list(itertools.product(*self.widths)) if self.per_stage_widths else list(self.embed_dims)

    def size(self) -> int:
        """The number of distinct subnets."""
        n_widths = math.prod(len(w) for w in self.widths) if self.per_stage_widths else len(self.embed_dims)
        return n_widths * math.prod(len(d) for d in self.depths) * len(self.mlp_ratios) * len(self.Ts)

    def contains(self, spec: SubnetSpec) -> bool:
        """Whether ``spec`` is one of this space's subnets."""
        try:
            self.check(spec)
        except ConfigError:
            return False
        return True

    def _check_width(self, spec: SubnetSpec) -> None:
        if not self.per_stage_widths:
            if spec.widths is not None:
                raise ConfigError(f"widths={list(spec.widths)} is not a choice of this supernet: it chooses the "
                                  f"stage-1 width (embed_dims {list(self.embed_dims)}), not per-stage widths")  # fmt: skip
            if spec.embed_dim not in self.embed_dims:
                raise ConfigError(f"embed_dim={spec.embed_dim} is not a choice of this supernet: allowed "
                                  f"{list(self.embed_dims)}")  # fmt: skip
            return
        allowed_all = [list(w) for w in self.widths]
        if spec.widths is None or len(spec.widths) != len(self.widths):
            got = None if spec.widths is None else list(spec.widths)
            raise ConfigError(f"widths={got} does not fit this supernet: give one width per stage, stage s from "
                              f"{allowed_all}")  # fmt: skip
        for s, (w, allowed) in enumerate(zip(spec.widths, self.widths)):
            if w not in allowed:
                raise ConfigError(f"widths[{s}]={w} is not allowed: stage {s} takes widths {list(allowed)}")

    def check(self, spec: SubnetSpec) -> None:
        """Raise :class:`ConfigError` unless ``spec`` is a subnet of this space (the message
        names the value and the allowed choices)."""
        self._check_width(spec)
        if len(spec.depths) != self.num_stages:
            raise ConfigError(f"depths={list(spec.depths)} has {len(spec.depths)} stages; this supernet has "
                              f"{self.num_stages} (choices per stage {[list(d) for d in self.depths]})")  # fmt: skip
        for s, (d, allowed) in enumerate(zip(spec.depths, self.depths)):
            if d not in allowed:
                raise ConfigError(f"depths[{s}]={d} is not allowed: stage {s} takes {list(allowed)} blocks "
                                  f"(at most {max(allowed)})")  # fmt: skip
        if spec.mlp_ratio not in self.mlp_ratios:
            raise ConfigError(f"mlp_ratio={spec.mlp_ratio} is not a choice of this supernet: allowed "
                              f"{list(self.mlp_ratios)}")  # fmt: skip
        if spec.T not in self.Ts:
            raise ConfigError(f"T={spec.T} is not a choice of this supernet: allowed {list(self.Ts)} (the weights "
                              f"do not depend on T: build the supernet with a space that lists it)")  # fmt: skip

    def subnets(self) -> Iterator[SubnetSpec]:
        """Every subnet, in a fixed order (mind :meth:`size` before listing them)."""
        import itertools

        for w, d, r, t in itertools.product(self._width_choices(), itertools.product(*self.depths), self.mlp_ratios,
                                            self.Ts):  # fmt: skip
            yield self._spec(w, d, r, t)

    # ------------------------------------------------------------------ validation
    def _validate_widths(self, base: MixerSNNConfig) -> None:
        """The width choices: exactly one of ``embed_dims``/``widths``, each choice valid."""
        example = "(48, 72, 96)" if base.spe else "(64, 96)"
        per_stage = "widths=((6, 12), (12, 18, 24), (24, 36, 48), (48, 96))"
        if self.embed_dims and self.widths:
            raise ConfigError(f"the supernet space gives both embed_dims={list(self.embed_dims)} and widths="
                              f"{[list(w) for w in self.widths]}: give exactly one, embed_dims (stage-1 widths, every "
                              f"stage doubles) or widths (per stage, the allowed widths)")  # fmt: skip
        if not self.embed_dims and not self.widths:
            raise ConfigError(f"embed_dims=() is empty: give at least one choice, e.g. embed_dims={example}, or "
                              f"per-stage width choices instead, e.g. {per_stage}")  # fmt: skip
        if self.embed_dims:
            _choices("embed_dims", self.embed_dims, example)
            for e in self.embed_dims:
                _integer("embed_dims", e, 1)
                if base.spe:
                    check_spe_width(f"embed_dims choice {e}", e, "every stage-1 width")
            return
        if len(self.widths) != len(self.depths):
            raise ConfigError(f"widths has {len(self.widths)} stages but depths has {len(self.depths)}: give the "
                              f"width choices of every stage, one list per stage of depths")  # fmt: skip
        for s, ws in enumerate(self.widths):
            _choices(f"widths[{s}]", ws, "(24, 48)")
            for w in ws:
                _integer(f"widths[{s}]", w, 1)
                if base.spe and s > 0:
                    check_spe_width(f"widths[{s}] choice {w}", w, "every width of a stage after the first")

    def _stage_width_choices(self) -> list[tuple[int, int, str]]:
        """``(stage, width, label)`` for every width a stage can take (for the ratio check)."""
        if self.per_stage_widths:
            return [(s, w, f"widths[{s}] choice {w}") for s, ws in enumerate(self.widths) for w in ws]
        return [(s, e * 2**s, f"embed_dims choice {e} (stage {s} width {e * 2**s})")
                for e in self.embed_dims for s in range(self.num_stages)]  # fmt: skip

    def validate(self, base: MixerSNNConfig) -> None:
        """Raise :class:`ConfigError` naming the bad value, the allowed range and the fix.

        Args:
            base: the fixed part of every subnet (image size, channels, classes, patch, SPE,
                neuron); its embed_dim, stage_dims, depths, mlp_ratio and T are replaced by the
                space's.
        """
        if len(self.depths) == 0:
            raise ConfigError("depths=() is empty: give the block-count choices of at least one stage, "
                              "e.g. depths=((1, 2), (1, 2, 4))")  # fmt: skip
        self._validate_widths(base)
        for s, d in enumerate(self.depths):
            _choices(f"depths[{s}]", d, "(1, 2)")
            for k in d:
                _integer(f"depths[{s}]", k, 1)
        _choices("mlp_ratios", self.mlp_ratios, "(2.0, 3.0)")
        for r in self.mlp_ratios:
            if not isinstance(r, float) or not r > 0:
                raise ConfigError(f"mlp_ratios choice {r!r} is out of range: it must be a number > 0 "
                                  f"(the paper uses 3)")  # fmt: skip
        _choices("Ts", self.Ts, "(2, 4)")
        for t in self.Ts:
            _integer("Ts", t, 1, MAX_T)
        for r in self.mlp_ratios:
            for _, w, label in self._stage_width_choices():
                if abs(r * w - round(r * w)) > 1e-9:
                    raise ConfigError(
                        f"mlp_ratios choice {r} gives a non-integer hidden width {r * w:g} for {label}: every "
                        f"ratio times every stage width must be whole; use integer ratios or drop that ratio or width"
                    )
        # Everything else (img_size vs patch_size, the neuron) is the base config's business.
        try:
            self._config(base, self.largest())
            self._config(base, self.smallest())
        except ConfigError as err:
            raise ConfigError(f"supernet base config: {err}") from None

    @staticmethod
    def _config(base: MixerSNNConfig, spec: SubnetSpec) -> MixerSNNConfig:
        # dataclasses.replace: stage_dims is replaced even by None (the base's is ignored).
        return dataclasses.replace(base, embed_dim=spec.embed_dim, stage_dims=spec.widths, depths=tuple(spec.depths),
                                   mlp_ratio=spec.mlp_ratio, T=spec.T)  # fmt: skip

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The choices; ``embed_dims`` or ``widths``, whichever the space uses."""
        d: dict[str, Any] = {}
        if self.per_stage_widths:
            d["widths"] = [list(w) for w in self.widths]
        else:
            d["embed_dims"] = list(self.embed_dims)
        d.update({"depths": [list(d) for d in self.depths], "mlp_ratios": list(self.mlp_ratios), "Ts": list(self.Ts)})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SupernetSpace":
        _check_keys(d, {"depths", "mlp_ratios", "Ts"}, "supernet space", optional={"embed_dims", "widths"})
        return cls(**d)


def _choices(name: str, values: tuple, example: str) -> None:
    if len(values) == 0:
        raise ConfigError(f"{name}=() is empty: give at least one choice, e.g. {name}={example}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}={list(values)} lists a choice twice; list each choice once "
                          f"(duplicates would bias sampling)")  # fmt: skip


def _integer(name: str, v: Any, lo: int, hi: Optional[int] = None) -> None:
    rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise ConfigError(f"{name} choice {v!r} is out of range: it must be an integer {rng}")


# ----------------------------------------------------------------------------- slicing rules
# Per tensor of a subnet, how each dimension indexes the largest model's tensor. Kinds:
#   "idx"    the stage's channel layout (prefix, or the first n of each SPE branch)
#   "prev"   the previous stage's channel layout (downsampling input)
#   "branch" the first n = c_s / 3 channels (inside one SPE branch)
#   "hid"    the first round(mlp_ratio * c_s) hidden units of the channel MLP
#   "fuse"   the token block's concat[x, x_h, x_w]: "idx" in each of the three C_s parts
#   "last"   the last stage's channel layout (head)
#   None     the whole dimension (also every dimension not listed)
# The first matching rule wins; a tensor no rule matches is an error (a new layer needs one).
_BN = r"(weight|bias|running_mean|running_var)"
_STAGE = r"stages\.(?P<s>\d+)\."
_BLOCK = _STAGE + r"blocks\.\d+\."
_RULES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    (r".*\.num_batches_tracked", ()),
    # stage-0 patch embedding (dim 1 = image channels) and non-SPE downsampling (dim 1 = prev)
    (_STAGE + r"embed\.conv\.weight", ("idx", "prev")),
    (_STAGE + r"embed\.bn\." + _BN, ("idx",)),
    # spiking patch encoding
    (_STAGE + r"embed\.down\.conv\.weight", ("idx", "prev")),
    (_STAGE + r"embed\.down\.bn\." + _BN, ("idx",)),
    (_STAGE + r"embed\.conv(12|23)\.conv\.weight", ("branch", "branch")),
    (_STAGE + r"embed\.conv(12|23)\.bn\." + _BN, ("branch",)),
    # token block: the token-mixing weights and their BNs depend only on the grid
    (_BLOCK + r"token\.(proj_h|proj_w)\.(weight|bias)", ()),
    (_BLOCK + r"token\.(bn_h|bn_w)\." + _BN, ()),
    (_BLOCK + r"token\.identity_bn\." + _BN, ("idx",)),
    (_BLOCK + r"token\.fuse\.weight", ("idx", "fuse")),
    (_BLOCK + r"token\.bn\." + _BN, ("idx",)),
    # channel block: BN1d over token positions is shared whole
    (_BLOCK + r"channel\.fc1\.weight", ("hid", "idx")),
    (_BLOCK + r"channel\.fc1\.bias", ("hid",)),
    (_BLOCK + r"channel\.(bn1|bn2)\." + _BN, ()),
    (_BLOCK + r"channel\.fc2\.weight", ("idx", "hid")),
    (_BLOCK + r"channel\.fc2\.bias", ("idx",)),
    # head
    (r"head\.bn\." + _BN, ("last",)),
    (r"head\.fc\.weight", (None, "last")),
    (r"head\.fc\.bias", ()),
)
_COMPILED_RULES = tuple((re.compile(p), dims) for p, dims in _RULES)
_RUNNING = ("running_mean", "running_var")


def _rule(name: str) -> tuple[Optional[int], tuple[Optional[str], ...]]:
    for pattern, dims in _COMPILED_RULES:
        m = pattern.fullmatch(name)
        if m:
            s = m.groupdict().get("s")
            return (None if s is None else int(s)), dims
    raise KeyError(f"no supernet slicing rule for tensor {name!r}; add one to mixersnn.models.supernet._RULES")


# ----------------------------------------------------------------------------- the supernet
class MixerSNNSupernet(nn.Module):
    """A weight-sharing supernet over a :class:`SupernetSpace` (see the module docstring).

    Every parameter and buffer lives in ``self.net``, an ordinary ``MixerSNN`` at the largest
    configuration, so state-dict keys are ``net.<MixerSNN key>`` and ``self.net`` alone is the
    largest subnet. Optimise ``supernet.parameters()``; call ``supernet(img, spec)`` per step
    with the sampled subnet.

    Args:
        base: the fixed part of every subnet: image size, input channels, classes, patch size,
            SPE and neuron. Its ``embed_dim``, ``stage_dims``, ``depths``, ``mlp_ratio`` and ``T``
            are ignored.
        space: the choices.
        max_templates: how many subnet templates (meta-device modules, a few kB each) to keep.

    Raises:
        ConfigError: the space does not fit ``base`` (see :meth:`SupernetSpace.validate`).
    """

    def __init__(self, base: MixerSNNConfig, space: SupernetSpace, *, max_templates: int = 64) -> None:
        super().__init__()
        space.validate(base)
        self.base = base
        self.space = space
        self.max_templates = max_templates
        self.max_config = self.subnet_config(space.largest())
        self.net = MixerSNN(self.max_config)
        # Plain containers (not submodules): templates hold no real tensors; indices are caches.
        self._templates: "OrderedDict[MixerSNNConfig, MixerSNN]" = OrderedDict()
        self._indices: dict[tuple, torch.Tensor] = {}

    @property
    def config(self) -> MixerSNNConfig:
        """The largest subnet's config (what ``self.net`` is built from)."""
        return self.max_config

    # ------------------------------------------------------------------ configs
    def subnet_config(self, spec: SubnetSpec) -> MixerSNNConfig:
        """The stand-alone config of ``spec``: ``base`` with the spec's fields.

        Raises:
            ConfigError: ``spec`` is not a subnet of the space.
        """
        self.space.check(spec)
        return SupernetSpace._config(self.base, spec)

    def num_params(self, spec: Optional[SubnetSpec] = None) -> int:
        """Parameters of the subnet (BN statistics excluded), as its extracted model counts them."""
        return sum(p.numel() for p in self._template(self.subnet_config(spec or self.space.largest())).parameters())

    def _template(self, config: MixerSNNConfig) -> MixerSNN:
        tmpl = self._templates.get(config)
        if tmpl is None:
            with torch.device("meta"):
                tmpl = MixerSNN(config)
            self._templates[config] = tmpl
            while len(self._templates) > self.max_templates:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(config)
        return tmpl

    # ------------------------------------------------------------------ indices
    def _index(self, kind: str, s: Optional[int], config: MixerSNNConfig,
               device: torch.device) -> Optional[torch.Tensor]:  # fmt: skip
        """Positions in the largest tensor's dimension for ``kind`` at stage ``s``."""
        if kind == "last":
            kind, s = "idx", config.num_stages - 1
        if kind == "prev":
            if s == 0:
                return None  # the image channels
            kind, s = "idx", s - 1
        assert s is not None, kind
        c, C = config.widths[s], self.max_config.widths[s]
        spe_stage = config.spe and s > 0
        if kind == "hid":
            size = config.hidden_dim(c)
        elif kind == "branch":
            size = c // 3
        else:
            size = c
        key = (kind, s, size, str(device))
        idx = self._indices.get(key)
        if idx is None:
            if kind in ("hid", "branch"):
                idx = torch.arange(size, device=device)
            else:
                if spe_stage:
                    n, N = c // 3, C // 3
                    base = torch.cat([b * N + torch.arange(n, device=device) for b in range(3)])
                else:
                    base = torch.arange(c, device=device)
                idx = base if kind == "idx" else torch.cat([b * C + base for b in range(3)])  # "fuse"
            self._indices[key] = idx
        return idx

    def slice_indices(self, spec: Optional[SubnetSpec] = None) -> dict[str, tuple[Optional[torch.Tensor], ...]]:
        """Per tensor name of the subnet (``MixerSNN`` keys, no ``net.`` prefix), the positions
        each dimension takes from the supernet's tensor (``None``: the whole dimension).

        The subnet's tensor is ``t.index_select(d, idx)`` over the dimensions ``d`` with an
        index; the same indices map gradients or any per-entry quantity between the two."""
        config = self.subnet_config(spec or self.space.largest())
        device = next(iter(self.net.parameters())).device
        tmpl = self._template(config)
        out = {}
        for name, _ in self._named_tensors(tmpl):
            s, dims = _rule(name)
            out[name] = tuple(None if k is None else self._index(k, s, config, device)
                              for k in dims)  # fmt: skip
        return out

    @staticmethod
    def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from module.named_parameters()
        yield from module.named_buffers()

    # ------------------------------------------------------------------ slicing
    def _sliced(self, config: MixerSNNConfig, tmpl: MixerSNN) -> tuple[dict[str, torch.Tensor], list[tuple]]:
        """The subnet's tensors (slices of ``self.net``'s, same shapes and memory layout as a
        stand-alone model's), and the running-stat buffers that are copies: ``(name, max
        tensor, index, copy)`` to write back after a train-mode call."""
        full = dict(self._named_tensors(self.net))
        device = next(iter(full.values())).device
        tensors: dict[str, torch.Tensor] = {}
        copies: list[tuple] = []
        for name, ref in self._named_tensors(tmpl):
            if name not in full:
                raise KeyError(f"subnet tensor {name!r} has no counterpart in the supernet")
            s, dims = _rule(name)
            t = full[name]
            for d, kind in enumerate(dims):
                if kind is None:
                    continue
                idx = self._index(kind, s, config, device)
                if idx is not None and idx.numel() != t.shape[d]:
                    t = t.index_select(d, idx)
            if t.shape != ref.shape:
                raise RuntimeError(f"supernet slice of {name!r} has shape {tuple(t.shape)}, the subnet needs "
                                   f"{tuple(ref.shape)}; the slicing rule is wrong")  # fmt: skip
            # Same memory layout as the stand-alone layer's parameter (ConvBN keeps its conv
            # weight channels-last), so the kernels, and the results, are the same.
            if t.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
                t = t.contiguous(memory_format=torch.channels_last)
            tensors[name] = t
            if t is not full[name] and name.rsplit(".", 1)[-1] in _RUNNING:
                copies.append((name, full[name], self._index(dims[0], s, config, device), t))
        return tensors, copies

    def subnet_state_dict(self, spec: Optional[SubnetSpec] = None) -> dict[str, torch.Tensor]:
        """The subnet's state dict (``MixerSNN`` keys): detached clones of the slices."""
        config = self.subnet_config(spec or self.space.largest())
        with torch.no_grad():
            tensors, _ = self._sliced(config, self._template(config))
            return {k: v.detach().clone() for k, v in tensors.items()}

    # ------------------------------------------------------------------ forward
    def forward(self, img: torch.Tensor, spec: Optional[SubnetSpec] = None, *,
                update_bn_stats: bool = True) -> torch.Tensor:  # fmt: skip
        """Run subnet ``spec`` (default: the largest) on ``img [B, C, H, W]``.

        Args:
            img: images.
            spec: the subnet.
            update_bn_stats: in train mode, whether BatchNorms update the running statistics
                of the subnet's slice (they always normalise with batch statistics in train
                mode). False leaves every buffer of the supernet unchanged.

        Returns:
            Per-step logits ``[T, B, K]`` (T of the spec).
        """
        config = self.subnet_config(spec or self.space.largest())
        tmpl = self._template(config)
        # Mirror the train/eval flag of every module (e.g. BatchNorms frozen individually).
        net_modules = dict(self.net.named_modules())
        for name, m in tmpl.named_modules():
            m.training = net_modules[name].training
        tensors, copies = self._sliced(config, tmpl)
        if not update_bn_stats and self.training:
            full = dict(self.net.named_buffers())
            tensors = {k: (v.clone() if k in full and v is full[k] else v) for k, v in tensors.items()}
            copies = []
        out = torch.func.functional_call(tmpl, tensors, (img,), strict=True)
        if copies:
            tmpl_modules = dict(tmpl.named_modules())
            with torch.no_grad():
                for name, target, idx, updated in copies:
                    bn = tmpl_modules[name.rsplit(".", 1)[0]]
                    if bn.training and getattr(bn, "track_running_stats", False):
                        target.index_copy_(0, idx, updated)
        return out

    # ------------------------------------------------------------------ extraction
    def extract(self, spec: Optional[SubnetSpec] = None) -> MixerSNN:
        """A stand-alone ``MixerSNN`` of the subnet, holding copies of its slices (on the
        supernet's device and dtype, in the supernet's train/eval mode). Its outputs equal
        ``self(img, spec)`` bit for bit."""
        config = self.subnet_config(spec or self.space.largest())
        ref = next(iter(self.net.parameters()))
        with torch.device("meta"):
            model = MixerSNN(config)
        model.to_empty(device=ref.device)  # keeps the layers' memory formats; draws no random numbers
        if ref.dtype != next(iter(model.parameters())).dtype:
            model.to(dtype=ref.dtype)
        model.load_state_dict(self.subnet_state_dict(spec))
        return model.train(self.training)

    def extract_calibrated(self, spec: Optional[SubnetSpec], batches: Iterable[Any], *,
                           max_batches: Optional[int] = None) -> MixerSNN:  # fmt: skip
        """:meth:`extract` the subnet, then re-estimate its BatchNorm statistics on
        ``batches`` (:func:`recalibrate_bn`). The supernet is left untouched (its shared
        statistics mix every subnet trained so far); the returned model is in eval mode."""
        return recalibrate_bn(self.extract(spec), batches, max_batches=max_batches)

    def extra_repr(self) -> str:
        return f"space={self.space.to_dict()}, subnets={self.space.size()}"


# ----------------------------------------------------------------------------- BN recalibration
@contextmanager
def _cumulative_bn(model: nn.Module) -> Iterator[list[nn.modules.batchnorm._BatchNorm]]:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = None  # cumulative average over the batches seen
        yield bns
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m


def recalibrate_bn(model: nn.Module, batches: Iterable[Any], *, max_batches: Optional[int] = None) -> nn.Module:
    """Reset every BatchNorm's running statistics of ``model`` and re-estimate them as the
    plain average over ``batches`` (``momentum=None``), in train mode under ``no_grad``; the
    model is returned in eval mode (in place).

    Args:
        model: a ``MixerSNN`` (or any module taking images).
        batches: images ``[B, C, H, W]`` or ``(images, labels, ...)`` tuples (a loader).
        max_batches: stop after this many batches.

    Raises:
        ValueError: ``batches`` was empty (the statistics would stay reset).
    """
    device = next(iter(model.parameters())).device
    seen = 0
    with torch.no_grad(), _cumulative_bn(model) as bns:
        for bn in bns:
            bn.reset_running_stats()
        model.train()
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            img = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(img.to(device))
            seen += 1
    model.eval()
    if seen == 0:
        raise ValueError("recalibrate_bn got no batches: give a few training batches (e.g. 10-50 of 64 images)")
    return model

