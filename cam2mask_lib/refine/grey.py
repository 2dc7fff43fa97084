"""The grey level's maths: each pixel's robust z-score against its image or its neighbourhood,
departures of a sign, and the counts that learn from the image labels which departures mark a
class (:class:`Contrast`, :func:`contrast_departures`)."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F

from .maps import float_tensor


def grey_zscore(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(I - median(I)) / (1.4826 MAD(I))`` of each image's grey level (the mean of its
    channels), per pixel: ``[B, H, W]`` float32 for images ``[B, 3, H, W]`` in any range; negative
    where darker than the image's typical grey (a robust z-score: a defect covering less than half
    the image moves neither the median nor the MAD). Computed on the images' device
    (:func:`grey_zscore_on` leaves it there)."""
    return grey_zscore_on(images).cpu().numpy()


def grey_zscore_on(images) -> torch.Tensor:
    """:func:`grey_zscore`, a tensor on the images' device."""
    with torch.no_grad():
        return _robust_z(float_tensor(images).mean(1))


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
    sheet whose grey drifts across the image, where the image's global grey hides it
    (:func:`local_zscore_on` leaves it on the images' device)."""
    return local_zscore_on(images, sigma).cpu().numpy()


def local_zscore_on(images, sigma: float = 0.125) -> torch.Tensor:
    """:func:`local_zscore`, a tensor on the images' device."""
    with torch.no_grad():
        g = float_tensor(images).mean(1, keepdim=True)
        blur = gaussian_blur(g, sigma * min(g.shape[-2:]))
        return _robust_z((g - blur)[:, 0])


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
    class, every pixel passes). A tensor ``z`` gives a tensor on its device (the same
    float32 comparisons)."""
    if isinstance(z, torch.Tensor):
        pol = torch.as_tensor(np.asarray(polarity, np.float32), device=z.device)[None, :, None,
                                                                                 None]
        kk = np.array(np.broadcast_to(np.asarray(k, np.float32), pol.shape[1:2]))
        kk = torch.as_tensor(kk, device=z.device)[None, :, None, None]
        zz = z.float()[:, None]
        return torch.isnan(pol) | (torch.where(pol == 0, zz.abs(), pol * zz) > kk)
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
