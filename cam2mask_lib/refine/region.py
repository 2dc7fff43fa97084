"""Where a class's evidence is (the *region*): one small class per rule, each calibrated on the
image labels and the out-of-fold CAMs, then cutting any batch's maps.

* :class:`ScaledRegion` ("image"): the paper's rule, the map min-max scaled per image above a
  fixed ``threshold``. Every image the classifier passes gets a foreground, whatever the evidence.
* :class:`NegativesRegion` ("negatives"): the CAM in its own units, divided by one scale per class
  from its positive images (:func:`maps.class_scales`), cut where the images labelled *without*
  the class rarely reach (:func:`maps.negative_thresholds`): a weak map stays weak.
* :class:`OtsuRegion` ("otsu"): the per-image scaled map above its own Otsu threshold.

Any of them may first propagate the map between neighbouring pixels of similar intensity
(pixel-adaptive refinement, :func:`maps.par`; ``par_iterations`` > 0), so that it follows edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..utils import ConfigError
from .maps import class_scales, negative_thresholds, otsu_thresholds, par_on


@dataclass(frozen=True)
class RegionConfig:
    """``rule``: one of :data:`REGIONS`. ``threshold``: the cut of the per-image scaled map
    ("image"); ``negative_quantile``: the quantile of the negative images' peaks that cuts the
    absolute map ("negatives"). ``par_iterations``: pixel-adaptive refinement first (0: off),
    over neighbours at ``par_dilations`` with affinity ``par_temperature``."""

    rule: str = "image"
    threshold: float = 0.3
    negative_quantile: float = 0.5
    par_iterations: int = 0
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12)
    par_temperature: float = 0.3

    def __post_init__(self):
        if self.rule not in REGIONS:
            raise ConfigError(f"refine region {self.rule!r}: choose one of {tuple(REGIONS)}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"refine threshold={self.threshold}: must be in (0, 1)")
        if not 0 < self.negative_quantile < 1:
            raise ConfigError(f"refine negative_quantile={self.negative_quantile}: must be in (0, 1)")
        if self.par_iterations < 0:
            raise ConfigError(f"refine par_iterations={self.par_iterations}: must be >= 0")
        object.__setattr__(self, "par_dilations", tuple(int(d) for d in self.par_dilations))

    def rule_object(self) -> "Region":
        return REGIONS[self.rule](self)


class Region:
    """The base: the paper's per-image scaled maps, one fixed cut for every class. A rule
    overrides :meth:`raw_maps` (which map it cuts), :meth:`calibrate` (what it learns from the
    labels) or :meth:`cut` (how it cuts)."""

    describe_rule = "per-image scaled CAM > {threshold:g}"

    def __init__(self, cfg: RegionConfig):
        self.cfg = cfg

    def describe(self) -> str:
        c = self.cfg
        par_ = f", PAR {c.par_iterations} iterations" if c.par_iterations else ""
        return self.describe_rule.format(threshold=c.threshold,
                                         quantile=c.negative_quantile) + par_

    def raw_maps(self, cache, rows, size, scales, device):
        """The maps before PAR, made on ``device``."""
        return cache.maps_on(device, rows, size)

    def maps(self, cache, rows, size, scales, imgs=None) -> np.ndarray:
        """The maps this rule cuts for ``rows`` (numpy ``[b, C, H, W]``; :meth:`maps_on` leaves
        them where they are made)."""
        return self.maps_on(cache, rows, size, scales, imgs).cpu().numpy()

    def maps_on(self, cache, rows, size, scales, imgs=None) -> torch.Tensor:
        """The maps, a float32 tensor made where the guide images ``imgs`` are (the context's
        device, as the scoring does), PAR guided by them."""
        device = imgs.device if isinstance(imgs, torch.Tensor) else "cpu"
        m = torch.as_tensor(self.raw_maps(cache, np.asarray(rows), size, scales, device))
        if self.cfg.par_iterations:
            c = self.cfg
            return par_on(m, imgs, c.par_iterations, c.par_dilations, c.par_temperature)
        return m

    def calibrate(self, cache, images, labels: np.ndarray, size, chunks, device
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Per-class ``scales`` of the maps and ``thresholds`` on them: ones and the fixed cut."""
        c = labels.shape[1]
        return np.ones(c), np.full(c, self.cfg.threshold)

    def cut(self, maps: torch.Tensor, thresholds: np.ndarray, factor: float = 1.0
            ) -> torch.Tensor:
        """bool, on the maps' device: ``maps`` above ``factor`` x each class's threshold (in
        float32, as :func:`maps.threshold_masks` compares)."""
        t = np.broadcast_to(np.asarray(factor * thresholds, np.float32), (maps.shape[1],))
        return maps > torch.as_tensor(np.array(t), device=maps.device)[None, :, None, None]


class ScaledRegion(Region):
    """"image": the base's rule, the paper's."""


class NegativesRegion(Region):
    """"negatives": absolute maps scaled per class, cut at the negative images' peaks."""

    describe_rule = "absolute CAM > the negatives' {quantile:g} quantile"

    def raw_maps(self, cache, rows, size, scales, device):
        return cache.absolute_on(device, rows, size, scales)

    def calibrate(self, cache, images, labels, size, chunks, device):
        """Two passes over the cache: the raw maps' peaks give the scales, then the scaled (and
        refined) maps' peaks the thresholds; only the peaks come back from ``device``."""
        raw = np.concatenate([cache.absolute_on(device, ch, size).amax((-2, -1))
                              .cpu().numpy() for ch in chunks])
        scales = class_scales(raw, labels)
        peaks = (raw / scales[None] if not self.cfg.par_iterations else np.concatenate(
            [self.maps(cache, ch, size, scales, images(ch)).max((-2, -1)) for ch in chunks]))
        return scales, negative_thresholds(peaks, labels, self.cfg.negative_quantile)


class OtsuRegion(Region):
    """"otsu": each per-image scaled map above its own Otsu threshold."""

    describe_rule = "per-image scaled CAM > its Otsu threshold"

    def cut(self, maps, thresholds, factor=1.0):
        t = torch.as_tensor(otsu_thresholds(maps.cpu().numpy()), device=maps.device)
        return maps > factor * t[..., None, None]


REGIONS = {"image": ScaledRegion, "negatives": NegativesRegion, "otsu": OtsuRegion}
