"""Typed, self-validating configuration of a Mixer-SNN model.

One place for every default: the registry variants, the CLI and the search all start from
these dataclasses and override fields; ``to_dict``/``from_dict`` carry them through Ray and
MLflow unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Optional, TypeVar

__all__ = ["NeuronConfig", "MixerSNNConfig", "ConfigError", "from_known_keys"]

_D = TypeVar("_D")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the value and the fix."""


def from_known_keys(cls: type[_D], d: Mapping[str, Any], where: str) -> _D:
    """``cls(**d)`` for the dataclass ``cls``, or a :class:`ConfigError` that names the keys of
    ``d`` that are not its fields and the valid ones (``where`` says which block)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid keys: {sorted(known)}")
    return cls(**d)


def check_spe_width(label: str, width: int, rule: str) -> None:
    """Raise :class:`ConfigError` unless ``width`` splits into the three equal branches of a
    spiking patch encoding; ``label`` names the value (``embed_dim=80``), ``rule`` the widths
    the requirement covers (``every stage after the first``)."""
    if width % 3:
        lo = width - width % 3
        nearest = [v for v in (lo, lo + 3) if v > 0]
        raise ConfigError(
            f"{label} cannot be used with spe=True: spiking patch encoding splits a stage's width into 3 "
            f"equal branches, so {rule} must be a multiple of 3. Nearest valid widths: {nearest}; change "
            f"it or set spe=False"
        )


@dataclass(frozen=True)
class NeuronConfig:
    """The spiking nonlinearity used everywhere in the network (design doc section 2).

    Defaults are the paper's neuron: LIF, tau 2, threshold 1, hard reset to 0, decay_input,
    detach_reset, Sigmoid surrogate with alpha 4.
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: Optional[float] = 0.0
    decay_input: bool = True
    detach_reset: bool = True
    surrogate: str = "sigmoid"
    alpha: Optional[float] = None
    backend: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lif_options(self) -> dict[str, Any]:
        """The neuron's options for :func:`mixersnn.neurons.make_lif_params` (every field
        but ``backend``)."""
        return {k: v for k, v in asdict(self).items() if k != "backend"}


NEURON_KEYS = tuple(f.name for f in fields(NeuronConfig))


