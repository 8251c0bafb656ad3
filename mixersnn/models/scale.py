"""Model families: a found architecture scaled in width, depth and input size.

A search finds one architecture at one size; its family members keep everything that makes it
that architecture (the stage layout, SPE or not, the channel ratio, T, the patch size, the
neuron) and change three things:

- ``width``: a factor on the stage-1 width C (every stage follows: C, 2C, 4C, ...). The result
  is rounded to the nearest width the model accepts: a multiple of 3 with SPE (spiking patch
  encoding splits 2*C_in channels into 3 branches), else any integer, and always one whose
  channel-MLP hidden width (``mlp_ratio * C`` per stage) is whole. A config with independent
  ``stage_dims`` has each stage's width scaled and rounded on its own (a multiple of 3 after
  the first stage with SPE, a whole channel-MLP width).
- ``depth``: a factor on the blocks of every stage, rounded half up, at least 1 per stage; the
  number of stages is kept.
- ``img_size``: the input side in pixels (an absolute size, not a factor); it must be a
  multiple of the patch size.

Pure: no Ray, no MLflow; the CLI (``--scale width=2,depth=1.5,img_size=224``), the train YAML's
``scale:`` block and ``mixersnn models --scale`` all go through :func:`parse_scale` /
:func:`scale_from_mapping` and :func:`scale_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from mixersnn.models.config import ConfigError, MixerSNNConfig

__all__ = ["ModelScale", "SCALE_KEYS", "parse_scale", "scale_from_mapping", "scale_config"]

#: The keys a scale takes.
SCALE_KEYS = ("width", "depth", "img_size")
_EXAMPLE = "e.g. width=2,depth=1.5,img_size=224"


@dataclass(frozen=True)
class ModelScale:
    """How to scale an architecture (the identity when every field is left at its default).

    Attributes:
        width: factor on the stage-1 width C, or on every stage width of ``stage_dims`` (> 0).
        depth: factor on each stage's blocks (> 0).
        img_size: input side in pixels, or None to keep the architecture's.
    """

    width: float = 1.0
    depth: float = 1.0
    img_size: Optional[int] = None

    @property
    def is_identity(self) -> bool:
        return self.width == 1.0 and self.depth == 1.0 and self.img_size is None

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that scale something (``{}`` for the identity)."""
        d: dict[str, Any] = {}
        if self.width != 1.0:
            d["width"] = self.width
        if self.depth != 1.0:
            d["depth"] = self.depth
        if self.img_size is not None:
            d["img_size"] = self.img_size
        return d

    def __str__(self) -> str:
        return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.to_dict().items())


def scale_from_mapping(d: Mapping[str, Any], *, where: str = "scale") -> ModelScale:
    """A :class:`ModelScale` from a mapping (a YAML block or a parsed ``--scale``).

    Raises:
        ConfigError: an unknown key, a factor that is not a number > 0, or an ``img_size`` that
            is not a whole number of pixels >= 1; the message names the value and the fix.
    """
    unknown = sorted(set(d) - set(SCALE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a scale takes {list(SCALE_KEYS)} ({_EXAMPLE})")
    out: dict[str, Any] = {}
    for key in ("width", "depth"):
        if key not in d or d[key] is None:
            continue
        v = d[key]
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key}={v!r} is not a number: give a factor > 0, e.g. {key}=2 "
                              f"(doubles it) or {key}=0.5 (halves it)") from None
        if isinstance(v, bool) or not math.isfinite(f) or f <= 0:
            raise ConfigError(f"{where}: {key}={v!r} is out of range: a factor must be a number > 0, e.g. {key}=2 "
                              f"(doubles it) or {key}=0.5 (halves it); 1 keeps it")
        out[key] = f
    if d.get("img_size") is not None:
        v = d["img_size"]
        try:
            px = float(v)
        except (TypeError, ValueError):
            px = float("nan")
        if isinstance(v, bool) or not math.isfinite(px) or px < 1 or not px.is_integer():
            raise ConfigError(f"{where}: img_size={v!r} is out of range: it is the input side in pixels, a whole "
                              f"number >= 1 (an absolute size, not a factor), e.g. img_size=224")
        out["img_size"] = int(px)
    return ModelScale(**out)


def parse_scale(text: str, *, where: str = "--scale") -> ModelScale:
    """Parse ``"width=2,depth=1.5,img_size=224"`` (any subset, any order).

    Raises:
        ConfigError: a malformed item, a repeated or unknown key, or a bad value.
    """
    d: dict[str, str] = {}
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"{where} {text!r}: {item!r} is not KEY=VALUE; give comma-separated items, "
                              f"{_EXAMPLE}")
        if key in d:
            raise ConfigError(f"{where} {text!r}: {key} is given twice; give each of {list(SCALE_KEYS)} once")
        d[key] = value
    if not d:
        raise ConfigError(f"{where} {text!r} scales nothing; give at least one of {list(SCALE_KEYS)} ({_EXAMPLE})")
    return scale_from_mapping(d, where=where)


