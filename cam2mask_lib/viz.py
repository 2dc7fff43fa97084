"""Pictures: the classifier's training curves and ROC curves, CAMs and masks (the paper's Figures
10-13), a per-class gallery, Guided Grad-CAM."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
import pandas as pd
import seaborn as sns
from sklearn.metrics import roc_auc_score, roc_curve

from .eda import CLASS_COLORS
from .metrics import dice


# ------------------------------------------------------------------------------------------------
# The classifier
# ------------------------------------------------------------------------------------------------

def plot_history(history):
    """Training and validation loss, and validation AUC, per epoch and fold."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for f, h in history.groupby("fold"):
        axes[0].plot(h["epoch"], h["train_loss"], "--", color=f"C{f}", alpha=0.7)
        axes[0].plot(h["epoch"], h["val_loss"], "-", color=f"C{f}", label=f"fold {f}")
        axes[1].plot(h["epoch"], h["val_auc"], "-o", ms=3, color=f"C{f}", label=f"fold {f}")
    axes[0].set(xlabel="epoch", ylabel="BCE (dashed: train, solid: validation)", title="Loss")
    axes[1].set(xlabel="epoch", ylabel="mean ROC-AUC over classes", title="Validation AUC")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_roc(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]):
    """ROC curve of each class from out-of-fold probabilities (rows with NaN skipped)."""
    ok = ~np.isnan(probs).any(1)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for c, name in enumerate(class_names):
        y = labels[ok, c]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[ok, c])
            auc = roc_auc_score(y, probs[ok, c])
            ax.plot(fpr, tpr, label=f"class {name}: AUC {auc:.3f} ({int(y.sum())} positives)")
    ax.plot([0, 1], [0, 1], ":", color="0.5")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title="Out-of-fold ROC curves")
    ax.legend(frameon=False, fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _gray(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.ndim == 3 else img


def _show(ax, img: np.ndarray) -> None:
    """An image in its colours, or in grey where its channels are equal."""
    img = np.asarray(img)
    if img.ndim == 3 and not (img == img[..., :1]).all():
        ax.imshow(img.astype(np.uint8), interpolation="nearest")
    else:
        ax.imshow(_gray(img), cmap="gray", vmin=0, vmax=255, interpolation="nearest")


def _strip(ax, img, title, cam=None, mask=None, truth=None, color=(1, 0.2, 0.2), fontsize=9):
    _show(ax, img)
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    if mask is not None:
        rgba = np.zeros((*mask.shape, 4), np.float32)
        rgba[mask.astype(bool)] = (*color, 0.5)
        ax.imshow(rgba, interpolation="nearest")
    if truth is not None and truth.any():
        ax.contour(truth, levels=[0.5], colors=["lime"], linewidths=1.0)
    ax.set_title(title, fontsize=fontsize, loc="left")
    ax.axis("off")


def cam_colorbar(fig, axes, label="CAM, scaled to [0, 1]"):
    """One colour bar for every CAM heatmap of ``axes`` (the maps are drawn with ``jet`` on
    [0, 1] by :func:`_strip`)."""
    fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=list(np.ravel(axes)), label=label,
                 fraction=0.025, pad=0.01)


def _dice(pred, truth) -> float:
    return float(dice(np.asarray(pred) != 0, np.asarray(truth) != 0))


def plot_cam_steps(image, truth, cam_before, cam_after, label_before, label_after,
                   thresholds=(0.75, 0.3), title=None):
    """As the paper's Figures 10-13: a CAM over its image, binarised at 0.75 and at 0.3, before
    and after the improvements. Green outline: the true mask."""

    h, w = truth.shape
    rows = 1 + 2 * (1 + len(thresholds))
    fig, axes = plt.subplots(rows, 1, figsize=(12, rows * (12 * h / w + 0.35)))
    _strip(axes[0], image, "image and true mask (green)", truth=truth)
    k = 1
    for cam, label in ((cam_before, label_before), (cam_after, label_after)):
        _strip(axes[k], image, f"{label}: CAM", cam=cam, truth=truth)
        k += 1
        for t in thresholds:
            _strip(axes[k], image, f"{label}: CAM > {t}, Dice {_dice(cam > t, truth):.2f}",
                   mask=cam > t, truth=truth)
            k += 1
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    cam_colorbar(fig, axes)
    return fig


def plot_gallery(items, class_names):
    """Per item (image, class, true mask, CAM, predicted mask, Dice): image with the CAM, then the
    predicted mask (class colour) with the true mask outlined in green."""

    n = len(items)
    if n == 0:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no examples", ha="center")
        ax.axis("off")
        return fig
    h, w = items[0]["truth"].shape
    fig, axes = plt.subplots(2 * n, 1, figsize=(12, 2 * n * (12 * h / w + 0.35)), squeeze=False)
    for k, it in enumerate(items):
        c = it["cls"]
        _strip(axes[2 * k, 0], it["image"], f"{it['image_id']} class {class_names[c]}: CAM "
               f"(p = {it['prob']:.2f})", cam=it["cam"], truth=it["truth"])
        _strip(axes[2 * k + 1, 0], it["image"], f"predicted mask, Dice {it['dice']:.2f}",
               mask=it["pred"], truth=it["truth"], color=CLASS_COLORS[c % len(CLASS_COLORS)])
    fig.tight_layout()
    cam_colorbar(fig, axes)
    return fig


def plot_guided(image, truth, cam, guided, label):

    h, w = truth.shape
    fig, axes = plt.subplots(3, 1, figsize=(12, 3 * (12 * h / w + 0.35)))
    _strip(axes[0], image, "image and true mask (green)", truth=truth)
    _strip(axes[1], image, f"{label}: Grad-CAM", cam=cam, truth=truth)
    axes[2].imshow(guided, cmap="magma", vmin=0, vmax=1)
    if truth.any():
        axes[2].contour(truth, levels=[0.5], colors=["lime"], linewidths=1.0)
    axes[2].set_title("Guided Grad-CAM: Grad-CAM x guided backpropagation", fontsize=9, loc="left")
    axes[2].axis("off")
    fig.tight_layout()
    cam_colorbar(fig, axes[1], "Grad-CAM, scaled to [0, 1]")
    fig.colorbar(axes[2].images[0], ax=axes[2], label="guided Grad-CAM", fraction=0.025,
                 pad=0.01)
    return fig


def plot_predictions(image, truth, preds: dict, class_names, title=None, ncols=None):
    """One image, its true masks and each model's predicted masks: a panel per entry, every
    class in its colour (filled: predicted; outlined in the same colour: true), each titled with
    its Dice over the classes present in the image. Many entries are laid out in columns
    (``ncols``; default: 1 up to 6 entries, else 3) so the figure stays about as tall as wide."""

    h, w = truth.shape[-2:]
    entries = [("true masks", truth)] + list(preds.items())
    ncols = ncols or (1 if len(entries) <= 6 else 3)
    nrows = -(-len(entries) // ncols)
    pw = 12 / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, nrows * (pw * h / w + 0.4)),
                             squeeze=False)
    present = [c for c in range(truth.shape[0]) if truth[c].any()]
    for k, (ax, (name, masks)) in enumerate(zip(axes.ravel(), entries)):
        ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        rgba = np.zeros((h, w, 4), np.float32)
        for c in range(masks.shape[0]):
            col = CLASS_COLORS[c % len(CLASS_COLORS)]
            rgba[masks[c].astype(bool)] = (*col[:3], 0.5)
            if truth[c].any():
                ax.contour(truth[c], levels=[0.5], colors=[col[:3]], linewidths=1.0)
        ax.imshow(rgba, interpolation="nearest")
        score = (f", Dice {np.mean([_dice(masks[c], truth[c]) for c in present]):.2f}"
                 if present and k > 0 else "")   # entry 0 is the truth itself
        ax.set_title(f"{name}{score}", fontsize=8 if ncols > 1 else 9, loc="left")
        ax.axis("off")
    for ax in axes.ravel()[len(entries):]:
        ax.axis("off")
    names = [class_names[c] for c in present]
    fig.suptitle(title or f"classes present: {', '.join(names) or 'none'}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_method_overview(image, cam, cam_mask, net_on_cam, net_on_true, truth, title):
    """The method on one image and one class, top to bottom: the image, the classifier's CAM,
    the mask cut from it, a U-Net trained on such CAM masks, a U-Net trained on the true masks,
    and the truth; every mask's Dice with the truth in its title."""

    h, w = truth.shape
    steps = [("1. the image (only its label is used to train)", {}),
             ("2. the classifier's Grad-CAM++ for the labelled class", {"cam": cam}),
             ("3. CAM mask: the map cut by the post-processing", {"mask": cam_mask}),
             ("4. U-Net trained on CAM masks", {"mask": net_on_cam}),
             ("5. U-Net trained on the true masks (the supervised reference)",
              {"mask": net_on_true}),
             ("6. the true mask (used only to score)", {"mask": truth})]
    fig, axes = plt.subplots(len(steps), 1, figsize=(12, len(steps) * (12 * h / w + 0.35)))
    for ax, (name, kw) in zip(axes, steps):
        if "mask" in kw and kw["mask"] is not truth:
            name += f": Dice {_dice(kw['mask'], truth):.2f}"
        _strip(ax, image, name, truth=truth if kw else None, **kw)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    cam_colorbar(fig, axes[1])
    return fig


def plot_class_bars(per_class, ylabel="Dice (non-empty masks)", reference=None,
                    title="Dice on each class's non-empty masks"):
    """Grouped bars: one group per class, one bar per row of ``per_class`` (a DataFrame with a
    first column naming the model and one column per class); ``reference`` adds those values as
    black markers (e.g. the thesis's)."""

    long = per_class.melt(id_vars=per_class.columns[0], var_name="class", value_name=ylabel)
    fig, ax = plt.subplots(figsize=(12, 4))
    sns.barplot(data=long, x="class", y=ylabel, hue=per_class.columns[0], ax=ax)
    if reference is not None:
        ax.plot(range(len(reference)), reference, "k_", markersize=30, mew=2, label="reference")
    ax.set_ylim(0, 1)
    ax.set_title(title + (" (black marks: the reference)" if reference is not None else ""),
                 fontsize=10, loc="left")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_gap_closed(tables: dict, rows, column: str = "gap closed"):
    """Horizontal bars: for each row name of ``rows`` (the ``masks`` column of the refinement
    tables), ``column`` in each table of ``tables`` (label -> DataFrame), one colour per table; a
    row a table lacks is left out of its colour."""
    long = []
    for label, t in tables.items():
        values = t.set_index("masks")[column]
        long += [{"masks": r, "data": label, column: float(values[r])}
                 for r in rows if r in values.index]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) * len(tables) + 1))
    sns.barplot(data=pd.DataFrame(long), y="masks", x=column, hue="data", ax=ax, orient="h")
    ax.axvline(1.0, color="k", lw=1, ls=":")
    ax.set_ylabel("")
    ax.set_xlabel(f"{column}: 0 = no mask, 1 = the supervised U-Net (dotted)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(tables))
    fig.tight_layout()
    return fig


def plot_class_examples(examples, cams, class_names, columns=("refined (the default)",
                                                                "self-trained U-Net")):
    """One row per example of ``examples`` (:func:`experiments.refinement_examples`: one image
    per class), its class only: the image, the class's CAM (``cams``, one ``[H, W]`` map per
    example), the masks of ``columns`` (each with its Dice) and the true mask."""
    n = len(examples)
    h, w = examples[0]["truth"].shape[-2:]
    ncol = 3 + len(columns)
    fig, axes = plt.subplots(n, ncol, figsize=(2.6 * ncol, n * (2.6 * h / w + 0.45)),
                             squeeze=False)
    for r, (ex, cam) in enumerate(zip(examples, cams)):
        c = list(class_names).index(ex["class"])
        img, truth, row = ex["image"], ex["truth"][c], axes[r]
        _strip(row[0], img, f"class {ex['class']}: image", fontsize=8)
        _strip(row[1], img, "CAM", cam=cam, fontsize=8)
        for ax, name in zip(row[2:], columns):
            pred = ex["preds"][name][c]
            _strip(ax, img, f"{name}, Dice {_dice(pred, truth):.2f}", mask=pred, fontsize=8)
        _strip(row[-1], img, "true mask", mask=truth, color=(0.2, 1, 0.2), fontsize=8)
    cam_colorbar(fig, axes)
    return fig
