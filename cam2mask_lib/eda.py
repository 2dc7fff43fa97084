"""Exploratory data analysis: the tables and figures of ``notebooks/00_data_eda.ipynb``.

Each ``*_table`` function returns a DataFrame computed from a DatasetIndex; each ``plot_*``
function returns a matplotlib figure. The notebook shows them and writes them with
:mod:`cam2mask_lib.report`. On Severstal-class data the paper's counts stand beside ours.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle

from . import paper
from .data import DatasetIndex, rle_decode

# one colour per class (classes beyond four cycle through the list)
CLASS_COLORS = [(1.0, 0.85, 0.0), (0.0, 0.85, 1.0), (1.0, 0.2, 0.9), (1.0, 0.25, 0.1),
                (0.3, 1.0, 0.3), (0.6, 0.4, 1.0)]


def _is_severstal_classes(index: DatasetIndex) -> bool:
    return list(index.class_names) == list(paper.CLASS_COUNTS)


def class_table(index: DatasetIndex) -> pd.DataFrame:
    """Images per class (and clean images) with shares; the paper's counts beside them, plus the
    paper's counts scaled to this dataset's size, when the classes are Severstal's."""
    n = len(index)
    rows = []
    names = list(index.class_names) + ["no defect"]
    counts = list(index.labels.sum(0)) + [int((index.labels.sum(1) == 0).sum())]
    for name, cnt in zip(names, counts):
        row = {"class": name, "images": int(cnt), "share %": 100.0 * cnt / n}
        if _is_severstal_classes(index):
            ref = paper.CLASS_COUNTS.get(name, paper.DEFECT_FREE_IMAGES)
            row["paper images"] = ref
            row["paper share %"] = 100.0 * ref / paper.TOTAL_IMAGES
            row["paper scaled to n"] = round(ref * n / paper.TOTAL_IMAGES, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def classes_per_image_table(index: DatasetIndex) -> pd.DataFrame:
    """How many images have 0, 1, 2, ... classes; the thesis's counts beside them."""
    k = index.labels.sum(1)
    rows = []
    for m in range(0, max(int(k.max()) if len(k) else 0, 3) + 1):
        row = {"classes in image": m, "images": int((k == m).sum()),
               "share %": 100.0 * (k == m).mean()}
        if _is_severstal_classes(index):
            ref = (paper.TOTAL_IMAGES - sum(paper.CLASSES_PER_IMAGE.values()) if m == 0
                   else paper.CLASSES_PER_IMAGE.get(m, 0))
            row["thesis images"] = ref
            row["thesis share %"] = 100.0 * ref / paper.TOTAL_IMAGES
        rows.append(row)
    return pd.DataFrame(rows)


def cooccurrence(index: DatasetIndex) -> pd.DataFrame:
    """Images holding both class i and class j (diagonal: images holding class i)."""
    y = index.labels.astype(int)
    return pd.DataFrame(y.T @ y, index=index.class_names, columns=index.class_names)


def mask_areas(index: DatasetIndex) -> pd.DataFrame:
    """One row per non-empty mask: image, class, area in pixels and as a share of the image."""
    rows = []
    for i in range(len(index)):
        hw = int(index.shapes[i][0] * index.shapes[i][1])
        for c in np.flatnonzero(index.labels[i]):
            a = index.mask_area(i, int(c))
            rows.append({"image_id": index.image_ids[i], "class": index.class_names[c],
                         "area px": a, "area %": 100.0 * a / hw})
    return pd.DataFrame(rows, columns=["image_id", "class", "area px", "area %"])


def mask_area_table(areas: pd.DataFrame, class_names) -> pd.DataFrame:
    rows = []
    for name in class_names:
        a = areas.loc[areas["class"] == name, "area px"]
        row = {"class": name, "masks": len(a)}
        if len(a):
            row.update({"min px": int(a.min()), "median px": int(a.median()),
                        "max px": int(a.max()), "median % of image":
                        float(areas.loc[areas["class"] == name, "area %"].median())})
        row["real Severstal (brief)"] = paper.MASK_AREA_NOTES.get(name, "")
        rows.append(row)
    return pd.DataFrame(rows)


def texture_stats(index: DatasetIndex, n: int = 100, seed: int = 0) -> pd.DataFrame:
    """Per-image intensity statistics of up to ``n`` images (grey = first channel)."""
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(index))[:n]
    out = []
    for i in sorted(rows):
        g = index.image(int(i))[..., 0].astype(np.float32)
        out.append({"mean intensity": g.mean(), "intensity std": g.std(),
                    "mean |horizontal neighbour difference|": np.abs(np.diff(g, axis=1)).mean(),
                    "mean |vertical neighbour difference|": np.abs(np.diff(g, axis=0)).mean(),
                    "near-black share (<20)": (g < 20).mean()})
    return pd.DataFrame(out)


def texture_table(stats: pd.DataFrame) -> pd.DataFrame:
    """Quantiles of :func:`texture_stats` beside the ranges measured on real Severstal."""
    rows = []
    for col, (lo, hi) in paper.TEXTURE_RANGES.items():
        v = stats[col]
        rows.append({"statistic": col, "5%": v.quantile(0.05), "median": v.median(),
                     "95%": v.quantile(0.95), "real Severstal range": f"{lo}-{hi}",
                     "median in range": bool(lo <= v.median() <= hi)})
    return pd.DataFrame(rows)