def _nearest_width(target: float, step: int, multiples: tuple[int, ...], mlp_ratio: float) -> Optional[int]:
    """The width nearest ``target`` (ties: the wider) that is a multiple of ``step`` (>= step)
    and whose ``mlp_ratio * w * k`` is whole for every ``k`` of ``multiples``; None if none is
    near."""

    def valid(w: int) -> bool:
        return w >= step and all(abs(mlp_ratio * w * k - round(mlp_ratio * w * k)) <= 1e-9 for k in multiples)

    # Candidates on the step grid, nearest the target first: the first that is valid wins.
    base = max(step, int(math.floor(target / step)) * step)
    cands = sorted({base + k * step for k in range(-64, 65) if base + k * step >= step},
                   key=lambda w: (abs(w - target), -w))
    return next((w for w in cands if valid(w)), None)


def _width(cfg: MixerSNNConfig, factor: float, where: str) -> int:
    """The valid width nearest ``factor * C`` (ties: the wider); see the module docstring."""
    target = cfg.embed_dim * factor
    step = 3 if cfg.spe else 1
    w = _nearest_width(target, step, tuple(2**s for s in range(cfg.num_stages)), cfg.mlp_ratio)
    if w is not None:
        return w
    rule = "a multiple of 3 (SPE)" if cfg.spe else "a whole number"
    raise ConfigError(f"{where}: width={factor:g} gives C={target:g}, and no width near it is {rule} with a whole "
                      f"channel-MLP width at mlp_ratio={cfg.mlp_ratio:g}; use another width factor")


def _stage_widths(cfg: MixerSNNConfig, factor: float, where: str) -> tuple[int, ...]:
    """Each of ``cfg.stage_dims`` times ``factor``, rounded to the nearest width that stage
    accepts (a multiple of 3 after the first stage with SPE; a whole channel-MLP width)."""
    assert cfg.stage_dims is not None
    out = []
    for s, d in enumerate(cfg.stage_dims):
        target = d * factor
        step = 3 if cfg.spe and s > 0 else 1
        spe = " with SPE" if step == 3 else ""
        if target < 0.5 * step:  # rounds below the narrowest width the stage takes
            raise ConfigError(f"{where}: width={factor:g} makes stage {s}'s width {target:g} from {d}: below the "
                              f"narrowest width ({step}{spe}); use width >= {step / d:.3g}")
        w = _nearest_width(target, step, (1,), cfg.mlp_ratio)
        if w is None:
            rule = "a multiple of 3 (SPE)" if step == 3 else "a whole number"
            raise ConfigError(f"{where}: width={factor:g} gives stage {s} width {target:g}, and no width near it "
                              f"is {rule} with a whole channel-MLP width at mlp_ratio={cfg.mlp_ratio:g}; use "
                              f"another width factor")
        out.append(w)
    return tuple(out)


def scale_config(cfg: MixerSNNConfig, scale: ModelScale, *, where: str = "--scale") -> MixerSNNConfig:
    """The family member of ``cfg`` at ``scale``: width, depth and input size changed, the
    stage layout, SPE, channel ratio, T, patch size and neuron kept.

    Args:
        cfg: the architecture to scale (validated).
        scale: the factors and size.
        where: how the scale was given (``--scale`` or ``scale:``), for the error message.

    Raises:
        ConfigError: the scaled model would break a constraint (too narrow for SPE, an input
            size that is not a multiple of the patch); the message names the value and the fix.
    """
    over: dict[str, Any] = {}
    if scale.width != 1.0 and cfg.stage_dims is not None:
        over["stage_dims"] = _stage_widths(cfg, scale.width, where)
    elif scale.width != 1.0:
        target = cfg.embed_dim * scale.width
        step = 3 if cfg.spe else 1
        if target < step - 0.5 * step:  # rounds below the narrowest width the model takes
            lo = step / cfg.embed_dim
            raise ConfigError(f"{where}: width={scale.width:g} makes C={target:g} from C={cfg.embed_dim}: below the "
                              f"narrowest width ({step}{' with SPE' if cfg.spe else ''}); use width >= {lo:.3g}")
        over["embed_dim"] = _width(cfg, scale.width, where)
    if scale.depth != 1.0:
        # Half up (Python's round() is to even: 2.5 -> 2), at least one block per stage.
        over["depths"] = tuple(max(1, int(math.floor(d * scale.depth + 0.5))) for d in cfg.depths)
    if scale.img_size is not None:
        p = cfg.patch_size
        if scale.img_size % p:
            lo = scale.img_size - scale.img_size % p
            near = [s for s in (lo, lo + p) if s >= p]
            raise ConfigError(f"{where}: img_size={scale.img_size} is not a multiple of the model's patch_size={p} "
                              f"(the patch grid would be {scale.img_size / p:g}); use img_size="
                              f"{' or '.join(str(s) for s in near)}")
        over["img_size"] = scale.img_size
    if not over:
        return cfg
    try:
        return cfg.replace(**over)
    except ConfigError as err:
        raise ConfigError(f"{where} {scale}: the scaled model is invalid: {err}") from None
