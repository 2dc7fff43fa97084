"""The maths of the maps: CAMs in their own units (no per-image min-max), per-class scales and
cuts from the labels, Otsu's per-map cut, pixel-adaptive refinement (PAR), masks and gates."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..cams import absolute_maps_on


def absolute_maps(low: np.ndarray, size: tuple[int, int], scales: np.ndarray | None = None
                  ) -> np.ndarray:
    """Maps ``[N, C, H, W]`` from the ReLU'd feature-resolution maps of a
    :class:`~cam2mask_lib.cams.CamCache` (``[N, V, C, h, w]``, views in aug-smoothing order, or
    ``[N, C, h, w]``) without any per-image scaling: flipped views are flipped back, every view is
    resized (bilinear, half-pixel centres) and the views are averaged. ``scales`` ``[C]`` divides
    each class (see :func:`class_scales`)."""
    return absolute_maps_on("cpu", low, size, scales).numpy()


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

def float_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
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
    maps (numpy, float32; :func:`par_on` leaves them on the images' device). The sum is
    accumulated view by view (no ``[B, K, C, H, W]`` stack: K = 49 with the default
    dilations)."""
    return par_on(maps, images, iterations, dilations, temperature).cpu().numpy()


def par_on(maps, images, iterations: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
           temperature: float = 0.3) -> torch.Tensor:
    """:func:`par`, a float32 tensor on the images' device."""
    with torch.no_grad():
        img = float_tensor(images)
        m = float_tensor(maps).to(img.device)  # on the images' device (the context's: image_loader)
        if img.shape[-2:] != m.shape[-2:]:
            raise ValueError(f"images {tuple(img.shape[-2:])} and maps {tuple(m.shape[-2:])} "
                             f"differ in size")
        aff = par_affinity(img, dilations, temperature)  # [B, K, H, W]
        for _ in range(iterations):
            out = torch.zeros_like(m)
            for k, view in enumerate(_shifted(m, dilations)):
                out += view * aff[:, k:k + 1]
            m = out
        return m


def threshold_masks(maps: np.ndarray, thresholds) -> np.ndarray:
    """uint8 ``maps > thresholds`` with one threshold or one per class (``[C]``)."""
    t = np.broadcast_to(np.asarray(thresholds, np.float32), (np.shape(maps)[1],))
    return (np.asarray(maps) > t[None, :, None, None]).astype(np.uint8)


def gate(masks: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``masks`` with every (image, class) pair where ``allowed`` ``[N, C]`` is False emptied."""
    out = np.array(masks, np.uint8, copy=True)
    out[~np.asarray(allowed, bool)] = 0
    return out