@dataclass(frozen=True)
class MixerSNNConfig:
    """Mixer-SNN architecture (design doc section 4).

    Attributes:
        img_size: input height = width in pixels; must be divisible by ``patch_size``.
        in_chans: input image channels.
        num_classes: classifier outputs K.
        patch_size: stage-1 patch (conv kernel = stride).
        embed_dim: stage-1 width C; stage s has width C * 2**s (unless ``stage_dims`` is
            given: then it is set to ``stage_dims[0]``).
        depths: blocks per stage; the number of stages is ``len(depths)``.
        mlp_ratio: channel-MLP hidden ratio alpha (hidden = alpha * C per stage, an integer).
        spe: spiking patch encoding between stages (else the MLP-S conv downsampling).
        T: time steps.
        neuron: neuron options.
        stage_dims: optional width of every stage (one per entry of ``depths``), replacing the
            doubling rule ``C * 2**s``; each stage then downsamples from the previous stage's
            width, whatever it is. ``embed_dim`` is set to ``stage_dims[0]``. With SPE every
            stage after the first must be a multiple of 3. None (the default): C, 2C, 4C, ...
    """

    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 8, 14, 2)
    mlp_ratio: float = 3.0
    spe: bool = True
    T: int = 4
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    stage_dims: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        # Normalise containers coming from YAML/JSON (lists, dicts) before validating.
        if not isinstance(self.depths, tuple):
            object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if self.stage_dims is not None:
            if isinstance(self.stage_dims, (list, tuple)):
                object.__setattr__(self, "stage_dims", tuple(self.stage_dims))
            self._check_stage_dims()
            object.__setattr__(self, "embed_dim", self.stage_dims[0])
        if isinstance(self.neuron, dict):
            bad = sorted(set(self.neuron) - set(NEURON_KEYS))
            if bad:
                raise ConfigError(f"unknown neuron key(s) {bad}; valid: {list(NEURON_KEYS)}")
            object.__setattr__(self, "neuron", NeuronConfig(**self.neuron))
        self.validate()

    # ------------------------------------------------------------------ derived shapes
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each stage: ``stage_dims`` when given, else C, 2C, 4C, ..."""
        if self.stage_dims is not None:
            return self.stage_dims
        return tuple(self.embed_dim * 2**s for s in range(self.num_stages))

    @property
    def grids(self) -> tuple[int, ...]:
        """Token grid side of each stage.

        Stage 1 is ``img_size / patch_size``; each later stage halves it, rounding up: a
        3x3/stride-2/pad-1 conv (SPE) gives ceil(H/2) for any H, and the MLP-S 2x2/stride-2
        conv is padded on odd grids to match (the reference never runs odd grids; 28-px
        inputs need them).
        """
        g = [self.img_size // self.patch_size]
        for _ in range(1, self.num_stages):
            g.append(math.ceil(g[-1] / 2))
        return tuple(g)

    def hidden_dim(self, width: int) -> int:
        return int(round(self.mlp_ratio * width))

    # ------------------------------------------------------------------ validation
    def _check_stage_dims(self) -> None:
        """Raise :class:`ConfigError` unless ``stage_dims`` is one width >= 1 per stage (and,
        with SPE, a multiple of 3 for every stage after the first)."""
        dims = self.stage_dims
        example = f"e.g. stage_dims={tuple(48 * 2**s for s in range(max(1, len(self.depths))))}"
        if not isinstance(dims, tuple):
            raise ConfigError(f"stage_dims={dims!r} must be a list or tuple of stage widths ({example}) or None")
        if len(dims) != len(self.depths):
            raise ConfigError(
                f"stage_dims={list(dims)} has {len(dims)} widths but depths={list(self.depths)} has "
                f"{len(self.depths)} stages: give exactly one width per stage ({example})"
            )
        for s, w in enumerate(dims):
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise ConfigError(f"stage_dims[{s}]={w!r} is out of range: every stage width must be an integer >= 1")
            if self.spe and s > 0:
                check_spe_width(f"stage_dims[{s}]={w}", w, "every stage after the first")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad value, the allowed range and the fix."""

        def positive_int(name: str, value: Any, lo: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ConfigError(f"{name}={value!r} is out of range: it must be an integer >= {lo}")

        positive_int("T", self.T)
        positive_int("img_size", self.img_size)
        positive_int("in_chans", self.in_chans)
        positive_int("num_classes", self.num_classes)
        positive_int("patch_size", self.patch_size)
        if self.stage_dims is not None:
            self._check_stage_dims()
            if self.embed_dim != self.stage_dims[0]:
                raise ConfigError(f"embed_dim={self.embed_dim} differs from stage_dims[0]={self.stage_dims[0]}: "
                                  f"with stage_dims the stage-1 width is stage_dims[0]; change stage_dims")
        positive_int("embed_dim", self.embed_dim)
        if self.T > 64:
            raise ConfigError(f"T={self.T} is out of range: use 1 <= T <= 64 (the paper uses 4 or 6)")
        if not self.depths:
            raise ConfigError("depths=() is empty: give at least one stage, e.g. depths=(2, 8, 14, 2)")
        for i, d in enumerate(self.depths):
            if not isinstance(d, int) or d < 1:
                raise ConfigError(f"depths[{i}]={d!r} is out of range: every stage needs >= 1 block")
        if self.img_size % self.patch_size != 0:
            divisors = [p for p in range(1, self.img_size + 1) if self.img_size % p == 0 and p <= 16]
            lo = self.img_size - self.img_size % self.patch_size
            raise ConfigError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}: the "
                f"patch grid would be {self.img_size / self.patch_size:g}. Use a patch_size in "
                f"{divisors} or an img_size that is a multiple of {self.patch_size} "
                f"(e.g. {lo} or {lo + self.patch_size})"
            )
        if self.spe and self.stage_dims is None:
            check_spe_width(f"embed_dim={self.embed_dim}", self.embed_dim, "the stage-1 width (every stage doubles it)")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"mlp_ratio={self.mlp_ratio} is out of range: it must be > 0 (the paper uses 3)")
        for s, w in enumerate(self.widths):
            if abs(self.mlp_ratio * w - round(self.mlp_ratio * w)) > 1e-9:
                raise ConfigError(
                    f"mlp_ratio={self.mlp_ratio} gives a non-integer hidden width "
                    f"{self.mlp_ratio * w:g} for stage width {w} (stage {s}); use an integer ratio or one "
                    f"whose product with every stage width is whole"
                )
        if not isinstance(self.neuron, NeuronConfig):
            raise ConfigError(f"neuron={self.neuron!r} must be a NeuronConfig or a dict of its fields")
        # Neuron options are checked by the neuron itself (same messages everywhere).
        from mixersnn.neurons.functional import make_lif_params

        try:
            make_lif_params(**self.neuron.lif_options())
        except ValueError as err:
            raise ConfigError(f"neuron: {err}") from None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depths"] = list(self.depths)
        d["stage_dims"] = None if self.stage_dims is None else list(self.stage_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixerSNNConfig":
        return from_known_keys(cls, d, "model config")

    def replace(self, **overrides: Any) -> "MixerSNNConfig":
        """A copy with ``overrides`` applied.

        Neuron fields may be given flat (``tau=...``, ``backend=...``) or as
        ``neuron={...}``; ``None`` values are dropped so CLI defaults never clobber the
        variant's own (use ``neuron={"v_reset": None}`` for a soft reset).
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        neuron_over = dict(overrides.pop("neuron", {}) or {})
        if isinstance(neuron_over, NeuronConfig):
            neuron_over = neuron_over.to_dict()
        for k in NEURON_KEYS:
            if k in overrides:
                neuron_over[k] = overrides.pop(k)
        known = {f.name for f in fields(self)} - {"neuron"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown override(s) {unknown}; valid model keys are {sorted(known)} and "
                f"neuron keys {list(NEURON_KEYS)}"
            )
        bad_neuron = sorted(set(neuron_over) - set(NEURON_KEYS))
        if bad_neuron:
            raise ConfigError(f"unknown neuron key(s) {bad_neuron}; valid: {list(NEURON_KEYS)}")
        if "embed_dim" in overrides and "stage_dims" not in overrides and self.stage_dims is not None:
            if overrides["embed_dim"] != self.stage_dims[0]:
                raise ConfigError(
                    f"embed_dim={overrides['embed_dim']} cannot be overridden on a config with "
                    f"stage_dims={list(self.stage_dims)} (the stage-1 width is stage_dims[0]); "
                    f"override stage_dims instead"
                )
        neuron = replace(self.neuron, **neuron_over) if neuron_over else self.neuron
        return replace(self, neuron=neuron, **overrides)

    # ------------------------------------------------------------------ closed forms
    def closed_form_num_params(self) -> int:
        """Parameter count from the closed forms of design doc section 5 (generalised to any
        ``in_chans``, ``patch_size`` and ``mlp_ratio``). BN running stats are buffers, not
        parameters, and are not counted."""
        total = 0
        widths = self.widths
        for s, (C, H, depth) in enumerate(zip(widths, self.grids, self.depths)):
            N = H * H
            if s == 0:
                total += self.in_chans * self.patch_size**2 * C + 2 * C
            elif self.spe:
                n = C // 3
                total += 27 * widths[s - 1] * n + 18 * n * n + 10 * n
            else:
                total += 4 * widths[s - 1] * C + 2 * C
            token = 2 * H * H + 6 * H + 3 * C * C + 2 * C + (0 if self.spe else 2 * C)
            hidden = self.hidden_dim(C)
            channel = 2 * hidden * C + hidden + C + 4 * N  # = 2aC^2 + (a+1)C + 4N
            total += depth * (token + channel)
        C4 = self.widths[-1]
        total += 2 * C4 + C4 * self.num_classes + self.num_classes
        return int(total)