def fold_table(index: DatasetIndex, folds: np.ndarray) -> pd.DataFrame:
    """Images, clean images and images per class in each fold."""
    rows = []
    for f in range(int(folds.max()) + 1):
        sel = folds == f
        row = {"fold": f, "images": int(sel.sum()),
               "no defect": int((index.labels[sel].sum(1) == 0).sum())}
        for c, name in enumerate(index.class_names):
            row[f"class {name}"] = int(index.labels[sel, c].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def pick_examples(index: DatasetIndex, per_class: int = 2, seed: int = 0) -> dict[str, list[int]]:
    """Images to show: ``per_class`` with each class (single-class images first) and as many
    defect-free ones, chosen by seed."""
    rng = np.random.default_rng(seed)
    k = index.labels.sum(1)
    out = {}
    for c, name in enumerate(index.class_names):
        rows = np.flatnonzero(index.labels[:, c])
        rows = rows[np.argsort(k[rows] > 1, kind="stable")]
        single = rows[k[rows] == 1]
        pool = single if len(single) >= per_class else rows
        out[name] = sorted(rng.permutation(pool)[:per_class].tolist())
    clean = np.flatnonzero(k == 0)
    out["no defect"] = sorted(rng.permutation(clean)[:per_class].tolist())
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """RGB float image with each class mask tinted in its colour."""
    out = image.astype(np.float32) / 255.0
    for c in range(masks.shape[0]):
        m = masks[c].astype(bool)
        if m.any():
            col = np.array(CLASS_COLORS[c % len(CLASS_COLORS)], np.float32)
            out[m] = (1 - alpha) * out[m] + alpha * col
    return np.clip(out, 0, 1)


def plot_examples(index: DatasetIndex, rows: list[int], title: str | None = None):
    """Each image with its masks tinted and outlined, one row per image."""

    n = max(len(rows), 1)
    h, w = (int(v) for v in index.shapes[rows[0]]) if rows else (256, 1600)
    fig, axes = plt.subplots(n, 1, figsize=(14, 14 * h / w * n + 0.4 * n), squeeze=False)
    for ax, i in zip(axes[:, 0], rows):
        img, masks = index.image(i), index.mask(i)
        ax.imshow(overlay(img, masks), interpolation="nearest")
        for c in np.flatnonzero(masks.reshape(len(masks), -1).any(1)):
            ax.contour(masks[c], levels=[0.5], colors=[CLASS_COLORS[c % len(CLASS_COLORS)]],
                       linewidths=1.0)
        present = [index.class_names[c] for c in np.flatnonzero(index.labels[i])]
        ax.set_title(f"{index.image_ids[i]}  classes: {', '.join(present) or 'none'}",
                     fontsize=9, loc="left")
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_class_counts(table: pd.DataFrame):
    """Bar chart of images per class; paper's share beside ours when present."""

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(table))
    has_ref = "paper share %" in table
    width = 0.4 if has_ref else 0.7
    ax.bar(x - (width / 2 if has_ref else 0), table["share %"], width, label="this dataset")
    if has_ref:
        ax.bar(x + width / 2, table["paper share %"], width, label="paper (Kaggle Severstal)",
               color="0.6")
    ax.set_xticks(x, [str(c) for c in table["class"]])
    ax.set_xlabel("class")
    ax.set_ylabel("% of images")
    ax.legend(frameon=False)
    for xi, v in zip(x, table["images"]):
        ax.annotate(str(v), (xi - (width / 2 if has_ref else 0), 0), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_title("Images per class")
    fig.tight_layout()
    return fig


def plot_cooccurrence(mat: pd.DataFrame):

    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    sns.heatmap(mat, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax)
    ax.set_xlabel("class")
    ax.set_ylabel("class")
    ax.set_title("Images with both classes")
    fig.tight_layout()
    return fig


def plot_mask_areas(areas: pd.DataFrame, class_names):

    fig, ax = plt.subplots(figsize=(7, 3.5))
    if len(areas):
        pal = {n: CLASS_COLORS[c % len(CLASS_COLORS)] for c, n in enumerate(class_names)}
        sns.boxplot(data=areas, x="class", y="area px", order=list(class_names), hue="class",
                    palette=pal, legend=False, ax=ax, fliersize=2)
        ax.set_yscale("log")
    ax.set_ylabel("mask area (pixels, log scale)")
    ax.set_title("Mask area per class")
    fig.tight_layout()
    return fig


def plot_rle_example(rle: str = "29102 12 29346 24 29602 24 29858 24",
                     shape: tuple[int, int] = (256, 1600)):
    """The RLE runs of a Kaggle row drawn on the pixel grid: column-major numbering, 1-based."""

    mask = rle_decode(rle, shape)
    ys, xs = np.nonzero(mask)
    y0, y1 = ys.min() - 4, ys.max() + 5
    x0, x1 = xs.min() - 2, xs.max() + 3
    fig, ax = plt.subplots(figsize=(5, 6))
    ax.imshow(mask[y0:y1, x0:x1], cmap="Greys", vmin=0, vmax=1.6,
              extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5))
    vals = [int(v) for v in rle.split()]
    for s, n in zip(vals[0::2], vals[1::2]):
        col, row = divmod(s - 1, shape[0])
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, n, fill=False, ec="tab:red", lw=1.5))
        ax.annotate(f"start {s}\n(row {row}, col {col})\nlength {n}", (col, row - 0.5),
                    xytext=(col + 1.0, row - 3.5), fontsize=7, color="tab:red",
                    arrowprops=dict(arrowstyle="->", color="tab:red", lw=0.8))
    ax.set_xlabel("column (x)")
    ax.set_ylabel("row (y)")
    ax.set_title("RLE runs go down a column, then to the next one", fontsize=9)
    fig.tight_layout()
    return fig
