"""From CAMs to masks: the paper's three post-processing parameters, their search, and export.

For class ``c`` of image ``i``, with out-of-fold probability ``p_ic`` and CAM ``m_ic`` in [0, 1]:

* ``confidence``: no mask at all unless ``p_ic >= confidence``;
* ``threshold``: the mask is ``m_ic > threshold``;
* ``min_area`` (the paper's ``min_seg_len``): a mask with fewer pixels is emptied.

Each can be one number or one per class. The search scores every combination on the union of the
out-of-fold predictions without re-binarising per combination: for each threshold it streams the
maps once and keeps, per (image, class), the intersection with the true mask and the predicted
area; a combination then only chooses, per pair, between that mask and the empty mask.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .data import resize_mask, rle_encode
from .metrics import DiceReport, dice_pairs
from .utils import atomic_write_bytes, atomic_write_text

# The search grid of the post-processing (the paper's three parameters): binarisation thresholds
# in 0.1 steps plus the paper's 0.75 and a low 0.05 (each costs a pass over all maps), classifier
# confidences, and minimum areas as shares of the image (see :func:`min_area_grid`).
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
CONFIDENCES = tuple(round(c, 2) for c in np.arange(0.1, 0.91, 0.1))
MIN_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01)


def min_area_grid(size: tuple[int, int]) -> list[int]:
    """The minimum-area grid in pixels for masks of ``size`` (the scoring resolution)."""
    h, w = size
    return [round(f * h * w) for f in MIN_AREA_FRACTIONS]


@dataclass
class Params:
    confidence: float | Sequence[float] = 0.5
    threshold: float | Sequence[float] = 0.3
    min_area: float | Sequence[float] = 0

    def per_class(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        def arr(v, name):
            a = np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy() if np.ndim(v) == 0 \
                else np.asarray(v, dtype=np.float64)
            if a.shape != (n,):
                raise ValueError(f"{name} has {a.size} values; expected 1 or {n} (one per class)")
            return a
        return (arr(self.confidence, "confidence"), arr(self.threshold, "threshold"),
                arr(self.min_area, "min_area"))

    def describe(self) -> str:
        def fmt(v):
            return (f"{float(v):g}" if np.ndim(v) == 0 else
                    "[" + ", ".join(f"{float(x):g}" for x in v) + "]")
        return (f"confidence={fmt(self.confidence)}, threshold={fmt(self.threshold)}, "
                f"min_area={fmt(self.min_area)}")


def apply(maps: np.ndarray, probs: np.ndarray, params: Params) -> np.ndarray:
    """Binary masks ``[N, C, H, W]`` (uint8) from maps ``[N, C, H, W]`` and probabilities ``[N, C]``.
    Maps given as a tensor give a uint8 tensor made on their device (the same masks)."""
    n, c = maps.shape[:2]
    conf, thr, min_area = params.per_class(c)
    if isinstance(maps, torch.Tensor):
        return _apply_t(maps, probs, conf, thr, min_area)
    masks = (maps > thr[None, :, None, None]).astype(np.uint8)
    keep = (probs >= conf[None, :]) & (masks.sum((-2, -1)) >= min_area[None, :])
    masks[~keep] = 0
    return masks


def _apply_t(maps: torch.Tensor, probs, conf, thr, min_area) -> torch.Tensor:
    """:func:`apply` on the maps' device; float32 maps are compared with each class's cut in
    float32 (:func:`cut_in`), which decides as numpy's comparison in float64 does."""
    maps, dt = _comparable(maps)
    cut = torch.tensor([float(cut_in(t, dt)) for t in thr], dtype=maps.dtype, device=maps.device)
    masks = (maps > cut[None, :, None, None]).to(torch.uint8)
    area = masks.sum((-2, -1), dtype=torch.int64)
    keep = ((torch.as_tensor(np.asarray(probs) >= conf[None, :], device=maps.device))
            & (area >= torch.as_tensor(min_area, device=maps.device)[None, :]))
    return masks * keep[:, :, None, None].to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------

@dataclass
class Stats:
    """Per threshold: intersections and predicted areas ``[T, N, C]``; true areas ``[N, C]``."""

    thresholds: np.ndarray
    inter: np.ndarray
    area: np.ndarray
    true_area: np.ndarray
    pixels: int  # H * W at the scoring resolution
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, int))

    def t_index(self, t: float) -> int:
        i = int(np.argmin(np.abs(self.thresholds - t)))
        if abs(self.thresholds[i] - t) > 1e-9:
            raise ValueError(f"threshold {t} was not collected; have {self.thresholds.tolist()}")
        return i


