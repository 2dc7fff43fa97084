"""One label-only combination of a region rule and a grey-level rule (:class:`RefineConfig`):
:class:`Technique` calibrates it on the image labels and the out-of-fold CAMs, then applies it to
any rows, as masks (gated by the classifier) or as self-training targets (gated by the labels)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..segment import confident_labels
from ..utils import ConfigError, chunks
from .maps import gate
from .region import Region, RegionConfig
from .shape import GreyConfig, GreyTest


@dataclass(frozen=True)
class RefineConfig:
    """A combination: where the evidence is (``region``, :class:`region.RegionConfig`; a rule's
    name stands for its defaults) and which of its pixels to keep (``grey``,
    :class:`shape.GreyConfig`, likewise). ``confidence``: the classifier's probability a class
    needs to get a mask. ``band``: the self-training targets' background, as a factor of the
    region's cut and of the class's sds: a pixel is background below ``band`` x either (or where
    the label says the class is absent), ignored between."""

    region: RegionConfig = field(default_factory=RegionConfig)
    grey: GreyConfig = field(default_factory=GreyConfig)
    confidence: float = 0.5
    band: float = 0.5

    def __post_init__(self):
        if isinstance(self.region, str):
            object.__setattr__(self, "region", RegionConfig(self.region))
        if isinstance(self.grey, str):
            object.__setattr__(self, "grey", GreyConfig(self.grey))
        if not 0 <= self.band <= 1:
            raise ConfigError(f"refine band={self.band}: must be in [0, 1]")

    @property
    def reads_grey(self) -> bool:
        """Whether the grey-level test is on."""
        return self.grey.rule != "off"

    def describe(self) -> str:
        t = Technique(self)
        return f"{t.region.describe()}{t.grey.describe()}, confidence {self.confidence:g}"


@dataclass
class Calibration:
    """What a combination learns from the image labels: per-class ``scales`` of the maps and
    ``thresholds`` on them (:meth:`region.Region.calibrate`), and the grey-level rule's
    (:class:`shape.GreyCalibration`): each class's ``polarity`` (+1 bright, -1 dark, 0 either
    sign, NaN: no grey-level test) and ``deviations`` (robust sds, NaN with no test);
    ``anywhere``: the classes tested on their local departures anywhere in the image instead of
    their region; ``near``: the classes whose departures are measured from each pixel's
    neighbourhood, not from the image's grey (every ``anywhere`` class, and inside their region
    the others under ``GreyConfig.local_region``)."""

    scales: np.ndarray
    thresholds: np.ndarray
    polarity: np.ndarray
    deviations: np.ndarray
    anywhere: np.ndarray | None = None
    near: np.ndarray | None = None

    def __post_init__(self):
        none = np.zeros(len(self.polarity), bool)
        self.anywhere = none if self.anywhere is None else np.asarray(self.anywhere, bool)
        self.near = self.anywhere | (none if self.near is None else np.asarray(self.near, bool))

    def describe(self) -> str:
        f = ", ".join
        sign = {1.0: "bright", -1.0: "dark", 0.0: "either"}
        grey = f("none" if np.isnan(p) else f"{sign[float(p)]} > {k:g} sd"
                 + (" of its neighbourhood" if nr else "")
                 + (", anywhere in the image" if loc else "")
                 for p, k, loc, nr in zip(self.polarity, self.deviations, self.anywhere,
                                          self.near))
        return (f"scales [{f(f'{s:.3g}' for s in self.scales)}], thresholds "
                f"[{f(f'{t:.3g}' for t in self.thresholds)}], grey-level test [{grey}]")


class Technique:
    """A :class:`RefineConfig`'s region rule and grey-level rule: :meth:`calibrate` learns from
    the labels, :meth:`masks` and :meth:`targets` apply what it learnt. ``images(rows)`` gives
    the guide images ``[b, 3, H, W]`` of ``rows`` at ``size``; ``cache`` the out-of-fold CAMs."""

    def __init__(self, cfg: RefineConfig):
        self.cfg = cfg
        self.region: Region = cfg.region.rule_object()
        self.grey: GreyTest = cfg.grey.rule_object()

    def _guide(self, images, rows):
        """The images of ``rows`` when a rule reads them (PAR or the grey-level test), else None:
        loaded once per batch and shared by both."""
        return images(rows) if self.cfg.region.par_iterations or self.grey.reads_images else None

    def calibrate(self, cache, images, labels: np.ndarray, size: tuple[int, int],
                  batch: int = 32, device="cpu") -> Calibration:
        """The region's scales and thresholds (on ``device``; only peaks come back), then the
        grey-level rule's signs and sds per class."""
        labels = np.asarray(labels, bool)
        n = len(labels)
        parts = list(chunks(np.arange(n), batch))
        scales, thresholds = self.region.calibrate(cache, images, labels, size, parts, device)
        g = self.grey.calibrate(self.region, cache, images, labels, size, parts, scales,
                                thresholds)
        return Calibration(scales, thresholds, g.polarity, g.deviations, g.anywhere, g.near)

    def _kept(self, imgs, maps: torch.Tensor, cal: Calibration, factor: float = 1.0
              ) -> torch.Tensor:
        """bool, where ``maps`` are: the region cut at ``factor`` x its thresholds, narrowed to
        the pixels departing by ``factor`` x each class's sds in its sign (a class tested
        ``anywhere``: its departures anywhere)."""
        kept = self.region.cut(maps, cal.thresholds, factor)
        if self.cfg.reads_grey:
            d = self.grey.departing(imgs, cal, factor)
            anywhere = torch.as_tensor(cal.anywhere, device=maps.device)
            kept &= d
            kept[:, anywhere] = d[:, anywhere]
        return kept

    def masks(self, cache, images, rows, probs: np.ndarray, size: tuple[int, int],
              cal: Calibration, batch: int = 32
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(rows, maps, masks)`` per batch, numpy: the kept pixels (:meth:`_kept`), gated by the
        classifier (``probs[rows] >= confidence``)."""
        rows = np.asarray(rows)
        for b in chunks(rows, batch):
            imgs = self._guide(images, b)
            m = self.region.maps_on(cache, b, size, cal.scales, imgs)
            kept = self._kept(imgs, m, cal).cpu().numpy()
            yield b, m.cpu().numpy(), gate(kept, probs[b] >= self.cfg.confidence)

    def targets(self, cache, images, rows, labels: np.ndarray, size: tuple[int, int],
                cal: Calibration) -> np.ndarray | torch.Tensor:
        """Self-training targets (:func:`segment.confident_labels`) of ``rows``: defect = the
        mask (gated by the image labels, not the classifier); background = what the same rule
        does not keep at ``band`` x its cuts (outside the region cut at ``band`` x its threshold,
        or not departing by ``band`` x the class's sds); the rest ignored. Made where the guide
        images are, as torch: a uint8 tensor there for tensor images (a training batch's
        targets stay on its device), numpy for numpy images or none."""
        rows = np.asarray(rows)
        imgs = self._guide(images, rows)
        m = self.region.maps_on(cache, rows, size, cal.scales, imgs)
        background = ~self._kept(imgs, m, cal, self.cfg.band)
        out = confident_labels(self._kept(imgs, m, cal), background, labels[rows])
        return out if isinstance(imgs, torch.Tensor) else out.cpu().numpy()


def calibrate(cache, images, labels, size, cfg: RefineConfig, batch: int = 32,
              device="cpu") -> Calibration:
    """:meth:`Technique.calibrate` of ``cfg``."""
    return Technique(cfg).calibrate(cache, images, labels, size, batch, device)


def refine_batches(cache, images, rows, probs, size, cfg: RefineConfig, cal: Calibration,
                   batch: int = 32):
    """:meth:`Technique.masks` of ``cfg``."""
    return Technique(cfg).masks(cache, images, rows, probs, size, cal, batch)


def self_training_targets(cache, images, rows, labels, size, cfg: RefineConfig,
                          cal: Calibration) -> np.ndarray:
    """:meth:`Technique.targets` of ``cfg``."""
    return Technique(cfg).targets(cache, images, rows, labels, size, cal)
