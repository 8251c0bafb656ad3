"""Image transforms in plain torch (no torchvision): crops, flips, resizes, normalisation.

A transform is described by a :class:`TransformConfig` (a typed dataclass that can travel
through a Ray ``train_loop_config``) and built into an :class:`ImageTransform`, a callable
``(uint8 [C, H, W], torch.Generator) -> float32 [C, H', W']`` in [0, 1]. Normalisation by
mean/std is applied per batch by the loader (one vectorised op instead of one per sample),
using :meth:`ImageTransform.normalize`.

The random ops draw from the generator passed in, which the loader seeds from
``(seed, epoch, rank, worker)``, so augmentation is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_MODES", "TransformConfig", "ImageTransform", "train_preset", "eval_preset", "augment_preset"]

AUGMENT_MODES = ("auto", "none", "crop", "crop-flip")
"""Training augmentation modes (``TrainConfig.augment``, ``mixersnn train --augment``): see
:func:`augment_preset`."""


@dataclass(frozen=True)
class TransformConfig:
    """What to do to each image, in this order.

    1. ``random_resized_crop``: a random crop covering ``scale`` of the area with aspect ratio
       in ``ratio`` (log-uniform), resized to ``img_size`` (the Inception/ImageNet recipe), or
    2. ``resize`` the shorter side to this many pixels, then ``center_crop`` to ``img_size``;
       an image still not ``img_size`` square after that is resized to it, so the output
       always has side ``img_size`` when it is set.
    3. ``pad_crop``: zero-pad by this many pixels on each side and take a random crop of the
       original size (the CIFAR recipe).
    4. ``hflip``: flip left-right with this probability.
    5. scale to [0, 1] and normalise with ``mean``/``std`` (None: the manifest's statistics).

    Attributes:
        img_size: output side length for the crops; None keeps the input size.
        random_resized_crop: enable step 1.
        scale: area fraction range of the random crop.
        ratio: aspect-ratio range (w / h) of the random crop.
        resize: shorter-side length for step 2; None skips the resize.
        center_crop: centre-crop to ``img_size`` in step 2.
        pad_crop: padding in pixels for step 3; 0 disables it.
        hflip: probability of the horizontal flip.
        mean: per-channel mean on the [0, 1] scale; None takes the manifest's.
        std: per-channel std; None takes the manifest's.
    """

    img_size: Optional[int] = None
    random_resized_crop: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    resize: Optional[int] = None
    center_crop: bool = False
    pad_crop: int = 0
    hflip: float = 0.0
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if not (0.0 < self.scale[0] <= self.scale[1] <= 1.0):
            raise ValueError(f"scale={self.scale}; allowed 0 < min <= max <= 1, e.g. (0.08, 1.0)")
        if not (0.0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio={self.ratio}; allowed 0 < min <= max, e.g. (0.75, 1.333)")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip={self.hflip} is a probability; allowed [0, 1]")
        if self.pad_crop < 0:
            raise ValueError(f"pad_crop={self.pad_crop}; allowed >= 0 pixels")
        if (self.random_resized_crop or self.center_crop) and self.img_size is None:
            raise ValueError("random_resized_crop and center_crop need img_size (the output side length)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both mean and std, or neither (then the manifest's statistics are used)")


def train_preset(img_size: int, *, flip: bool = True) -> TransformConfig:
    """The usual training augmentation for an image of side ``img_size``.

    Small images (<= 64 px: MNIST-like, CIFAR) get pad-and-crop by ``img_size // 8`` pixels,
    larger ones the ImageNet random-resized-crop; ``flip`` adds a horizontal flip with
    probability 0.5 (only right for data whose labels survive mirroring).
    """
    hflip = 0.5 if flip else 0.0
    if img_size <= 64:
        return TransformConfig(img_size=img_size, pad_crop=max(1, img_size // 8), hflip=hflip)
    return TransformConfig(img_size=img_size, random_resized_crop=True, hflip=hflip)


def augment_preset(
    mode: str, img_size: int, *, flip_safe: Optional[bool] = None, source_size: Optional[int] = None
) -> TransformConfig:
    """The training transform for an augmentation mode (:data:`AUGMENT_MODES`).

    Args:
        mode: ``none``: the evaluation transform (:func:`eval_preset`); ``crop``: the random
            crop of :func:`train_preset` without a flip; ``crop-flip``: with the flip;
            ``auto``: ``crop-flip`` when ``flip_safe`` is True, else ``crop``.
        img_size: the model's input side.
        flip_safe: the training split manifest's ``flip_safe`` (None: unknown, so no flip).
        source_size: the stored image side, for ``none`` (see :func:`eval_preset`).
    """
    if mode not in AUGMENT_MODES:
        raise ValueError(
            f"augment={mode!r}; allowed: {', '.join(repr(m) for m in AUGMENT_MODES)} ('auto' flips only data "
            f"whose manifest says flips keep the labels)"
        )
    if mode == "none":
        return eval_preset(img_size, source_size=source_size)
    if mode == "auto":
        mode = "crop-flip" if flip_safe is True else "crop"
    return train_preset(img_size, flip=mode == "crop-flip")


def eval_preset(img_size: int, *, source_size: Optional[int] = None) -> TransformConfig:
    """The deterministic evaluation transform.

    Images already at ``img_size`` (``source_size == img_size``) are only normalised; other
    sizes are resized to ``img_size / 0.875`` on the shorter side and centre-cropped (the
    ImageNet convention).
    """
    if source_size is not None and source_size == img_size:
        return TransformConfig(img_size=img_size)
    return TransformConfig(img_size=img_size, resize=int(round(img_size / 0.875)), center_crop=True)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``float [C, H, W]``; antialiased so downscaling does not alias."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


class ImageTransform:
    """A built :class:`TransformConfig`.

    Args:
        config: the transform.
        mean: fallback mean (the manifest's) when ``config.mean`` is None.
        std: fallback std.
    """

    def __init__(self, config: TransformConfig, *, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        self.config = config
        m = config.mean if config.mean is not None else tuple(mean)
        s = config.std if config.std is not None else tuple(std)
        if any(v <= 0 for v in s):
            raise ValueError(f"std={list(s)}; every entry must be > 0")
        self.mean = torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1)

    def _rrc_box(self, h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
        area = h * w
        lo, hi = math.log(self.config.ratio[0]), math.log(self.config.ratio[1])
        for _ in range(10):
            u = torch.rand(3, generator=g).tolist()
            target = area * (self.config.scale[0] + u[0] * (self.config.scale[1] - self.config.scale[0]))
            ar = math.exp(lo + u[1] * (hi - lo))
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                return top, left, ch, cw
        # Fallback after 10 misses (extreme aspect ratios): the largest centred crop in range.
        in_ratio = w / h
        if in_ratio < self.config.ratio[0]:
            cw, ch = w, int(round(w / self.config.ratio[0]))
        elif in_ratio > self.config.ratio[1]:
            ch, cw = h, int(round(h * self.config.ratio[1]))
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, img: torch.Tensor, g: Optional[torch.Generator] = None) -> torch.Tensor:
        """Transform one image.

        Args:
            img: ``uint8 [C, H, W]``.
            g: random generator for the random ops (a fresh unseeded one when None).

        Returns:
            ``float32 [C, H', W']`` in [0, 1] (not yet normalised; see :meth:`normalize`).
        """
        c = self.config
        g = g if g is not None else torch.Generator()
        _, h, w = img.shape
        if c.random_resized_crop:
            top, left, ch, cw = self._rrc_box(h, w, g)
            x = _resize(img[:, top : top + ch, left : left + cw].float(), (c.img_size, c.img_size))  # type: ignore[arg-type]
        else:
            x = img.float()
            if c.resize is not None and min(h, w) != c.resize:
                s = c.resize / min(h, w)
                x = _resize(x, (max(1, round(h * s)), max(1, round(w * s))))
            if c.center_crop:
                hh, ww = x.shape[-2:]
                cs = c.img_size  # type: ignore[assignment]
                if hh < cs or ww < cs:  # too small to crop: scale up first
                    s = cs / min(hh, ww)
                    x = _resize(x, (max(cs, math.ceil(hh * s)), max(cs, math.ceil(ww * s))))
                    hh, ww = x.shape[-2:]
                top, left = (hh - cs) // 2, (ww - cs) // 2
                x = x[:, top : top + cs, left : left + cs]
            if c.img_size is not None and tuple(x.shape[-2:]) != (c.img_size, c.img_size):
                # img_size is the promised output size: a 28-px data set fed to a 32-px model
                # is resized rather than handed over at the wrong size.
                x = _resize(x, (c.img_size, c.img_size))
        if c.pad_crop > 0:
            p = c.pad_crop
            hh, ww = x.shape[-2:]
            x = F.pad(x, (p, p, p, p))
            top = int(torch.randint(0, 2 * p + 1, (1,), generator=g))
            left = int(torch.randint(0, 2 * p + 1, (1,), generator=g))
            x = x[:, top : top + hh, left : left + ww]
        if c.hflip > 0 and float(torch.rand(1, generator=g)) < c.hflip:
            x = x.flip(-1)
        return (x / 255.0).contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``(batch - mean) / std`` for ``float32 [B, C, H, W]`` in [0, 1], in place."""
        if self.mean.shape[1] not in (1, batch.shape[1]):
            raise ValueError(f"mean/std have {self.mean.shape[1]} channels but the images have {batch.shape[1]}")
        return batch.sub_(self.mean).div_(self.std)

    def with_config(self, **changes: object) -> "ImageTransform":
        """A copy with some config fields replaced (keeps the fallback statistics)."""
        return ImageTransform(
            replace(self.config, **changes),  # type: ignore[arg-type]
            mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(),
        )
