"""Segmentation losses of the thesis and the lecture: one small class each, found by name.

As in segmentation-models-pytorch's ``losses/``, each loss is its own ``nn.Module``; here each
also registers its name (``@register("bce_dice")``), so a configuration names a loss with a string
and :func:`make_loss` builds it. Every loss takes logits ``[N, C(+1), H, W]`` and uint8 masks
``[N, C, H, W]`` in which ``IGNORE`` (255) marks pixels that do not count (pseudo-labels):

* ``bce_dice``: the thesis's 0.7 BCE - Dice (C sigmoid masks);
* ``cce_dice``: the thesis's 0.7 CCE - 0.25 Dice over C + 1 softmax masks (background first), with
  class weights (default 2, 2.5, 1, 2 for Severstal's classes, 1 for the background);
* ``focal``: focal loss ``FL = -(1 - p_t)^gamma log p_t`` (gamma 2);
* ``bce_logdice``: the lecture's BCE - ln(Dice);
* ``lovasz``: Lovasz hinge (for fine-tuning);
* ``bce_smooth``: BCE with label smoothing ``y_ls = y (1 - a) + a / 2`` (a = 0.1).

Dice terms are smp's soft Dice: per class over the batch, classes without true pixels left out.
"""
from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from .utils import ConfigError

IGNORE = 255
THESIS_CLASS_WEIGHTS = (2.0, 2.5, 1.0, 2.0)
LOSSES: dict[str, type["SegLoss"]] = {}


def register(name: str):
    """Class decorator: make a loss available to :func:`make_loss` under ``name``."""
    def deco(cls):
        cls.name = name
        LOSSES[name] = cls
        return cls
    return deco


def make_loss(name: str, num_classes: int, **kwargs) -> "SegLoss":
    """A loss by name (see :data:`LOSSES`); ``cce_dice`` expects ``num_classes + 1`` logits."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {tuple(LOSSES)}")
    return LOSSES[name](num_classes, **kwargs)


def output_channels(name: str, num_classes: int) -> int:
    """How many output channels a network trained with loss ``name`` needs."""
    return num_classes + 1 if LOSSES[name].softmax else num_classes


def probabilities(name: str, logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities ``[N, C, H, W]`` from a network trained with loss ``name``: the
    sigmoid, or for a softmax loss the softmax without the background channel."""
    return logits.softmax(1)[:, 1:] if LOSSES[name].softmax else logits.sigmoid()


def masked_bce(logits, target, smooth: float = 0.0):
    """BCE over the pixels that are not IGNORE, with optional label smoothing towards 1/2."""
    valid = target != IGNORE
    y = torch.where(valid, target, torch.zeros_like(target)).float()
    if smooth:
        y = y * (1 - smooth) + smooth / 2
    per = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (per * valid).sum() / valid.sum().clamp_min(1)


def masked_focal(logits, target, gamma: float = 2.0):
    """Sigmoid focal loss ``-(1 - p_t)^gamma log p_t`` averaged over non-IGNORE pixels. Written
    here because smp's FocalLoss fails in multilabel mode with ignore_index (it indexes a class
    slice with the full mask); tests check it equals smp's where nothing is ignored."""
    valid = target != IGNORE
    y = torch.where(valid, target, torch.zeros_like(target)).float()
    logp = -nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per = -((1 - logp.exp()) ** gamma) * logp
    return (per * valid).sum() / valid.sum().clamp_min(1)


def to_class_index(masks: torch.Tensor) -> torch.Tensor:
    """Per-class masks ``[N, C, H, W]`` -> class index ``[N, H, W]`` (0 = background, c + 1 =
    class c; where classes overlap the last wins; IGNORE anywhere -> IGNORE)."""
    m = masks.long()
    ignore = (m == IGNORE).any(1)
    fg = (m == 1)
    idx = torch.zeros(m.shape[0], *m.shape[2:], dtype=torch.long, device=m.device)
    for c in range(m.shape[1]):
        idx[fg[:, c]] = c + 1
    idx[ignore] = IGNORE
    return idx


class SegLoss(nn.Module):
    """Base of the registered losses: ``forward(logits, target)`` with uint8 targets. A loss's
    options (``options``: name -> default, e.g. focal's ``gamma``) become attributes."""

    name = ""
    softmax = False  # True: the network has a background channel first (C + 1 outputs)
    options: dict = {}

    def __init__(self, num_classes: int, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ConfigError(f"loss {self.name!r} has no option(s) {unknown}; its options: "
                              f"{sorted(self.options)}")
        self.num_classes = num_classes
        for k, v in {**self.options, **options}.items():
            setattr(self, k, v)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target.to(torch.long if self.softmax else logits.dtype))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _WithSoftDice(SegLoss):
    """A sigmoid loss with smp's multilabel soft Dice term (``self.dice``)."""

    def __init__(self, num_classes: int, **options):
        super().__init__(num_classes, **options)
        self.dice = smp.losses.DiceLoss("multilabel", from_logits=True, ignore_index=IGNORE)


@register("bce_dice")
class BCEDice(_WithSoftDice):
    """0.7 BCE - Dice (the thesis's loss for sigmoid masks)."""

    def loss(self, logits, target):
        return 0.7 * masked_bce(logits, target) - (1 - self.dice(logits, target))


@register("bce_logdice")
class BCELogDice(_WithSoftDice):
    """BCE - ln(Dice) (the lecture's)."""

    def loss(self, logits, target):
        dice = (1 - self.dice(logits, target)).clamp_min(1e-7)
        return masked_bce(logits, target) - torch.log(dice)


@register("bce_smooth")
class BCESmooth(SegLoss):
    """BCE with label smoothing towards 1/2 (``smoothing`` a = 0.1)."""

    options = {"smoothing": 0.1}

    def loss(self, logits, target):
        return masked_bce(logits, target, self.smoothing)


@register("focal")
class Focal(SegLoss):
    """Sigmoid focal loss (``gamma`` 2)."""

    options = {"gamma": 2.0}

    def loss(self, logits, target):
        return masked_focal(logits, target, self.gamma)


@register("lovasz")
class Lovasz(SegLoss):
    """Lovasz hinge (smp's, multilabel)."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.lovasz = smp.losses.LovaszLoss("multilabel", ignore_index=IGNORE)

    def loss(self, logits, target):
        return self.lovasz(logits, target)


@register("cce_dice")
class CCEDice(SegLoss):
    """0.7 weighted CCE - 0.25 Dice over C + 1 softmax masks (background first); class weights
    (``class_weights``, background 1 added in front) default to the thesis's for 4 classes."""

    softmax = True
    options = {"class_weights": None}

    def __init__(self, num_classes: int, **options):
        super().__init__(num_classes, **options)
        self.sm_dice = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)
        w = list(self.class_weights) if self.class_weights is not None else (
            list(THESIS_CLASS_WEIGHTS) if num_classes == 4 else [1.0] * num_classes)
        self.register_buffer("ce_weights", torch.tensor([1.0] + w, dtype=torch.float32))

    def loss(self, logits, target):
        idx = to_class_index(target)
        ce = nn.functional.cross_entropy(logits, idx, weight=self.ce_weights, ignore_index=IGNORE)
        return 0.7 * ce - 0.25 * (1 - self.sm_dice(logits, idx))
