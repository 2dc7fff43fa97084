"""Dice metrics as the paper and the thesis report them.

* Kaggle Dice: per (image, class) pair ``2|X n Y| / (|X| + |Y|)``, and **1 when both are empty**;
  averaged over all pairs, ``M = sum_i sum_j Dice(x_ij, x^_ij) / (C n)``.
* The paper's protocol averages over **defective images only** (images with at least one mask);
  the Kaggle leaderboard averages over all images; empty-empty pairs inflate both.
* The thesis's "dice full mask": the mean over pairs whose true mask is non-empty only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def dice_pairs(inter: np.ndarray, pred_area: np.ndarray, true_area: np.ndarray) -> np.ndarray:
    """Kaggle Dice from intersections and areas (any shape); 1 where both areas are 0."""
    inter, pa, ta = (np.asarray(a, dtype=np.float64) for a in (inter, pred_area, true_area))
    denom = pa + ta
    out = np.ones(np.broadcast(inter, denom).shape)
    nz = denom > 0
    out[nz] = 2 * np.broadcast_to(inter, out.shape)[nz] / np.broadcast_to(denom, out.shape)[nz]
    return out


def dice(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Kaggle Dice of masks ``[..., H, W]`` (nonzero = foreground), one value per leading index."""
    p, t = np.asarray(pred) != 0, np.asarray(true) != 0
    return dice_pairs((p & t).sum((-2, -1)), p.sum((-2, -1)), t.sum((-2, -1)))


@dataclass
class DiceReport:
    """Dice values of every (image, class) pair and what they average to."""

    values: np.ndarray  # [N, C]
    true_nonempty: np.ndarray  # [N, C] bool
    class_names: list

    @property
    def defective(self) -> np.ndarray:
        return self.true_nonempty.any(1)

    def defect_free_with_mask(self) -> float:
        """The share of images holding no defect of any class that get a mask of some class
        (Kaggle Dice of an empty truth is 0 exactly when a mask is predicted); NaN with none."""
        free = ~self.defective
        return float((self.values[free] < 1).any(1).mean()) if free.any() else float("nan")

    def summary(self) -> dict:
        """Means under each protocol, overall and per class (NaN where there is nothing to average)."""
        def mean(x):
            return float(np.mean(x)) if np.size(x) else float("nan")

        v, ne, d = self.values, self.true_nonempty, self.defective
        out = {"dice_defective_images": mean(v[d]), "dice_all_images": mean(v),
               "dice_nonempty_masks": mean(v[ne]), "n_defective_images": int(d.sum()),
               "n_images": len(v), "n_nonempty_masks": int(ne.sum())}
        for c, name in enumerate(self.class_names):
            out[f"class {name} (defective images)"] = mean(v[d, c])
            out[f"class {name} (non-empty masks)"] = mean(v[ne[:, c], c])
        return out


def dice_report(pred: np.ndarray, true: np.ndarray, class_names) -> DiceReport:
    """:class:`DiceReport` of predicted and true masks ``[N, C, H, W]``."""
    t = np.asarray(true) != 0
    return DiceReport(dice(pred, true), t.any((-2, -1)), list(class_names))
