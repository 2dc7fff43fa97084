"""What the defect looks like (the *shape*): one small class per grey-level rule, each learning
from the image labels which pixels of a class's region to keep.

A defect on steel is a local departure from the sheet's texture, so inside the region only the
pixels whose grey level departs from the image's typical grey (a robust z-score,
:func:`grey.grey_zscore`) are kept, in a sign and by a number of robust sds per class:

* :class:`NoGreyTest` ("off"): the whole region.
* :class:`EitherSign` ("either"): ``deviation`` sds of either sign, every class.
* :class:`SignFromLabels` ("labels"): the sign of a Welch t-test between the class's images and
  the others' (:func:`grey.class_polarity`); a class without a direction keeps its region.
* :class:`LearntContrast` ("contrast", the default): in the images labelled with the class,
  departures of the defect's sign crowd into its region while the sheet's own are as frequent
  outside it; the sign and sds whose excess inside gives the highest estimated Dice are kept
  (:func:`grey.contrast_departures`), and a class whose departures do not concentrate there keeps
  its region whole. With ``local_region``, a class with a grey cue in its region is measured from
  each pixel's neighbourhood instead (:func:`grey.local_zscore`, which takes out the sheet's slow
  drift of grey); with ``whole_image``, a class its region misses may be tested on local
  departures anywhere in the image, learnt against the images without the class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..utils import ConfigError
from .grey import (Contrast, class_polarity, contrast_departures, departures, grey_zscore,
                   grey_zscore_on, local_zscore, local_zscore_on, region_misses)


@dataclass(frozen=True)
class GreyConfig:
    """``rule``: one of :data:`GREY_RULES`. ``deviation``: the robust sds a pixel must depart by
    ("either", "labels"); ``min_t``: the Welch t a class's direction needs ("labels").
    "contrast" learns the sds per class among ``deviations``, keeps a sign whose departures have
    a purity of at least ``min_purity`` in the region and exceed the sheet's rate by a
    two-proportion z of at least ``min_z``; ``local_region``, ``whole_image``: see the module;
    ``local_sigma``: the neighbourhood's Gaussian, a share of the image's shorter side."""

    rule: str = "contrast"
    deviation: float = 1.0
    min_t: float = 2.58
    deviations: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
    min_purity: float = 0.5
    min_z: float = 2.58
    local_region: bool = True
    whole_image: bool = True
    local_sigma: float = 0.125

    def __post_init__(self):
        if self.rule not in GREY_RULES:
            raise ConfigError(f"refine grey {self.rule!r}: choose one of {tuple(GREY_RULES)}")
        if self.deviation <= 0:
            raise ConfigError(f"refine deviation={self.deviation}: must be > 0")
        if not self.deviations or min(self.deviations) <= 0:
            raise ConfigError(f"refine deviations={self.deviations}: give one or more sds > 0")
        if not 0 < self.min_purity <= 1:
            raise ConfigError(f"refine min_purity={self.min_purity}: must be in (0, 1]")
        if not 0 < self.local_sigma <= 0.3:
            raise ConfigError(f"refine local_sigma={self.local_sigma}: must be in (0, 0.3] (a "
                              "share of the image's shorter side)")
        for name in ("min_t", "min_z"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"refine {name}={getattr(self, name)}: must be > 0")
        object.__setattr__(self, "deviations", tuple(sorted(float(d) for d in self.deviations)))

    def rule_object(self) -> "GreyTest":
        return GREY_RULES[self.rule](self)


@dataclass
class GreyCalibration:
    """Per class: ``polarity`` (+1 bright, -1 dark, 0 either sign, NaN: no grey-level test),
    ``deviations`` (the robust sds, NaN with no test), ``anywhere`` (tested on local departures
    anywhere in the image instead of its region) and ``near`` (departures measured from the
    pixel's neighbourhood, not from the image's grey)."""

    polarity: np.ndarray
    deviations: np.ndarray
    anywhere: np.ndarray | None = None
    near: np.ndarray | None = None


class GreyTest:
    """The base: which pixels of each class depart, once calibrated. A rule overrides
    :meth:`calibrate`; :meth:`departing` reads its calibration."""

    reads_images = True

    def __init__(self, cfg: GreyConfig):
        self.cfg = cfg

    def describe(self) -> str:
        return ""

    def calibrate(self, region, cache, images, labels: np.ndarray, size, chunks, scales,
                  thresholds) -> GreyCalibration:
        raise NotImplementedError

    def departing(self, imgs, cal, factor: float = 1.0) -> torch.Tensor:
        """``[B, C, H, W]`` bool, on the images' device: the pixels of the batch ``imgs``
        departing by ``factor`` x each class's sds in its sign: from the image's grey, or for the
        ``near`` classes from their neighbourhood."""
        k = factor * cal.deviations
        if cal.near.all():
            return departures(local_zscore_on(imgs, self.cfg.local_sigma), k, cal.polarity)
        d = departures(grey_zscore_on(imgs), k, cal.polarity)
        if cal.near.any():
            near = departures(local_zscore_on(imgs, self.cfg.local_sigma), k, cal.polarity)
            pick = torch.as_tensor(cal.near, device=d.device)
            d[:, pick] = near[:, pick]
        return d


class NoGreyTest(GreyTest):
    """"off": every pixel of the region."""

    reads_images = False

    def calibrate(self, region, cache, images, labels, size, chunks, scales, thresholds):
        c = labels.shape[1]
        return GreyCalibration(np.full(c, np.nan), np.full(c, np.nan))


class EitherSign(GreyTest):
    """"either": ``deviation`` sds of either sign, every class."""

    def describe(self):
        return f", pixels > {self.cfg.deviation:g} robust sd from the image's grey"

    def calibrate(self, region, cache, images, labels, size, chunks, scales, thresholds):
        c = labels.shape[1]
        return GreyCalibration(np.zeros(c), np.full(c, self.cfg.deviation))


class SignFromLabels(GreyTest):
    """"labels": ``deviation`` sds in the sign a t-test of the class's images shows."""

    def describe(self):
        return (f", pixels > {self.cfg.deviation:g} robust sd from the image's grey in the "
                f"class's direction where the labels show one (|t| >= {self.cfg.min_t:g}; else "
                f"no grey test)")

    def calibrate(self, region, cache, images, labels, size, chunks, scales, thresholds):
        k = self.cfg.deviation
        balance = np.concatenate([((z > k).mean((1, 2)) - (z < -k).mean((1, 2)))
                                  for z in (grey_zscore(images(ch)) for ch in chunks)])
        polarity = class_polarity(balance, labels, self.cfg.min_t)
        return GreyCalibration(polarity, np.where(np.isnan(polarity), np.nan, k))