def count_set(b: np.ndarray) -> np.ndarray:
    """``b.sum((-2, -1))`` of a boolean array, int64, 2x faster: each row is summed as bytes into
    uint16 (no widening of every pixel to int64), then the rows."""
    row = np.uint16 if b.shape[-1] < 2**16 else np.int64
    return b.view(np.uint8).sum(-1, dtype=row).sum(-1, dtype=np.int64)


def cut_in(t: float, dtype) -> float | np.floating:
    """A threshold ``c`` in the maps' own float type with ``maps > c`` equal to ``maps > t`` (t
    compared exactly): for float32 maps the largest float32 not above ``t``, so the comparison
    runs in float32 instead of widening every pixel to float64."""
    if np.dtype(dtype) != np.float32:
        return t
    c = np.float32(t)
    return c if c <= t else np.nextafter(c, np.float32(-np.inf))


def _comparable(maps: torch.Tensor) -> tuple[torch.Tensor, type]:
    """``maps`` in float32 or float64 (half maps widened to float32) and the numpy type whose
    :func:`cut_in` cut decides on them as numpy's exact comparison does."""
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    return maps, (np.float32 if maps.dtype == torch.float32 else np.float64)


def _counts(maps: np.ndarray, true: np.ndarray, th: np.ndarray) -> tuple[np.ndarray, ...]:
    """True areas ``[B, C]``, predicted areas and intersections ``[T, B, C]`` of one batch."""
    t = np.asarray(true) != 0
    ib, ab = [], []
    for thr in th:
        b = maps > cut_in(thr, maps.dtype)
        ab.append(count_set(b))
        b &= t
        ib.append(count_set(b))
    return count_set(t), np.stack(ab), np.stack(ib)


