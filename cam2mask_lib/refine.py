"""Beyond the paper: from CAMs to masks with image-level labels only, one function per technique.

The paper's masks (:mod:`postprocess`) min-max scale every map per image and cut it at a fixed
0.3, so every image the classifier passes gets a foreground whatever the evidence (the "threshold
matters" finding of AMN, CVPR 2022), and the maps have 1/32 of the input's resolution: a mask is
a blob where the network looked, not the defect's shape. Each technique below uses nothing but
the images, their labels and the out-of-fold CAMs and probabilities; no parameter is chosen on
true masks.

Where the evidence is (the *region*):

* :func:`absolute_maps` keeps the CAM's own units (no per-image min-max) and divides each class by
  one scale from its positive images (:func:`class_scales`), so a weak map stays weak;
  :func:`negative_thresholds` cuts it where the images labelled *without* the class rarely reach;
* :func:`otsu_thresholds`: a per-image threshold between the map's two modes (OpenCV's Otsu);
* :func:`par`: pixel-adaptive refinement: the map is propagated between neighbouring pixels of
  similar intensity (after PAR in AFA, CVPR 2022), so it follows edges.

What the defect looks like (the *shape*):

* :func:`grey_zscore`: each pixel's robust z-score against its own image (median and MAD of the
  grey level): a defect on steel is a local departure from the sheet's texture, so inside the
  region only pixels that depart from the image's typical grey are kept;
  :class:`Contrast` and :func:`contrast_departures` learn, per class, which departures to keep
  (the default): in the images labelled with the class, departures of the defect's sign crowd
  into the class's region, while the sheet's own departures are as frequent outside it; the
  sign and the number of robust sds whose excess inside the region gives the highest estimated
  Dice are kept, and a class whose departures do not concentrate there keeps its region whole
  (the grey level says nothing about it). :func:`class_polarity` is the earlier rule: the sign
  from a t-test between the class's images and the others' (a class on images shared with
  classes of the other sign shows none).
* :func:`local_zscore`: the same against the pixel's neighbourhood (the grey level minus its
  Gaussian blur), which finds small defects on an uneven sheet. A class whose CAM region does
  not localise it (its departures do not concentrate there) is tested on the whole image instead:
  :meth:`Contrast.add_images` compares the local departures of the images labelled with the
  class with those of the images without it, and the class keeps them anywhere in the image
  when their estimated Dice beats its whole region's and its region does not hold them
  (:func:`region_misses`).

Learning from them (self-training): :func:`confident_labels` turns a region and a shape into
targets for a segmentation network (defect, background, and an ignored band between), which
:func:`seg_stage.refined_targets` serves to :func:`seg_stage.train_segmenters`.

:class:`RefineConfig` names one combination; :func:`refine_stage` calibrates it on a context and
:meth:`Refined.batches` applies it. The paper's exact pipeline stays in :mod:`postprocess`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .cams import AUG_VIEWS, unflip_views
from .losses import IGNORE
from .metrics import DiceReport, dice
from .pipeline import Context
from .utils import ConfigError


@dataclass(frozen=True)
class RefineConfig:
    """One label-only combination.

    ``region``: where a class's evidence is: "image" (the paper's per-image scaled map above
    ``threshold``), "negatives" (the absolute map above the ``negative_quantile`` of the negative
    images' peaks) or "otsu" (the per-image scaled map above its Otsu threshold).
    ``par_iterations``: pixel-adaptive refinement of the map first (0: off). ``deviation``: inside
    the region keep only pixels whose grey level departs from the image's own by more than this
    many robust standard deviations. ``grey``: which departures count: "contrast" (per class, the
    sign and the number of sds from ``deviations`` learnt from where the departures concentrate
    in the class's labelled images, :func:`contrast_departures`; a class whose departures do not
    reach ``min_purity`` keeps its whole region), "labels" (``deviation`` sds of the sign of
    :func:`class_polarity`: a class whose images are darker (brighter) than the others' by the t
    statistic ``polarity_t``; one without a direction keeps its whole region), "either"
    (``deviation`` sds of either sign) or "off" (no grey-level test: the whole region). Under
    "contrast", ``polarity_t`` is the two-proportion z a sign's concentration needs, and
    ``whole_image``: a class whose departures do not concentrate in its region may be tested on
    the whole image instead, on the departures from each pixel's neighbourhood (a Gaussian of
    ``local_sigma`` x the image's shorter side, :func:`local_zscore`) that are more frequent in
    its labelled images than in the others (:meth:`Contrast.add_images`).
    ``local_region`` (under "contrast"): a class whose departures from the image's grey
    concentrate in its region (it has a grey-level cue there) has its pixels measured from their
    neighbourhood instead (the same :func:`local_zscore`, in the sign the image's grey showed:
    a dark defect draws a bright ring against its blur; the sds learnt again on it), which takes
    out the sheet's slow drift of grey. ``confidence``: the
    classifier's probability a class needs to get a mask. ``band``: the self-training targets'
    background, as factors of the region's cut and of the class's sds: a pixel is background below
    ``band`` x either (or where the label says the class is absent), ignored between."""

    region: str = "image"
    threshold: float = 0.3
    negative_quantile: float = 0.5
    par_iterations: int = 0
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12)
    par_temperature: float = 0.3
    grey: str = "contrast"
    deviation: float = 1.0
    deviations: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
    min_purity: float = 0.5
    polarity_t: float = 2.58
    whole_image: bool = True
    local_sigma: float = 0.125
    local_region: bool = True
    confidence: float = 0.5
    band: float = 0.5

    def __post_init__(self):
        if self.region not in REGIONS:
            raise ConfigError(f"refine region {self.region!r}: choose one of {REGIONS}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"refine threshold={self.threshold}: must be in (0, 1)")
        if not 0 < self.negative_quantile < 1:
            raise ConfigError(f"refine negative_quantile={self.negative_quantile}: must be in (0, 1)")
        if self.par_iterations < 0:
            raise ConfigError(f"refine par_iterations={self.par_iterations}: must be >= 0")
        if self.grey not in GREY_RULES:
            raise ConfigError(f"refine grey {self.grey!r}: choose one of {GREY_RULES}")
        if self.deviation <= 0:
            raise ConfigError(f"refine deviation={self.deviation}: must be > 0")
        if not self.deviations or min(self.deviations) <= 0:
            raise ConfigError(f"refine deviations={self.deviations}: give one or more sds > 0")
        if not 0 < self.min_purity <= 1:
            raise ConfigError(f"refine min_purity={self.min_purity}: must be in (0, 1]")
        if not 0 < self.local_sigma <= 0.3:
            raise ConfigError(f"refine local_sigma={self.local_sigma}: must be in (0, 0.3] (a "
                              "share of the image's shorter side)")
        if self.polarity_t <= 0:
            raise ConfigError(f"refine polarity_t={self.polarity_t}: must be > 0")
        if not 0 <= self.band <= 1:
            raise ConfigError(f"refine band={self.band}: must be in [0, 1]")
        object.__setattr__(self, "par_dilations", tuple(int(d) for d in self.par_dilations))
        object.__setattr__(self, "deviations", tuple(sorted(float(d) for d in self.deviations)))

    @property
    def reads_grey(self) -> bool:
        """Whether the grey-level test is on."""
        return self.grey != "off"

    def describe(self) -> str:
        region = {"image": f"per-image scaled CAM > {self.threshold:g}",
                  "negatives": f"absolute CAM > the negatives' {self.negative_quantile:g} quantile",
                  "otsu": "per-image scaled CAM > its Otsu threshold"}[self.region]
        par = f", PAR {self.par_iterations} iterations" if self.par_iterations else ""
        frm = (f" (measured then from their neighbourhood, Gaussian {self.local_sigma:g} of "
               f"the side)" if self.local_region else "")
        dev = {"contrast": ", pixels departing from the image's grey in the sign and by the "
                           "robust sds learnt per class from where its departures concentrate"
                           f"{frm} (no grey test for a class whose departures do not" + (
                               f"; or, where that beats its region, local departures (Gaussian "
                               f"{self.local_sigma:g} of the side) anywhere in the image, learnt "
                               f"against the images without the class)" if self.whole_image
                               else ")"),
               "labels": f", pixels > {self.deviation:g} robust sd from the image's grey in the "
                         f"class's direction where the labels show one (|t| >= "
                         f"{self.polarity_t:g}; else no grey test)",
               "either": f", pixels > {self.deviation:g} robust sd from the image's grey",
               "off": ""}[self.grey]
        return f"{region}{par}{dev}, confidence {self.confidence:g}"


REGIONS = ("image", "negatives", "otsu")
GREY_RULES = ("contrast", "labels", "either", "off")


# ------------------------------------------------------------------------------------------------
# Maps in their own units
# ------------------------------------------------------------------------------------------------

def absolute_maps(low: np.ndarray, size: tuple[int, int], scales: np.ndarray | None = None
                  ) -> np.ndarray:
    """Maps ``[N, C, H, W]`` from the ReLU'd feature-resolution maps of a
    :class:`~cam2mask_lib.cams.CamCache` (``[N, V, C, h, w]``, views in aug-smoothing order, or
    ``[N, C, h, w]``) without any per-image scaling: flipped views are flipped back, every view is
    resized (bilinear, half-pixel centres) and the views are averaged. ``scales`` ``[C]`` divides
    each class (see :func:`class_scales`)."""
    return absolute_maps_on("cpu", low, size, scales).numpy()


def absolute_maps_on(device, low: np.ndarray, size: tuple[int, int],
                     scales: np.ndarray | None = None) -> torch.Tensor:
    """:func:`absolute_maps` made on ``device`` (only the feature-resolution maps cross to it),
    left there as a float32 tensor."""
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(low, dtype=np.float32)).to(device)
        if t.dim() == 4:
            t = t[:, None]
        if t.shape[1] == len(AUG_VIEWS):
            t = unflip_views(t)
        n, v, c, h, w = t.shape
        up = F.interpolate(t.reshape(n * v, c, h, w), size=tuple(size), mode="bilinear",
                           align_corners=False).reshape(n, v, c, *size).mean(1)
        if scales is not None:
            up /= torch.as_tensor(np.asarray(scales, np.float32), device=up.device)[
                None, :, None, None]
        return up


def class_scales(peaks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the median of the per-image map maxima ``peaks`` ``[N, C]`` over the images
    labelled with the class (1.0 for a class without positives): a typical defect's peak."""
    labels = np.asarray(labels, bool)
    out = np.ones(peaks.shape[1])
    for c in range(peaks.shape[1]):
        if labels[:, c].any():
            out[c] = max(float(np.median(peaks[labels[:, c], c])), 1e-12)
    return out


def negative_thresholds(peaks: np.ndarray, labels: np.ndarray, quantile: float = 0.9
                        ) -> np.ndarray:
    """Per class, the ``quantile`` of the per-image map maxima ``peaks`` ``[N, C]`` over the images
    labelled *without* the class: at 0.9, nine negative images in ten have no pixel above it. A
    class without negatives gets 0.5 (half a typical defect's peak, with scaled maps)."""
    labels = np.asarray(labels, bool)
    out = np.full(peaks.shape[1], 0.5)
    for c in range(peaks.shape[1]):
        if (~labels[:, c]).any():
            out[c] = float(np.quantile(peaks[~labels[:, c], c], quantile))
    return out


def otsu_thresholds(maps: np.ndarray) -> np.ndarray:
    """Per map (last two axes), OpenCV's Otsu threshold of the map quantised to 256 levels of its
    own range, in the map's units: ``[...]`` (a flat map gets its own value: an empty mask)."""
    maps = np.asarray(maps, np.float32)
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = np.empty(len(flat), np.float32)
    for i, m in enumerate(flat):
        lo, hi = float(m.min()), float(m.max())
        if hi - lo <= 1e-12:
            out[i] = hi
            continue
        q = np.round((m - lo) / (hi - lo) * 255).astype(np.uint8)
        t, _ = cv2.threshold(q, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        out[i] = lo + (t + 0.5) / 255 * (hi - lo)  # q > t  <=>  m > this (rounding)
    return out.reshape(maps.shape[:-2])


# ------------------------------------------------------------------------------------------------
# Pixel-adaptive refinement
# ------------------------------------------------------------------------------------------------

def _tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32 ``x``: a tensor stays on its device, an array becomes a CPU tensor."""
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).float()


_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(x: torch.Tensor, dilations: Sequence[int]):
    """``x`` ``[B, C, H, W]`` itself, then its 8 neighbours at every dilation (replicate padding
    at the border), each ``[B, C, H, W]``: K = 1 + 8 x len(dilations) views, in that order."""
    p = max(dilations)
    H, W = x.shape[-2:]
    pad = F.pad(x, (p, p, p, p), mode="replicate")
    yield x
    for d in dilations:
        for dy, dx in _OFFSETS:
            yield pad[..., p + dy * d:p + dy * d + H, p + dx * d:p + dx * d + W]


def _neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """``[B, K, C, H, W]``: the views of :func:`_shifted` of ``x`` ``[B, C, H, W]`` stacked."""
    return torch.stack(list(_shifted(x, dilations)), 1)


def par_affinity(images: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                 temperature: float = 0.3) -> torch.Tensor:
    """Transition weights ``[B, K, H, W]`` (summing to 1 over K: the pixel and its neighbours)
    from the images ``[B, 3, H, W]`` (any range): a softmax over the neighbours of
    ``-(|I_j - I_i| / (temperature * std_i))^2``, with ``std_i`` the spread of the intensities in
    the pixel's neighbourhood, so the map flows along regions of similar intensity."""
    gray = images.float().mean(1)  # NEU and Severstal are grey; colour adds little
    nb = _neighbours(gray[:, None], dilations)[:, :, 0]  # [B, K, H, W]
    std = nb.std(1, keepdim=True)
    diff = (nb - gray[:, None]).abs() / (temperature * std + 1e-6)
    return torch.softmax(-diff ** 2, dim=1)


def par(maps: torch.Tensor | np.ndarray, images: torch.Tensor | np.ndarray, iterations: int = 10,
        dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), temperature: float = 0.3) -> np.ndarray:
    """Pixel-adaptive refinement: ``iterations`` steps of ``m_i <- sum_j a_ij m_j`` over each
    pixel's neighbours with :func:`par_affinity` weights, every class with the same weights.
    ``maps`` ``[B, C, H, W]``; ``images`` ``[B, 3, H, W]`` at the same size. Returns the refined
    maps (numpy, float32). The sum is accumulated view by view (no ``[B, K, C, H, W]`` stack:
    K = 49 with the default dilations)."""
    with torch.no_grad():
        img = _tensor(images)
        m = _tensor(maps).to(img.device)  # on the images' device (the context's: image_loader)
        if img.shape[-2:] != m.shape[-2:]:
            raise ValueError(f"images {tuple(img.shape[-2:])} and maps {tuple(m.shape[-2:])} "
                             f"differ in size")
        aff = par_affinity(img, dilations, temperature)  # [B, K, H, W]
        for _ in range(iterations):
            out = torch.zeros_like(m)
            for k, view in enumerate(_shifted(m, dilations)):
                out += view * aff[:, k:k + 1]
            m = out
        return m.cpu().numpy()


# ------------------------------------------------------------------------------------------------
# The defect's shape: departures from the image's own grey level
# ------------------------------------------------------------------------------------------------

def grey_zscore(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(I - median(I)) / (1.4826 MAD(I))`` of each image's grey level (the mean of its
    channels), per pixel: ``[B, H, W]`` float32 for images ``[B, 3, H, W]`` in any range; negative
    where darker than the image's typical grey (a robust z-score: a defect covering less than half
    the image moves neither the median nor the MAD)."""
    with torch.no_grad():
        return _robust_z(_tensor(images).mean(1)).cpu().numpy()  # on the images' device


def _robust_z(g: torch.Tensor) -> torch.Tensor:
    """``(g - median) / (1.4826 MAD)`` of each ``[H, W]`` map of ``g`` ``[B, H, W]``."""
    flat = g.flatten(1)
    med = flat.median(1).values
    mad = (flat - med[:, None]).abs().median(1).values
    return (g - med[:, None, None]) / (1.4826 * mad[:, None, None] + 1e-3)


def local_zscore(images: torch.Tensor | np.ndarray, sigma: float = 0.125) -> np.ndarray:
    """The robust z-score (:func:`grey_zscore`'s) of each pixel's grey level minus its Gaussian
    blur of ``sigma`` x the image's shorter side (:func:`gaussian_blur`): ``[B, H, W]`` float32,
    negative where a pixel is darker than its neighbourhood. A small defect departs from it on a
    sheet whose grey drifts across the image, where the image's global grey hides it."""
    with torch.no_grad():
        g = _tensor(images).mean(1, keepdim=True)
        blur = gaussian_blur(g, sigma * min(g.shape[-2:]))
        return _robust_z((g - blur)[:, 0]).cpu().numpy()


def _local_z(imgs, cfg: RefineConfig) -> np.ndarray:
    """:func:`local_zscore` with the configuration's blur (``local_sigma``)."""
    return local_zscore(imgs, cfg.local_sigma)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` ``[B, 1, H, W]`` blurred by a Gaussian of ``sigma`` pixels, kernel radius 3 sigma, as
    two 1-D passes over the image mirrored about its border pixels: torchvision's
    ``gaussian_blur`` (50x faster on the CPU at sigma 16 than its 2-D kernel; equal within 1e-4,
    tested)."""
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def class_polarity(balance: np.ndarray, labels: np.ndarray, min_t: float = 2.58) -> np.ndarray:
    """Per class, +1 (bright) or -1 (dark) from the image labels, NaN where they show no direction:
    ``balance`` ``[N]`` is each image's share of bright minus dark departures; a class whose
    images' mean balance differs from the other images' by Welch's t of at least ``min_t`` gets
    that sign."""
    labels = np.asarray(labels, bool)
    out = np.full(labels.shape[1], np.nan)
    for c in range(labels.shape[1]):
        p, n = balance[labels[:, c]], balance[~labels[:, c]]
        if len(p) < 2 or len(n) < 2:
            continue
        se = np.sqrt(p.var(ddof=1) / len(p) + n.var(ddof=1) / len(n))
        t = (p.mean() - n.mean()) / se if se > 0 else 0.0
        if abs(t) >= min_t:
            out[c] = np.sign(t)
    return out


def departures(z: np.ndarray, k, polarity: np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` bool: pixels departing more than ``k`` (one value, or one per class
    ``[C]``) from the image's grey (``z`` ``[B, H, W]``) in each class's direction (``polarity``
    ``[C]``: +1 brighter, -1 darker, 0 either way, NaN: the grey level says nothing about the
    class, every pixel passes)."""
    pol = np.asarray(polarity, np.float32)[None, :, None, None]
    k = np.broadcast_to(np.asarray(k, np.float32), pol.shape[1:2])[None, :, None, None]
    z = np.asarray(z, np.float32)[:, None]
    with np.errstate(invalid="ignore"):  # a NaN k goes with a NaN polarity: every pixel passes
        return np.isnan(pol) | (np.where(pol == 0, np.abs(z), pol * z) > k)


SIGNS = (-1.0, 1.0, 0.0)  # dark, bright, either: the order of Contrast's sign axis


@dataclass
class Contrast:
    """Departures from the image's grey, inside each class's region and outside the regions of
    every class an image is labelled with (so that another defect on the same sheet does not count
    as sheet), counted over the images labelled with the class: ``inside`` and ``outside``
    ``[C, 3, K]`` are the pixels departing by more than ``ks[k]`` robust sds darker, brighter or
    either way (:data:`SIGNS`), ``n_in`` and ``n_out`` ``[C]`` all the pixels in and out of the
    region. Filled batch by batch with :meth:`add`; :func:`contrast_departures` reads it."""

    ks: np.ndarray
    inside: np.ndarray
    outside: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray

    @classmethod
    def empty(cls, num_classes: int, ks) -> "Contrast":
        ks = np.asarray(ks, np.float64)
        shape = (num_classes, len(SIGNS), len(ks))
        return cls(ks, np.zeros(shape), np.zeros(shape), np.zeros(num_classes),
                   np.zeros(num_classes))

    def add(self, z: np.ndarray, region: np.ndarray, present: np.ndarray,
            either: bool = True) -> None:
        """Count a batch: ``z`` ``[B, H, W]`` (:func:`grey_zscore`), ``region`` ``[B, C, H, W]``
        bool, ``present`` ``[B, C]`` the image labels (only labelled images count).
        ``either=False``: dark and bright only, for departures from the neighbourhood
        (:func:`local_zscore`; see :meth:`add_images`)."""
        z = np.asarray(z, np.float32)
        present = np.asarray(present, bool)
        region = np.asarray(region, bool)
        sheet = ~(region & present[:, :, None, None]).any(1)  # [B, H, W]
        for c in np.flatnonzero(present.any(0)):
            pick = present[:, c]
            zz, rr, out = z[pick], region[pick, c], sheet[pick]
            self.n_in[c] += rr.sum()
            self.n_out[c] += out.sum()
            for s, sign in enumerate(SIGNS if either else SIGNS[:2]):
                v = np.abs(zz) if sign == 0 else sign * zz
                self.inside[c, s] += _above(v[rr], self.ks)
                self.outside[c, s] += _above(v[out], self.ks)

    def add_images(self, z: np.ndarray, present: np.ndarray) -> None:
        """Count a batch for the whole-image comparison: ``inside`` the images labelled with the
        class (every pixel), ``outside`` the images without it. ``z`` ``[B, H, W]``
        (:func:`local_zscore`), ``present`` ``[B, C]``. Dark and bright only: against its
        neighbourhood a dark defect draws a bright ring (the blur it is compared with is darker
        there), so "either way" would count the ring as defect."""
        z = np.asarray(z, np.float32).reshape(len(z), -1)
        present = np.asarray(present, bool)
        per_image = np.zeros((len(z), len(SIGNS), len(self.ks)))  # each image counted once
        for s, sign in enumerate(SIGNS[:2]):
            per_image[:, s] = ((sign * z)[:, :, None] > self.ks[None, None]).sum(1)
        for c in range(present.shape[1]):
            for pick, counts, n in ((present[:, c], self.inside, self.n_in),
                                    (~present[:, c], self.outside, self.n_out)):
                n[c] += z[pick].size
                counts[c] += per_image[pick].sum(0)


def _above(values: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """How many of ``values`` exceed each of ``ks`` (one comparison pass per k: 2x faster than a
    sort for 3M values and 8 ks)."""
    return np.array([np.count_nonzero(values > k) for k in ks], np.int64)


def contrast_departures(contrast: Contrast, min_purity: float = 0.5, min_z: float = 2.58,
                        region: np.ndarray | None = None, signs: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the sign (``[C]``: -1 dark, +1 bright, 0 either, NaN: none) and the robust sds
    (``[C]``, NaN with no sign) of the departures that mark its defect, from the image labels
    alone.

    In the images labelled with the class, the sheet departs from its own grey about as often in
    the class's region as outside every labelled class's region, the defect only inside. With
    ``d_in`` and ``d_out`` the shares of region and outside pixels departing by more than k sds
    in a sign, the region holds ``E = n_in (d_in - d_out)`` departing pixels in excess of the
    sheet's rate: the defect's share of them (the *purity*) is ``(d_in - d_out) / d_in``. Taking
    the defect's area ``A`` as
    the largest excess over every sign and k, keeping those pixels has an estimated Dice of
    ``2 E / (n_in d_in + A)``, and keeping the whole region ``2 A / (n_in + A)``. The sign and k
    with the highest estimate among those of purity >= ``min_purity`` are chosen, unless the
    whole region's estimate is higher (then NaN: no grey-level test for the class). A sign and k
    count only where ``d_in`` exceeds ``d_out`` by a two-proportion z of at least ``min_z`` (few
    images must not decide by chance).

    ``region`` ``[C]``: for the whole-image comparison (:meth:`Contrast.add_images`), the pixels
    of each class's region in its labelled images, whose estimate ``2 A / (region + A)`` (the
    region holding the whole defect, at best) a choice must beat instead. ``signs`` ``[C]``: each
    class's choice limited to that sign, and its area to that sign's excess (NaN: no choice for
    the class)."""
    c = contrast
    num = len(c.n_in)
    polarity, ks = np.full(num, np.nan), np.full(num, np.nan)
    for i in range(num):
        if c.n_in[i] == 0 or c.n_out[i] == 0:
            continue
        d_in, d_out = c.inside[i] / c.n_in[i], c.outside[i] / c.n_out[i]  # [signs, K]
        excess = c.n_in[i] * (d_in - d_out)
        allowed = np.ones(len(SIGNS), bool) if signs is None else np.isin(SIGNS, signs[i])
        area = excess[allowed].max() if allowed.any() else 0.0
        if area <= 0:
            continue
        pooled = (c.inside[i] + c.outside[i]) / (c.n_in[i] + c.n_out[i])
        se = np.sqrt(pooled * (1 - pooled) * (1 / c.n_in[i] + 1 / c.n_out[i]))
        with np.errstate(invalid="ignore", divide="ignore"):
            purity = np.where(d_in > 0, (d_in - d_out) / d_in, 0.0)
            z = np.where(se > 0, (d_in - d_out) / se, 0.0)
        est = np.where((purity >= min_purity) & (excess > 0) & (z >= min_z) & allowed[:, None],
                       2 * excess / (c.n_in[i] * d_in + area), -np.inf)
        s, k = np.unravel_index(np.argmax(est), est.shape)
        n_region = c.n_in[i] if region is None else region[i]
        if est[s, k] > 2 * area / (n_region + area):
            polarity[i], ks[i] = SIGNS[s], c.ks[k]
    return polarity, ks


# ------------------------------------------------------------------------------------------------
# Masks and self-training targets
# ------------------------------------------------------------------------------------------------

def threshold_masks(maps: np.ndarray, thresholds) -> np.ndarray:
    """uint8 ``maps > thresholds`` with one threshold or one per class (``[C]``)."""
    t = np.broadcast_to(np.asarray(thresholds, np.float32), (np.shape(maps)[1],))
    return (np.asarray(maps) > t[None, :, None, None]).astype(np.uint8)


def gate(masks: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``masks`` with every (image, class) pair where ``allowed`` ``[N, C]`` is False emptied."""
    out = np.array(masks, np.uint8, copy=True)
    out[~np.asarray(allowed, bool)] = 0
    return out


def confident_labels(defect: np.ndarray, background: np.ndarray, present: np.ndarray
                     ) -> np.ndarray:
    """Self-training targets uint8 ``[N, C, H, W]``: for a class in the image's label, 1 where
    ``defect``, 0 where ``background`` (and not ``defect``), ``losses.IGNORE`` elsewhere; for an
    absent class 0 everywhere (the label says the defect is not there)."""
    out = np.full(np.shape(defect), IGNORE, np.uint8)
    out[np.asarray(background, bool)] = 0
    out[np.asarray(defect, bool)] = 1
    out[~np.asarray(present, bool)] = 0
    return out


# ------------------------------------------------------------------------------------------------
# A combination on a CAM cache
# ------------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """What a combination learns from the image labels: per-class ``scales`` of the absolute maps
    and ``thresholds`` on the scaled (and refined) maps (``region="negatives"``; otherwise ones
    and the fixed threshold), each class's ``polarity`` (+1 bright, -1 dark, 0 either sign, NaN:
    no grey-level test for the class) and ``deviations``, the robust sds a pixel must depart by
    (NaN with no test); ``local``: the classes tested on their local departures anywhere in the
    image instead of their region; ``near``: the classes whose departures are measured from
    each pixel's neighbourhood (:func:`local_zscore`), not from the image's grey
    (:func:`grey_zscore`): every ``local`` class, and inside their region the others under
    ``RefineConfig.local_region`` (none of either by default)."""

    scales: np.ndarray
    thresholds: np.ndarray
    polarity: np.ndarray
    deviations: np.ndarray
    local: np.ndarray | None = None
    near: np.ndarray | None = None

    def __post_init__(self):
        none = np.zeros(len(self.polarity), bool)
        self.local = none if self.local is None else np.asarray(self.local, bool)
        self.near = self.local | (none if self.near is None else np.asarray(self.near, bool))

    def describe(self) -> str:
        f = ", ".join
        sign = {1.0: "bright", -1.0: "dark", 0.0: "either"}
        grey = f("none" if np.isnan(p) else f"{sign[float(p)]} > {k:g} sd"
                 + (" of its neighbourhood" if nr else "")
                 + (", anywhere in the image" if loc else "")
                 for p, k, loc, nr in zip(self.polarity, self.deviations, self.local, self.near))
        return (f"scales [{f(f'{s:.3g}' for s in self.scales)}], thresholds "
                f"[{f(f'{t:.3g}' for t in self.thresholds)}], grey-level test [{grey}]")


def _guide(images, rows, cfg: RefineConfig):
    """The images of ``rows`` when ``cfg`` reads them (PAR or the grey-level test), else None:
    loaded once per batch and shared by both."""
    return images(rows) if cfg.par_iterations or cfg.reads_grey else None


def _maps(cache, rows, size, cfg: RefineConfig, scales, imgs=None) -> np.ndarray:
    """The maps a combination cuts: absolute and scaled ("negatives") or the paper's per-image
    scaled ones, then PAR guided by ``imgs`` (the batch's images)."""
    rows = np.asarray(rows)
    # made where the guide images are (the context's device), as the scoring does
    device = imgs.device if isinstance(imgs, torch.Tensor) else "cpu"
    if cfg.region == "negatives":
        m = absolute_maps_on(device, cache.low()[rows], size, scales)
    else:
        m = cache.maps_on(device, rows, size)
    if cfg.par_iterations:
        return par(m, imgs, cfg.par_iterations, cfg.par_dilations, cfg.par_temperature)
    return m.cpu().numpy() if isinstance(m, torch.Tensor) else m


def calibrate(cache, images, labels: np.ndarray, size: tuple[int, int], cfg: RefineConfig,
              batch: int = 32, device="cpu") -> Calibration:
    """What ``cfg`` needs from the image labels: for ``region="negatives"``, scales and
    thresholds (two passes over the cache: the raw maps' peaks, then the scaled and refined
    maps' peaks); then the grey-level test's sign and sds per class (``grey="contrast"``: one
    pass over the images and maps, :func:`contrast_departures`; ``"labels"``: one pass over the
    images, :func:`class_polarity`). ``images(rows)`` gives ``[b, 3, H, W]`` at ``size``; the raw
    maps are made on ``device`` and only their peaks come back."""
    labels = np.asarray(labels, bool)
    n, c = labels.shape
    chunks = [np.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
    scales, thresholds = np.ones(c), np.full(c, cfg.threshold)
    if cfg.region == "negatives":
        raw = np.concatenate([absolute_maps_on(device, cache.low()[ch], size).amax((-2, -1))
                              .cpu().numpy() for ch in chunks])
        scales = class_scales(raw, labels)
        peaks = (raw / scales[None] if not cfg.par_iterations else np.concatenate(
            [_maps(cache, ch, size, cfg, scales, images(ch)).max((-2, -1)) for ch in chunks]))
        thresholds = negative_thresholds(peaks, labels, cfg.negative_quantile)
    fixed = np.full(c, cfg.deviation)
    if cfg.grey == "off":
        return Calibration(scales, thresholds, np.full(c, np.nan), np.full(c, np.nan))
    if cfg.grey == "either":
        return Calibration(scales, thresholds, np.zeros(c), fixed)
    if cfg.grey == "labels":
        k = cfg.deviation
        balance = np.concatenate([((z > k).mean((1, 2)) - (z < -k).mean((1, 2)))
                                  for z in (grey_zscore(images(ch)) for ch in chunks)])
        polarity = class_polarity(balance, labels, cfg.polarity_t)
        return Calibration(scales, thresholds, polarity, np.where(np.isnan(polarity), np.nan, k))
    region_only = Calibration(scales, thresholds, np.full(c, np.nan), np.full(c, np.nan))
    contrast = Contrast.empty(c, cfg.deviations)
    whole, near = Contrast.empty(c, cfg.deviations), Contrast.empty(c, cfg.deviations)
    for ch in chunks:
        imgs = images(ch)
        region = _region(_maps(cache, ch, size, cfg, scales, imgs), cfg, region_only)
        contrast.add(grey_zscore(imgs), region, labels[ch])
        if cfg.whole_image or cfg.local_region:
            z = _local_z(imgs, cfg)
            near.add(z, region, labels[ch], either=False)
            if cfg.whole_image:
                whole.add_images(z, labels[ch])
    polarity, ks = contrast_departures(contrast, cfg.min_purity, cfg.polarity_t)
    sharp = np.zeros(c, bool)
    if cfg.local_region:  # a class with a grey cue in its region: measured on its neighbourhood
        np_, nk = contrast_departures(near, cfg.min_purity, cfg.polarity_t, signs=polarity)
        sharp = ~np.isnan(polarity) & ~np.isnan(np_)
        polarity, ks = np.where(sharp, np_, polarity), np.where(sharp, nk, ks)
    local = np.zeros(c, bool)
    if cfg.whole_image:  # where the region says nothing of the grey, the whole image may
        lp, lk = contrast_departures(whole, cfg.min_purity, cfg.polarity_t, contrast.n_in)
        local = (np.isnan(polarity) & ~np.isnan(lp)
                 & region_misses(near, lp, lk, cfg.min_purity))
        polarity, ks = np.where(local, lp, polarity), np.where(local, lk, ks)
    return Calibration(scales, thresholds, polarity, ks, local, sharp)


def region_misses(near: Contrast, polarity: np.ndarray, ks: np.ndarray,
                  min_purity: float = 0.5) -> np.ndarray:
    """``[C]`` bool: whether each class's region misses the departures of its sign and sds
    (``polarity``, ``ks`` ``[C]``, from the whole-image comparison): in the images labelled with
    the class, they are not concentrated in its region, their purity there (``near``, counted
    as :meth:`Contrast.add` counts) below ``min_purity``. A region that holds them localises the
    class, and keeps it (NaN polarity: False)."""
    out = np.zeros(len(polarity), bool)
    for i, (p, k) in enumerate(zip(polarity, ks)):
        if np.isnan(p) or near.n_in[i] == 0 or near.n_out[i] == 0:
            out[i] = not np.isnan(p)  # a region of every pixel or of none says nothing
            continue
        s, j = SIGNS.index(float(p)), int(np.flatnonzero(near.ks == k)[0])
        d_in, d_out = near.inside[i, s, j] / near.n_in[i], near.outside[i, s, j] / near.n_out[i]
        out[i] = d_in <= 0 or (d_in - d_out) / d_in < min_purity
    return out


def _departing(imgs, cfg: RefineConfig, cal: Calibration, factor: float = 1.0) -> np.ndarray:
    """``[B, C, H, W]`` bool: the pixels of the batch ``imgs`` departing by ``factor`` x each
    class's sds in its sign: from the image's grey (:func:`grey_zscore`), or for the ``near``
    classes from their neighbourhood (:func:`local_zscore`)."""
    if cal.near.all():
        return departures(_local_z(imgs, cfg), factor * cal.deviations, cal.polarity)
    d = departures(grey_zscore(imgs), factor * cal.deviations, cal.polarity)
    if cal.near.any():
        near = departures(_local_z(imgs, cfg), factor * cal.deviations, cal.polarity)
        d[:, cal.near] = near[:, cal.near]
    return d


def _region(maps: np.ndarray, cfg: RefineConfig, cal: Calibration, factor: float = 1.0
            ) -> np.ndarray:
    """uint8: ``maps`` above ``factor`` x the region's cut (per class, or per map for Otsu)."""
    if cfg.region == "otsu":
        return (maps > factor * otsu_thresholds(maps)[..., None, None]).astype(np.uint8)
    return threshold_masks(maps, factor * cal.thresholds)


def refine_batches(cache, images, rows, probs: np.ndarray, size: tuple[int, int],
                   cfg: RefineConfig, cal: Calibration, batch: int = 32
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(rows, maps, masks)`` per batch: the region (:class:`RefineConfig`), narrowed to the
    pixels that depart from the image's grey level, gated by the classifier
    (``probs[rows] >= cfg.confidence``)."""
    rows = np.asarray(rows)
    for s in range(0, len(rows), batch):
        b = rows[s:s + batch]
        imgs = _guide(images, b, cfg)
        m = _maps(cache, b, size, cfg, cal.scales, imgs)
        masks = _region(m, cfg, cal).astype(bool)
        if cfg.reads_grey:
            d = _departing(imgs, cfg, cal)
            masks &= d
            masks[:, cal.local] = d[:, cal.local]  # a class tested on the whole image: anywhere
        yield b, m, gate(masks, probs[b] >= cfg.confidence)


def self_training_targets(cache, images, rows, labels: np.ndarray, size: tuple[int, int],
                          cfg: RefineConfig, cal: Calibration) -> np.ndarray:
    """:func:`confident_labels` of ``rows``: defect = the combination's mask (gated by the image
    labels, not the classifier); background = outside the region cut at ``band`` x its threshold,
    or pixels that do not depart by ``band`` x the class's sds in its direction; the rest
    ignored."""
    rows = np.asarray(rows)
    imgs = _guide(images, rows, cfg)
    m = _maps(cache, rows, size, cfg, cal.scales, imgs)
    defect = _region(m, cfg, cal).astype(bool)
    background = ~_region(m, cfg, cal, cfg.band).astype(bool)
    if cfg.reads_grey:
        d, near = _departing(imgs, cfg, cal), _departing(imgs, cfg, cal, cfg.band)
        defect &= d
        background |= ~near
        # a class tested on the whole image: its departures anywhere, the rest background
        defect[:, cal.local], background[:, cal.local] = d[:, cal.local], ~near[:, cal.local]
    return confident_labels(defect, background, labels[rows])


# ------------------------------------------------------------------------------------------------
# On a context: the refinement stage
# ------------------------------------------------------------------------------------------------

def image_loader(ctx: Context, size: tuple[int, int]):
    """``images(rows)``: float ``[b, 3, H, W]`` (0-255) at ``size`` on the context's device,
    area-resized there from the classifier's input images (the guide of PAR and of the grey-level
    test, which run where their images are)."""
    ds = ctx.images()
    return lambda rows: guide_images(ds.uint8_batch(np.asarray(rows)), ctx.device, size)


def guide_images(x: torch.Tensor, device, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 batch of the classifier's input images as guide images: float (0-255) on
    ``device``, area-resized to ``size``."""
    size = tuple(int(v) for v in size)
    x = x.to(device).float()
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="area")


@dataclass
class Refined:
    """A combination calibrated on a run's image labels: :meth:`batches` gives its maps and masks
    at ``size`` for any rows."""

    ctx: Context
    cache: object
    config: RefineConfig
    calibration: Calibration
    size: tuple[int, int]

    def batches(self, rows, probs: np.ndarray, batch: int = 32):
        return refine_batches(self.cache, image_loader(self.ctx, self.size), rows, probs,
                              self.size, self.config, self.calibration, batch)

    def score(self, rows, probs: np.ndarray) -> DiceReport:
        """Kaggle Dice of the masks of ``rows`` against the true masks at ``size``, streamed
        batch by batch."""
        values, nonempty = [], []
        for b, _, m in self.batches(rows, probs):
            true = self.ctx.true_masks(b, self.size)
            values.append(dice(m, true))
            nonempty.append(true.any((-2, -1)))
        return DiceReport(np.concatenate(values), np.concatenate(nonempty),
                          self.ctx.index.class_names)

    def targets(self, rows, images: torch.Tensor | None = None) -> np.ndarray:
        """Self-training targets of ``rows`` (:func:`self_training_targets`, image labels).
        ``images``: the uint8 batch of ``rows`` from ``ctx.images()`` when the caller has read it
        already (a training batch), so that the guide images are not read a second time."""
        load = (image_loader(self.ctx, self.size) if images is None else
                lambda _rows: guide_images(images, self.ctx.device, self.size))
        return self_training_targets(self.cache, load, rows,
                                     self.ctx.index.labels.astype(bool), self.size, self.config,
                                     self.calibration)

    def describe(self) -> str:
        return f"{self.config.describe()}; learnt from the labels: {self.calibration.describe()}"


def refine_stage(ctx: Context, cache, config: RefineConfig | None = None,
                 size: tuple[int, int] | None = None) -> Refined:
    """Calibrate ``config`` (default :class:`RefineConfig`) on the context's image labels and the
    out-of-fold CAMs of ``cache``, at ``size`` (default: the segmentation input size)."""
    config = config or RefineConfig()
    size = tuple(size or ctx.seg_size)
    cal = calibrate(cache, image_loader(ctx, size), ctx.index.labels.astype(bool), size, config,
                    device=ctx.device)
    return Refined(ctx, cache, config, cal, size)