class LearntContrast(GreyTest):
    """"contrast": the sign and sds learnt per class from where its departures concentrate."""

    def describe(self):
        c = self.cfg
        frm = (f" (measured then from their neighbourhood, Gaussian {c.local_sigma:g} of "
               f"the side)" if c.local_region else "")
        return (", pixels departing from the image's grey in the sign and by the robust sds "
                "learnt per class from where its departures concentrate"
                f"{frm} (no grey test for a class whose departures do not" + (
                    f"; or, where that beats its region, local departures (Gaussian "
                    f"{c.local_sigma:g} of the side) anywhere in the image, learnt against the "
                    f"images without the class)" if c.whole_image else ")"))

    def calibrate(self, region, cache, images, labels, size, chunks, scales, thresholds):
        """One pass over the images and maps: the departures from the image's grey (and from
        the neighbourhood) counted inside and outside each class's region."""
        cfg, c = self.cfg, labels.shape[1]
        contrast = Contrast.empty(c, cfg.deviations)
        whole, near = Contrast.empty(c, cfg.deviations), Contrast.empty(c, cfg.deviations)
        for ch in chunks:
            imgs = images(ch)
            inside = region.cut(region.maps_on(cache, ch, size, scales, imgs), thresholds)
            inside = inside.cpu().numpy()
            contrast.add(grey_zscore(imgs), inside, labels[ch])
            if cfg.whole_image or cfg.local_region:
                z = local_zscore(imgs, cfg.local_sigma)
                near.add(z, inside, labels[ch], either=False)
                if cfg.whole_image:
                    whole.add_images(z, labels[ch])
        polarity, ks = contrast_departures(contrast, cfg.min_purity, cfg.min_z)
        measured_near = np.zeros(c, bool)
        if cfg.local_region:  # a class with a grey cue in its region: measured on its neighbourhood
            np_, nk = contrast_departures(near, cfg.min_purity, cfg.min_z, signs=polarity)
            measured_near = ~np.isnan(polarity) & ~np.isnan(np_)
            polarity = np.where(measured_near, np_, polarity)
            ks = np.where(measured_near, nk, ks)
        anywhere = np.zeros(c, bool)
        if cfg.whole_image:  # where the region says nothing of the grey, the whole image may
            lp, lk = contrast_departures(whole, cfg.min_purity, cfg.min_z, contrast.n_in)
            anywhere = (np.isnan(polarity) & ~np.isnan(lp)
                        & region_misses(near, lp, lk, cfg.min_purity))
            polarity, ks = np.where(anywhere, lp, polarity), np.where(anywhere, lk, ks)
        return GreyCalibration(polarity, ks, anywhere, measured_near)


GREY_RULES = {"contrast": LearntContrast, "labels": SignFromLabels, "either": EitherSign,
              "off": NoGreyTest}