def _counts_t(maps: torch.Tensor, true, th: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`_counts` where the maps are, on an accelerator: the comparisons and sums run on the
    maps' device and only the counts come back (``.cpu()``). The cut is the numpy path's
    (:func:`cut_in`), so the counts are equal (a test)."""
    t = torch.as_tensor(np.asarray(true) if not isinstance(true, torch.Tensor) else true)
    t = t.to(maps.device, non_blocking=True) != 0
    maps, dt = _comparable(maps)
    ab, ib = [], []
    for thr in th:
        b = maps > float(cut_in(thr, dt))  # exact: a Python float that float32 holds
        ab.append(b.sum((-2, -1)))
        ib.append((b & t).sum((-2, -1)))
    return (t.sum((-2, -1)).cpu().numpy(), torch.stack(ab).cpu().numpy(),
            torch.stack(ib).cpu().numpy())


def collect_stats(map_batches, true_batches, thresholds: Sequence[float],
                  rows: np.ndarray | None = None) -> Stats:
    """Stream ``(maps [B, C, H, W], true masks [B, C, H, W])`` batches into :class:`Stats`
    (one comparison per threshold and batch: measured faster here than binning all thresholds at
    once with searchsorted + bincount). ``rows``: the dataset rows of the batches, in order.

    Maps may be numpy arrays or tensors. A tensor on an accelerator is counted there (the true
    masks go to it; only the counts come back); one on the CPU is counted by numpy, which
    measured ~20x faster than torch's boolean sums on 2 cores."""
    th = np.asarray(sorted(set(float(t) for t in thresholds)))
    inter, area, true_area, pixels = [], [], [], None
    for maps, true in zip(map_batches, true_batches):
        if isinstance(maps, torch.Tensor) and maps.device.type != "cpu":
            ta, ab, ib = _counts_t(maps, true, th)
        else:
            maps = maps.numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
            ta, ab, ib = _counts(maps, true, th)
        pixels = maps.shape[-1] * maps.shape[-2]
        true_area.append(ta)
        inter.append(ib)
        area.append(ab)
    if pixels is None:
        raise ValueError("no batches to collect statistics from")
    true_area = np.concatenate(true_area, 0)
    rows = np.arange(len(true_area)) if rows is None else np.asarray(rows)
    if len(rows) != len(true_area):
        raise ValueError(f"{len(rows)} rows given for {len(true_area)} images collected")
    return Stats(th, np.concatenate(inter, 1), np.concatenate(area, 1), true_area, pixels, rows)


def pair_dice(stats: Stats, probs: np.ndarray, params: Params) -> np.ndarray:
    """Kaggle Dice of every (image, class) pair under ``params``: ``[N, C]``."""
    n, c = stats.true_area.shape
    conf, thr, min_area = params.per_class(c)
    ti = np.array([stats.t_index(t) for t in thr])
    cols = np.arange(c)
    inter = stats.inter[ti, :, cols].T  # [N, C]
    area = stats.area[ti, :, cols].T
    keep = (probs >= conf[None]) & (area >= min_area[None])
    return dice_pairs(np.where(keep, inter, 0), np.where(keep, area, 0), stats.true_area)


def report(stats: Stats, probs: np.ndarray, params: Params, class_names) -> DiceReport:
    return DiceReport(pair_dice(stats, probs, params), stats.true_area > 0, list(class_names))


def baseline_empty(stats: Stats, class_names) -> DiceReport:
    """Predict no mask anywhere."""
    z = np.zeros_like(stats.true_area)
    return DiceReport(dice_pairs(z, z, stats.true_area), stats.true_area > 0, list(class_names))


def baseline_fill(stats: Stats, probs: np.ndarray, confidence, class_names) -> DiceReport:
    """The whole image as the mask wherever the classifier fires (``p >= confidence``)."""
    conf = np.broadcast_to(np.asarray(confidence, float), (stats.true_area.shape[1],))
    fire = probs >= conf[None]
    area = np.where(fire, stats.pixels, 0)
    inter = np.where(fire, stats.true_area, 0)
    return DiceReport(dice_pairs(inter, area, stats.true_area), stats.true_area > 0, list(class_names))


def search(stats: Stats, probs: np.ndarray, confidences: Sequence[float],
           min_areas: Sequence[float], rows: np.ndarray | None = None,
           per_class: bool = False) -> tuple[Params, float]:
    """Best parameters by mean Kaggle Dice over the (image, class) pairs of ``rows`` (default:
    the defective images, the paper's protocol). Global (one value each) or per class."""
    n, c = stats.true_area.shape
    rows = np.flatnonzero((stats.true_area > 0).any(1)) if rows is None else np.asarray(rows)
    conf = np.asarray(confidences, float)
    mins = np.asarray(min_areas, float)
    # d[t, k, m, i, c]: dice with threshold t, confidence k, min area m
    inter, area = stats.inter[:, rows], stats.area[:, rows]  # [T, R, C]
    ta, p = stats.true_area[rows], probs[rows]
    fire = p[None] >= conf[:, None, None]  # [K, R, C]
    big = area[:, None] >= mins[None, :, None, None]  # [T, M, R, C]
    keep = fire[None, :, None] & big[:, None]  # [T, K, M, R, C]
    d = dice_pairs(np.where(keep, inter[:, None, None], 0), np.where(keep, area[:, None, None], 0),
                   ta[None, None, None])
    per = d.mean(axis=3)  # [T, K, M, C]
    if per_class:
        best = [np.unravel_index(np.argmax(per[..., j]), per.shape[:3]) for j in range(c)]
        params = Params(confidence=[float(conf[b[1]]) for b in best],
                        threshold=[float(stats.thresholds[b[0]]) for b in best],
                        min_area=[float(mins[b[2]]) for b in best])
        score = float(np.mean([per[b + (j,)] for j, b in enumerate(best)]))
    else:
        tot = per.mean(-1)
        b = np.unravel_index(np.argmax(tot), tot.shape)
        params = Params(float(conf[b[1]]), float(stats.thresholds[b[0]]), float(mins[b[2]]))
        score = float(tot[b])
    return params, score


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def write_predictions(index, batches, out: str | Path, png: bool = True, empty_png: bool = False,
                      csv_name: str = "predictions.csv") -> Path:
    """Write predicted masks at each image's own size, streaming ``batches`` of
    ``(rows, masks [len(rows), C, h, w])``: a Kaggle-format RLE CSV (``ImageId,ClassId,
    EncodedPixels``, non-empty masks only) and, with ``png``, ``masks/<class>/<image stem>.png``
    (255 = defect) for every non-empty mask (a missing PNG is an empty mask), or for every mask
    with ``empty_png``. The CSV is quoted where a name needs it (a comma, a quote). Returns the
    CSV path."""
    out = Path(out)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["ImageId", "ClassId", "EncodedPixels"])
    for rows, masks in batches:
        for k, i in enumerate(rows):
            h, w = (int(v) for v in index.shapes[i])
            full = resize_mask(np.ascontiguousarray(masks[k]).astype(np.uint8), (h, w))
            name = index.image_ids[i]
            for c, cname in enumerate(index.class_names):
                if full[c].any():
                    writer.writerow([name, cname, rle_encode(full[c])])
                elif not empty_png:
                    continue
                if png:
                    buf = io.BytesIO()
                    Image.fromarray(full[c] * 255).save(buf, format="PNG")
                    atomic_write_bytes(out / "masks" / cname / f"{Path(name).stem}.png",
                                       buf.getvalue())
    return atomic_write_text(out / csv_name, text.getvalue())
